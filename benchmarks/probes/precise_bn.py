"""Probe (2026-12-06): do BatchNorm statistics recomputed after training ("precise BN") pay (issue 16)?

    python benchmarks/probes/precise_bn.py results/RUN ... [--images 10000] [--data-dir ../shared/data]

The running means and variances a run ends with are exponential averages over the last training batches,
which were augmented (translation, erasing) and, with progressive resizing, partly seen at another size.
For each run folder with a seeded validation split this prints top-1 on that split (the image and its
mirror, as the runs report) with the statistics as trained, then with them recomputed as a plain average
over --images training images (not the validation ones) preprocessed as for evaluation, with and without
their mirrors, in the run's own precision. Nothing about the model's weights changes."""
import argparse
import copy

import torch

import convmixer
from convmixer.data import eval_batches, load_dataset, split_train_val
from convmixer.evaluate import evaluate, info_transform
from convmixer.run import load_model
from convmixer.runtime import amp_dtype

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("runs", nargs="+", help="run folders (each with model.safetensors and a validation split)")
ap.add_argument("--images", type=int, default=10000, help="training images to average the statistics over")
ap.add_argument("--data-dir", default=None, help="default: the run's own")
args = ap.parse_args()
convmixer.tune_cpu()
AMP = amp_dtype("auto", torch.device("cpu"))


@torch.no_grad()
def recompute_bn(model, info, train, mirror: bool):
    """A copy of the model whose BatchNorm statistics are the plain average over the training images."""
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.autocast("cpu", dtype=AMP or torch.float32, enabled=AMP is not None):
        for images, _ in eval_batches(train, 250, info_transform(info), 0):
            images = images.contiguous(memory_format=torch.channels_last)
            model(images)
            if mirror:
                model(images.flip(-1))
    return model.eval()


for run in args.runs:
    model, info = load_model(run)
    model.eval().to(memory_format=torch.channels_last)
    cfg = info.config
    assert cfg.get("val_split"), f"{run}: no validation split"
    full = load_dataset(cfg["dataset"], args.data_dir or cfg["data_dir"], train=True, img_size=info.img_size,
                        download=False)
    train, val = split_train_val(full, cfg["val_split"], seed=cfg.get("seed", 0))  # the run's own split
    train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:args.images])
    row = {"as trained": model, "recomputed": recompute_bn(model, info, train, mirror=False),
           "recomputed, mirrors too": recompute_bn(model, info, train, mirror=True)}
    accs = {name: evaluate(m, val, info, amp=AMP, tta_flip=True)["top1"] for name, m in row.items()}
    print(run, " ".join(f"{k}: {100 * v:.2f}" for k, v in accs.items()), flush=True)
