"""Augmentation throughput, per image (torchvision v2 in the training process, as streamed folders
and the previous version do) against per batch (convmixer.augment.BatchAugment), side by side in one
process on the same images and recipe (RandAugment n2 m12, flip: the authors' CIFAR-10 script).

    python benchmarks/augment_pipeline.py --data-dir ../shared/data [--batches 20] [--batch-size 256]
"""
import argparse
import json
import platform
import statistics
import time

import torch

from convmixer.augment import BatchAugment
from convmixer.config import make_config
from convmixer.data import STATS, TransformedImages, load_dataset, train_transform


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--config", default="cifar10_script")
    args = p.parse_args()
    cfg = make_config(args.config, {})
    data = load_dataset("cifar10", args.data_dir, progress=False)
    mean, std = STATS["cifar10"]
    per_image = TransformedImages(data, train_transform(cfg, 32, mean, std))
    batched = BatchAugment(cfg, 32, mean, std)
    g = torch.Generator().manual_seed(0)
    times = {"per image": [], "per batch": []}
    for _ in range(args.batches):  # interleaved, so both see the same machine state
        index = torch.randperm(len(data), generator=g)[:args.batch_size]
        t = time.perf_counter()
        torch.stack([per_image[i][0] for i in index.tolist()])
        times["per image"].append(time.perf_counter() - t)
        t = time.perf_counter()
        batched(data.images[index], progress=cfg.randaugment_from)  # where the whole recipe applies
        times["per batch"].append(time.perf_counter() - t)
    rate = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    report = dict(images_per_second=rate, ratio=rate["per batch"] / rate["per image"], batch_size=args.batch_size,
                  batches=args.batches, recipe=args.config, threads=torch.get_num_threads(), torch=torch.__version__,
                  machine=platform.processor() or platform.machine())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
