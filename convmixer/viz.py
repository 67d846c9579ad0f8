"""``convmixer viz``: pictures of what a model learned and how its training went (matplotlib PNGs)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import ConfigError
from .run import CHECKPOINT_HELP, read_metrics


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def check_figure_path(path, overwrite: bool = True, flag: str = "") -> Path:
    """A file name matplotlib can write (by its suffix) and that is not a folder, in a place we may write, and
    (unless ``overwrite``) not an existing file: checked before any work."""
    from matplotlib.backend_bases import FigureCanvasBase
    from .weights import check_new_file
    path, formats = Path(path), FigureCanvasBase.get_supported_filetypes()
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give a file name, e.g. {path / 'confusion.png'}")
    if path.suffix.lower().lstrip(".") not in formats:
        raise ConfigError(f"{path}: end the file name with .png (or .{', .'.join(sorted(formats))})")
    return check_new_file(path, overwrite, flag or "the picture")


def save_figure(fig, path, **kwargs) -> None:
    """Write and close a figure; written to a temporary file renamed into place, so an existing picture is
    replaced whole or not at all."""
    from .weights import atomic_write
    path = check_figure_path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lower().lstrip("."), dpi=120, **kwargs))
    pyplot().close(fig)


def _grid(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def plot_patch_filters(model, path, max_filters: int = 256):
    """The patch-embedding filters (h x C x p x p): RGB images for 3-channel input, grey otherwise,
    each scaled to its own range."""
    plt = pyplot()
    w = model.stem[0].weight.detach().float().cpu()[:max_filters]
    rows, cols = _grid(len(w))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.45 + 0.5, rows * 0.45 + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, f in zip(axes.flat, w):
        f = (f - f.min()) / (f.max() - f.min() + 1e-12)
        if f.shape[0] == 3:
            ax.imshow(f.permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            ax.imshow(f[0].numpy(), cmap="gray", interpolation="nearest")
    fig.suptitle(f"patch-embedding filters ({w.shape[2]}x{w.shape[3]}, first {len(w)} of {model.dim})")
    fig.tight_layout()
    save_figure(fig, path)


def plot_depthwise_kernels(model, path, layers=None, max_kernels: int = 64):
    """The depthwise k x k kernels of chosen layers side by side (diverging colour map centred on
    zero), to see them go from local to spread-out with depth as the paper shows."""
    plt = pyplot()
    depth = model.depth
    layers = layers or sorted({0, depth // 2, depth - 1})
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 4.6), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        w = model.blocks[layer][0].fn[0].weight.detach().float().cpu()[:max_kernels, 0]
        rows, cols = _grid(len(w))
        k = w.shape[-1]
        canvas = torch.full((rows * (k + 1) - 1, cols * (k + 1) - 1), float("nan"))
        for i, kern in enumerate(w):
            r, c = divmod(i, cols)
            canvas[r * (k + 1):r * (k + 1) + k, c * (k + 1):c * (k + 1) + k] = kern / (kern.abs().max() + 1e-12)
        im = ax.imshow(canvas.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(f"layer {layer + 1}/{depth}")
        ax.axis("off")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.7, label="weight / max |weight| per kernel")
    fig.suptitle(f"depthwise {model.kernel_size}x{model.kernel_size} kernels (first {max_kernels} channels)")
    save_figure(fig, path, bbox_inches="tight")


def plot_curves(runs: dict, path):
    """Loss, top-1 and learning rate against epoch; several runs overlaid."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, records in runs.items():
        epochs = [r["epoch"] for r in records]
        line, = axes[0].plot(epochs, [r["train_loss"] for r in records], label=f"{name} train")
        if any("val_loss" in r for r in records):
            axes[0].plot([r["epoch"] for r in records if "val_loss" in r],
                         [r["val_loss"] for r in records if "val_loss" in r], "--", color=line.get_color(),
                         label=f"{name} val")
        axes[1].plot(epochs, [100 * r["train_acc"] for r in records], color=line.get_color(), label=f"{name} train")
        if any("val_top1" in r for r in records):
            axes[1].plot([r["epoch"] for r in records if "val_top1" in r],
                         [100 * r["val_top1"] for r in records if "val_top1" in r], "--", color=line.get_color(),
                         label=f"{name} val")
        axes[2].plot(epochs, [r["lr"] for r in records], color=line.get_color(), label=name)
    for ax, title, ylabel in zip(axes, ("loss", "top-1 accuracy", "learning rate (end of epoch)"),
                                 ("cross-entropy", "%", "lr")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(confusion, classes, path):
    plt = pyplot()
    import numpy as np
    m = np.asarray(confusion, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(classes)
    side = min(0.55 * n, 18)  # 1000 classes (ImageNet) in 20 inches: cells, no names
    fig, ax = plt.subplots(figsize=(max(5, side + 2), max(4.5, side + 1.5)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 50:
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    ax.set_title(f"confusion matrix (top-1 {100 * np.trace(m) / max(m.sum(), 1):.2f}%)")
    fig.tight_layout()
    save_figure(fig, path)


def cmd_viz(args):
    from .run import resolve_weights
    out = Path(args.out)
    if args.confusion and not args.checkpoint:
        raise ConfigError("--confusion evaluates a model: pass --checkpoint too")
    runs = list(args.runs or [])
    if args.checkpoint and not runs:  # a run's weights (or its folder): its own curves too
        source = resolve_weights(args.checkpoint)
        if source.is_file() and (source.parent / "metrics.jsonl").is_file():
            runs = [str(source.parent)]
    planned = (["patch_filters.png", "depthwise_kernels.png"] if args.checkpoint else []) + \
        (["confusion.png"] if args.confusion else []) + (["curves.png"] if runs else [])
    if not planned:
        raise ConfigError("nothing to draw: pass --checkpoint and/or --runs")
    for name in planned:  # before any work: a picture already there is replaced only with --overwrite
        check_figure_path(out / name, args.overwrite, "--out")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.checkpoint:
        from .run import load_model
        model, info = load_model(args.checkpoint)
        layers = _layers(args.layers, model.depth)
        plot_patch_filters(model, out / "patch_filters.png")
        plot_depthwise_kernels(model, out / "depthwise_kernels.png", layers)
        written += ["patch_filters.png", "depthwise_kernels.png"]
        if args.confusion:
            from .evaluate import evaluate, load_eval_data
            data, _, _ = load_eval_data(info, args.dataset, args.data_dir, args.split)
            result = evaluate(model.to(memory_format=torch.channels_last), data, info)
            plot_confusion(result["confusion"], info.classes, out / "confusion.png")
            written.append("confusion.png")
    if runs:
        names = [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
        names = [name if names.count(name) == 1 else r for name, r in zip(names, runs)]  # a/x and b/x: both
        plot_curves({name: read_metrics(r) for name, r in zip(names, runs)}, out / "curves.png")
        written.append("curves.png")
    for name in written:
        print(out / name)
    return 0


def _layers(text: str | None, depth: int) -> list[int] | None:
    """--layers "1,4,8" as 0-based block indices (None: the default choice)."""
    if not text:
        return None
    try:
        layers = [int(i) - 1 for i in text.split(",")]
    except ValueError:
        raise ConfigError(f"--layers {text!r}: give 1-based block numbers separated by commas, e.g. 1,4,8") from None
    if not all(0 <= i < depth for i in layers):
        raise ConfigError(f"--layers must be between 1 and {depth}")
    return layers


def add_parser(sub):
    p = sub.add_parser("viz", help="PNGs: patch-embedding filters, depthwise kernels, curves, confusion matrix")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace the PNGs of the same names already in --out")
    p.add_argument("--layers", default=None, help="depthwise layers to show, 1-based, e.g. 1,4,8 (default: first, middle, last)")
    p.add_argument("--runs", nargs="*", help="run folders (or metrics.jsonl files) whose curves to overlay")
    p.add_argument("--confusion", action="store_true", help="also evaluate and draw the confusion matrix")
    p.add_argument("--dataset", default=None, help="with --confusion: default: the one the checkpoint was trained on")
    p.add_argument("--data-dir", default=None, help="with --confusion: where the data set lies (default: the run's)")
    p.add_argument("--split", choices=("val", "test", "train"), default=None, help="with --confusion: the split to evaluate")
    p.set_defaults(func=cmd_viz)
