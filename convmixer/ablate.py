"""``convmixer ablate``: a grid of short trainings over config keys (the paper's ablations: kernel
size, patch size, residual connections, normalisation, activation, each augmentation), resumable,
summarised as a Markdown table and a bar chart."""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

from .config import ConfigError, check_key, coerce, make_config

# A reduced budget by default, so that a grid of a dozen cells fits in about an hour on 2 CPU cores.
REDUCED = {"subset": 10000, "epochs": 3, "val_split": 2000, "eval_every": 100}
# Named switches for the paper's ablations, usable as --grid entries (e.g. --grid no_residual).
SWITCHES = {
    "residual": ("residual", ["true", "false"]),
    "norm": ("norm", ["batchnorm", "layernorm"]),
    "activation": ("activation", ["gelu", "relu"]),
    "randaugment": ("randaugment_n", ["2", "0"]),
    "mixup": ("mixup", ["0.5", "0"]),
    "cutmix": ("cutmix", ["0.5", "0"]),
    "random_erasing": ("random_erasing", ["0.25", "0"]),
}


def parse_grid(items: list[str]) -> dict[str, list]:
    """``key=v1,v2,...`` entries (or a switch name from SWITCHES) into {key: [values]}."""
    grid = {}
    for item in items:
        if "=" not in item:
            if item not in SWITCHES:
                raise ConfigError(f"grid entry {item!r} must be key=v1,v2 or one of {', '.join(SWITCHES)}")
            key, values = SWITCHES[item]
        else:
            key, raw = item.split("=", 1)
            values = [v for v in raw.split(",") if v != ""]
        key = check_key(key)
        if not values:
            raise ConfigError(f"grid entry {item!r} has no values")
        grid[key] = [coerce(key, v) for v in values]
    if not grid:
        raise ConfigError("give at least one --grid entry, e.g. --grid kernel_size=3,5,7,9 patch_size=1,2")
    return grid


def cell_name(cell: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in cell.items())


def run_grid(base: str | None, grid: dict, out: str | Path, overrides: dict | None = None,
             full: bool = False) -> list[dict]:
    from .run import read_metrics
    from .train import train
    from .weights import atomic_write
    out = Path(out)
    cells = _cells(base, grid, out, {} if full else dict(REDUCED), dict(overrides or {}))  # all checked first
    _claim(out, _shared_settings(cells[0]["cfg"], grid))
    results = []
    try:
        for i, c in enumerate(cells, 1):
            record_path = c["dir"] / "cell.json"
            record = _read_cell(record_path)
            if record is not None:
                print(f"[{i}/{len(cells)}] {c['name']}: done before ({100 * record['val_top1']:.2f}%)")
                results.append(record)
                continue
            resume = c["dir"] / "last.pt" if (c["dir"] / "last.pt").is_file() else None
            print(f"[{i}/{len(cells)}] {c['name']}" + (" (resuming)" if resume else ""), flush=True)
            start = time.time()
            summary = train(c["cfg"], resume=resume, overwrite=resume is None)  # the grid owns its cells' folders
            if summary.get("interrupted"):
                print("interrupted: run the same command again to continue")
                break
            metrics = read_metrics(c["dir"])
            record = dict(cell=c["cell"], name=c["name"], val_top1=summary["final_val_top1"],
                          best_val_top1=summary["best_val_top1"], params=summary["params"],
                          seconds=time.time() - start,
                          images_per_second=sum(m["images_per_second"] for m in metrics) / len(metrics),
                          epochs=c["cfg"].epochs, command=c["command"])
            atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
            results.append(record)
    finally:  # the cells finished so far are reported also when a later one fails
        if results:
            write_report(results, out, grid)
    return results


def _cells(base: str | None, grid: dict, out: Path, budget: dict, overrides: dict) -> list[dict]:
    """Every cell of the grid with its folder, command and config, each config built (so checked) before
    any cell trains: a bad value in the last cell is refused before hours go into the first."""
    cells = []
    for values in itertools.product(*grid.values()):
        cell = dict(zip(grid, values))
        name = cell_name(cell)
        folder = out / "cells" / name.replace("/", "_")
        settings = {**budget, **overrides, **cell, "out": str(folder), "progress": False}
        command = "convmixer train" + (f" --config {base}" if base else "") + "".join(
            f" {k}={v}" for k, v in settings.items())
        cfg = make_config(base, {k: str(v) for k, v in settings.items()})
        cells.append(dict(cell=cell, name=name, dir=folder, command=command, cfg=cfg))
    return cells


def _shared_settings(cfg, grid: dict) -> dict:
    """The resolved settings every cell shares (all but the grid's keys and the cell's folder), as JSON
    values: compared as values, so ``lr=.01`` is ``lr=0.01``, and an edited config file is seen."""
    values = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return {k: v for k, v in values.items() if k not in grid and k not in ("out", "progress")}


def _claim(out: Path, shared: dict) -> None:
    """Record the settings every cell of the grid in ``out`` shares (grid.json), or refuse settings other
    than those its finished and unfinished cells were trained with: their results would be mixed."""
    from .weights import atomic_write
    path = out / "grid.json"
    try:
        recorded = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        recorded = None  # unreadable: rewritten below
    if isinstance(recorded, dict) and "settings" not in recorded:  # an older convmixer's: not comparable
        raise ConfigError(f"{out} holds a grid an older convmixer trained, whose settings cannot be compared: use "
                          f"another --out, or delete {out} to start over")
    before = recorded.get("settings") if isinstance(recorded, dict) else None
    if isinstance(before, dict) and before != shared:
        key = next(k for k in sorted(set(before) | set(shared), key=str) if before.get(k) != shared.get(k))
        raise ConfigError(f"{out} holds a grid trained with {key}={before.get(key)} (now {shared.get(key)}): use "
                          f"another --out, or delete {out} to start over")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({"settings": shared}, indent=2)))


def _read_cell(path: Path) -> dict | None:
    """A finished cell's record; None when there is none, or it is unreadable (the cell is rerun)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("val_top1"), (int, float)) else None


def write_report(results: list[dict], out: Path, grid: dict):
    keys = list(grid)
    lines = ["| " + " | ".join(keys) + " | val top-1 (%) | params | img/s | minutes |",
             "|" + " --- |" * (len(keys) + 4)]
    for r in results:
        lines.append("| " + " | ".join(str(r["cell"][k]) for k in keys) +
                     f" | {100 * r['val_top1']:.2f} | {r['params'] / 1e6:.3f}M | {r['images_per_second']:.0f} | "
                     f"{r['seconds'] / 60:.1f} |")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in results]
    from .viz import pyplot, save_figure
    from .weights import atomic_write
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    fig, ax = pyplot().subplots(figsize=(max(6, 0.7 * len(results) + 2), 4.5))
    names = [r["name"].replace(",", "\n") for r in results]
    values = [100 * r["val_top1"] for r in results]
    bars = ax.bar(range(len(results)), values, color="tab:blue")
    for bar, v, r in zip(bars, values, results):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.1f}\n{r['images_per_second']:.0f}/s", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(range(len(results)), names, fontsize=7)
    low = min(values)
    ax.set_ylim(max(0, low - 10), min(100, max(values) + 5))
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("ablation (bar labels: top-1 %, training img/s)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "results.png")
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))


def cmd_ablate(args):
    from .config import parse_overrides
    grid = parse_grid(args.grid)
    results = run_grid(args.config, grid, args.out, parse_overrides(args.set or []), full=args.full)
    print((Path(args.out) / "results.md").read_text() if results else "no cell finished")
    return 0


def add_parser(sub):
    p = sub.add_parser("ablate", help="a resumable grid of short trainings; Markdown table + bar chart",
                       description="Train one model per combination of the --grid values. Reduced budget by "
                                   f"default ({', '.join(f'{k}={v}' for k, v in REDUCED.items())}); --full uses "
                                   "the config's own. Finished cells are not rerun. Switches for the paper's "
                                   f"ablations: {', '.join(SWITCHES)} (e.g. --grid residual norm).")
    p.add_argument("--config", default=None, help="base config (file or shipped name)")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="e.g. kernel_size=3,5,7,9 patch_size=1,2,4, or a switch name")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="fixed overrides for every cell")
    p.add_argument("--out", default="runs/ablation", help="folder of the grid: one run per cell, results.md and results.png")
    p.add_argument("--full", action="store_true", help="the config's full budget instead of the reduced one")
    p.set_defaults(func=cmd_ablate)
