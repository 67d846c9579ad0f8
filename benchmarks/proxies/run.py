"""Short proxy runs for time-to-accuracy decisions (issue 16): one recipe change, several seeds, a few
minutes of wall-clock each, validated on the seeded 5,000-image split with the mirror only.

    python benchmarks/proxies/run.py NAME [--minutes 5] [--seeds 0 1 2] [--config cifar10_90min] -- KEY=VALUE ...

Each run is `convmixer train --config CONFIG --time-limit MINUTES --val-split 5000 ...` into
results/proxies/NAME_s<seed>/; the summary (mean, spread) is appended to results/proxies/summary.jsonl
and `--table` prints every recorded change as the Markdown table in RESULTS.md. Run one at a time on a
quiet machine: the budget is wall-clock."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from convmixer.config import read_config_file
from convmixer.run import read_metrics

ROOT = Path(__file__).resolve().parents[2] / "results" / "proxies"


TRAIN_SPLIT = {"cifar10": 50_000, "cifar100": 50_000, "fashion_mnist": 60_000, "mnist": 60_000}


def epochs_run(out: Path) -> float:
    """Epochs the run trained: its optimizer steps x global batch over its training images (those left after
    validation, or its seeded subset of them)."""
    cfg = read_config_file(out / "config.yaml")
    images = TRAIN_SPLIT[cfg["dataset"]] - int(cfg["val_split"])
    if int(cfg.get("subset") or 0):
        images = min(images, int(cfg["subset"]))
    return read_metrics(out)[-1]["step"] * cfg["batch_size"] / images


def table() -> None:
    print("| change | base config | settings | minutes | seeds | val top-1 mean | spread (min-max) | epochs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for line in (ROOT / "summary.jsonl").read_text().splitlines():
        r = json.loads(line)
        print(f"| {r['name']} | `{r['config']}` | `{' '.join(r['settings']) or '(base)'}` | {r['minutes']:g} | {len(r['seeds'])} | "
              f"{100 * r['mean']:.2f}% | {100 * min(r['accs']):.2f}-{100 * max(r['accs']):.2f} | {r['epochs']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", nargs="?")
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default="cifar10_90min")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("settings", nargs="*", help="key=value overrides")
    args = ap.parse_intermixed_args()
    if args.table:
        return table()
    accs, raw, epochs = [], [], []
    for seed in args.seeds:
        out = ROOT / f"{args.name}_s{seed}"
        cmd = [sys.executable, "-m", "convmixer", "train", "--config", args.config, "--data-dir", args.data_dir,
               "--time-limit", str(args.minutes), "--seed", str(seed), "--out", str(out), "--overwrite",
               "--val-split", "5000", "--eval-every", "1000", "--tta-shift", "0", "--no-progress", *args.settings]
        t = time.time()
        subprocess.run(cmd, check=True)
        summary = json.loads((out / "summary.json").read_text())
        # with ema_decay, the averaged weights are the run's model.safetensors: score those
        accs.append(summary.get("final_val_top1_ema") or summary["final_val_top1"])
        raw.append(summary["final_val_top1"])
        epochs.append(epochs_run(out))
        print(f"{args.name} seed {seed}: {100 * accs[-1]:.2f}% in {time.time() - t:.0f} s", flush=True)
    row = dict(name=args.name, settings=args.settings, minutes=args.minutes, seeds=args.seeds, accs=accs,
               mean=statistics.mean(accs), epochs=statistics.mean(epochs), config=args.config,
               machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d"),
               **({"accs_without_ema": raw} if raw != accs else {}))
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / "summary.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
