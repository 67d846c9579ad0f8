"""Fine-tuning on a small real task versus training from scratch (README "Train on your own images").

Builds an ImageFolder from the CIFAR-10 JPEG copy: 3 classes, 50 training images each, and every other
image of those classes as validation, all drawn from the seeded 5,000-image validation split that the
shipped `cifar10` weights were held out from (seed 0), so the pretrained model never saw any of them.
Then trains with the documented command, from the shipped weights and from scratch, and writes
results/finetune_3class/{results.json,results.md}.

    python benchmarks/finetune_small.py --data-dir ../shared/data
"""
import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from convmixer.data import load_dataset, split_train_val

CLASSES = ("cat", "dog", "deer")


def build_folder(data_dir: str, root: Path, per_class: int) -> dict:
    data = load_dataset("cifar10", data_dir, train=True)
    _, held_out = split_train_val(data, 5000, seed=0)  # the shipped weights' validation split
    counts = {}
    for name in CLASSES:
        c = data.classes.index(name)
        idx = (held_out.labels == c).nonzero().flatten().tolist()
        for split, part in (("train", idx[:per_class]), ("val", idx[per_class:])):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(held_out.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
            counts[f"{split}/{name}"] = len(part)
    return counts


def run(name: str, root: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "convmixer", "train", "--config", "finetune", "--data-dir", str(root),
           "--out", str(out / name), "--no-progress", *extra]
    start = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.time() - start
    summary = json.loads((out / name / "summary.json").read_text())
    shown = "convmixer train --config finetune --data-dir mydata" + "".join(f" {a}" for a in extra)
    return dict(name=name, command=shown, val_top1=summary["final_val_top1"], best_val_top1=summary["best_val_top1"],
                seconds=round(seconds, 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--work", default="/tmp/convmixer_finetune")
    p.add_argument("--out", default="results/finetune_3class")
    args = p.parse_args()
    work, out = Path(args.work), Path(args.out)
    root = work / "mydata"
    counts = build_folder(args.data_dir, root, args.per_class) if not root.exists() else {}
    rows = [run("pretrained_cifar10", root, work, []),
            run("scratch_same_recipe", root, work, ["--pretrained", "none"]),
            run("scratch_lr0.01_30ep", root, work, ["--pretrained", "none", "--lr", "0.01", "--epochs", "30"]),
            run("pretrained_fashion_mnist", root, work, ["--pretrained", "fashion_mnist"])]
    out.mkdir(parents=True, exist_ok=True)
    report = dict(classes=CLASSES, images=counts, rows=rows, machine=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), torch=torch.__version__,
                  command="python benchmarks/finetune_small.py --data-dir " + args.data_dir)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    lines = ["| start | val top-1 | wall-clock | command |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['name']} | {100 * r['val_top1']:.1f}% | {r['seconds']:.0f} s | `{r['command']}` |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
