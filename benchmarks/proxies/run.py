"""Short proxy runs for time-to-accuracy decisions (issue 16): one recipe change, several seeds, a few
minutes of wall-clock each, validated on the seeded 5,000-image split with the mirror only.

    python benchmarks/proxies/run.py NAME [--minutes 5 | --epochs N] [--seeds 0 1 2] [--config cifar10_90min] -- KEY=VALUE ...

Each run is `convmixer train --config CONFIG --time-limit MINUTES --val-split 5000 ...` into
results/proxies/NAME_s<seed>/; the summary (mean, spread) is appended to results/proxies/summary.jsonl
and `--table` prints every recorded change as the Markdown table in RESULTS.md, with the decision on each
from results/proxies/decisions.json (written by hand once the prose has argued it). Run one at a time on a
quiet machine: the budget is wall-clock. `--epochs N` fixes the schedule in epochs instead (no time limit), so
that rows measured on machines of different speeds compare; its row records the mean wall-clock."""
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
    """The Markdown table of every recorded change, with the decision RESULTS.md's prose argues for each, as kept
    by hand in decisions.json (name -> "kept", "not kept", "tie, not kept", "base", ...; "undecided" if absent)."""
    decisions = json.loads((ROOT / "decisions.json").read_text())
    print("| change | base config | settings | minutes | seeds | val top-1 mean | spread (min-max) | epochs | decision |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for line in (ROOT / "summary.jsonl").read_text().splitlines():
        r = json.loads(line)
        minutes = f"{r['minutes']:g}" + (" (epochs fixed)" if r.get("fixed_epochs") else "")
        print(f"| {r['name']} | `{r['config']}` | `{' '.join(r['settings']) or '(base)'}` | {minutes} | {len(r['seeds'])} | "
              f"{100 * r['mean']:.2f}% | {100 * min(r['accs']):.2f}-{100 * max(r['accs']):.2f} | {r['epochs']:.2f} | "
              f"{decisions.get(r['name'], 'undecided')} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", nargs="?")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=5, help="wall-clock budget of each run")
    budget.add_argument("--epochs", type=int, default=0, help="a fixed number of epochs instead of --minutes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default="cifar10_90min")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("settings", nargs="*", help="key=value overrides")
    args = ap.parse_intermixed_args()
    if args.table:
        return table()
    budget = ["--time-limit", "0", "--epochs", str(args.epochs)] if args.epochs else ["--time-limit", str(args.minutes)]
    accs, raw, epochs, walls = [], [], [], []
    for seed in args.seeds:
        out = ROOT / f"{args.name}_s{seed}"
        cmd = [sys.executable, "-m", "convmixer", "train", "--config", args.config, "--data-dir", args.data_dir,
               *budget, "--seed", str(seed), "--out", str(out), "--overwrite",
               "--val-split", "5000", "--eval-every", "1000", "--tta-shift", "0", "--no-progress", *args.settings]
        t = time.time()
        subprocess.run(cmd, check=True)
        summary = json.loads((out / "summary.json").read_text())
        # with ema_decay, the averaged weights are the run's model.safetensors: score those
        accs.append(summary.get("final_val_top1_ema") or summary["final_val_top1"])
        raw.append(summary["final_val_top1"])
        epochs.append(epochs_run(out))
        walls.append(time.time() - t)
        print(f"{args.name} seed {seed}: {100 * accs[-1]:.2f}% in {walls[-1]:.0f} s", flush=True)
    minutes = round(statistics.mean(walls) / 60, 1) if args.epochs else args.minutes
    row = dict(name=args.name, settings=args.settings, minutes=minutes, **({"fixed_epochs": True} if args.epochs else {}),
               seeds=args.seeds, accs=accs, mean=statistics.mean(accs), epochs=statistics.mean(epochs), config=args.config,
               machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d"),
               **({"accs_without_ema": raw} if raw != accs else {}))
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / "summary.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
