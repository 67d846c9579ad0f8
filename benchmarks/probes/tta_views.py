"""Probe (2026-12-03): which test-time views pay, decided on proxy runs' validation split (issue 16).

    python benchmarks/probes/tta_views.py results/proxies/NAME_s0 results/proxies/NAME_s1 ... [--shift 1]

For each run, the logits of all 18 views (the 3x3 translations by -s, 0, +s pixels in x and y, reflected
border, each with its mirror) are computed once on the run's seeded validation split, then averaged over
view sets: 1 (the image), 2 (with the mirror), 6 (`--tta-flip --tta-shift s`: the diagonal (+s,+s), (-s,-s)),
10 (also the anti-diagonal), 10 axis (the four axis shifts instead of the diagonals), 18 (all). Prints top-1
of each set per run and the mean."""
import argparse
import statistics

import torch

import convmixer
from convmixer.data import eval_batches
from convmixer.evaluate import info_transform, load_eval_data, translate
from convmixer.run import load_model
from convmixer.runtime import amp_dtype

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("runs", nargs="+", help="run folders (each with model.safetensors and a validation split)")
ap.add_argument("--shift", type=int, default=1, help="pixels of translation")
args = ap.parse_args()
convmixer.tune_cpu()
s = args.shift
SHIFTS = [(dx, dy) for dy in (-s, 0, s) for dx in (-s, 0, s)]
SETS = {"1": [(0, 0)], "6 diagonal": [(0, 0), (s, s), (-s, -s)],
        "10 diagonals": [(0, 0), (s, s), (-s, -s), (s, -s), (-s, s)],
        "10 axis": [(0, 0), (s, 0), (-s, 0), (0, s), (0, -s)], "18 all": SHIFTS}


@torch.no_grad()
def view_logits(run):
    model, info = load_model(run)
    model.eval().to(memory_format=torch.channels_last)
    data, _, split = load_eval_data(info)
    assert split.startswith("val"), f"{run}: no validation split"
    amp = amp_dtype("auto", torch.device("cpu"))
    out, labels = {}, []
    for images, y in eval_batches(data, 256, info_transform(info), 0):
        labels.append(y)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            for dx, dy in SHIFTS:
                v = translate(images, dx, dy)
                for flip in (False, True):
                    x = (v.flip(-1) if flip else v).contiguous(memory_format=torch.channels_last)
                    out.setdefault((dx, dy, flip), []).append(model(x).float())
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(labels)


table = {name: [] for name in ["1", "2"] + list(SETS)[1:]}
for run in args.runs:
    logits, y = view_logits(run)
    acc = lambda keys: (sum(logits[k] for k in keys) / len(keys)).argmax(-1).eq(y).float().mean().item()
    table["1"].append(acc([(0, 0, False)]))
    table["2"].append(acc([(0, 0, False), (0, 0, True)]))
    for name, shifts in list(SETS.items())[1:]:
        table[name].append(acc([(dx, dy, f) for dx, dy in shifts for f in (False, True)]))
    print(run, " ".join(f"{k}: {100 * v[-1]:.2f}" for k, v in table.items()), flush=True)
print("views         " + "  ".join(f"{r.rstrip('/').split('/')[-1]:>12}" for r in args.runs) + "      mean")
for name, accs in table.items():
    print(f"{name:<13} " + "  ".join(f"{100 * a:11.2f}%" for a in accs) + f"  {100 * statistics.mean(accs):7.2f}%")
