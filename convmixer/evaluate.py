"""Evaluation (top-1/top-5, per-class accuracy, confusion matrix) and prediction on image files."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import ImageData, decode, eval_batches, eval_transform, load_dataset, split_train_val
from .errors import ConfigError, DataError
from .model import ConvMixer
from .run import RunInfo


def info_transform(info: RunInfo):
    return eval_transform(info.img_size, info.crop_pct, info.mean, info.std, info.interpolation)


def translate(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """The batch with its content moved dx pixels right and dy down, borders reflected (|dx|, |dy| < the sides)."""
    s = max(abs(dx), abs(dy))
    if s == 0:
        return images
    padded = F.pad(images, (s,) * 4, mode="reflect")
    h, w = images.shape[-2:]
    return padded[..., s - dy:s - dy + h, s - dx:s - dx + w]


def _shifted(images: torch.Tensor, shift: int, channels_last: bool) -> list[torch.Tensor]:
    """The batch translated by (+shift, +shift) and (-shift, -shift) pixels, borders reflected."""
    if shift <= 0:
        return []
    shift = min(shift, images.shape[-1] - 1, images.shape[-2] - 1)
    views = [translate(images, shift, shift), translate(images, -shift, -shift)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [v.contiguous(memory_format=fmt) for v in views]


@contextmanager
def eval_mode(model: torch.nn.Module, device=None):
    """``model`` in eval mode (and on ``device``) for the block; afterwards, an error included, back in the
    caller's mode (and on the caller's device)."""
    if not isinstance(model, torch.nn.Module):  # an ONNX file's session: no mode or device to restore
        yield model.eval()
        return
    first = next(model.parameters(), None)
    was_training, was_on = model.training, first.device if first is not None else None
    model.eval()
    if device is not None:
        model.to(device)
    try:
        yield model
    finally:
        model.train(was_training)
        if device is not None and was_on is not None:
            model.to(was_on)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ImageData, info: RunInfo, batch_size: int = 256, device="cpu",
             amp: torch.dtype | None = None, channels_last: bool = True, tta_flip: bool = False,
             workers: int = 0, tta_shift: int = 0, skip_bad_images: bool = False, distributed: bool = False) -> dict:
    """Loss, top-1, top-5, per-class accuracy and the confusion matrix (rows: true class).

    Test-time augmentation averages the logits of several views: with ``tta_flip`` each view and its
    mirror, with ``tta_shift=s`` also the image translated by (+s, +s) and (-s, -s) pixels (reflected
    border), so 1, 2, 3 or 6 views in all. With ``skip_bad_images`` unreadable files are left out of
    every figure and counted in ``skipped``. With ``distributed`` (every process of an initialised process
    group calls it) each process evaluates every world-th image from its rank, with rank 0's buffers (its
    BatchNorm statistics: the weights it saves), and all return the figures of the whole set.
    """
    if tta_shift < 0:
        raise ConfigError(f"tta_shift must be 0 (off) or a number of pixels, got {tta_shift}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    device = torch.device(device)
    num_classes = len(info.classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, top5, n = 0.0, 0, 0
    distributed = distributed and dist.is_initialized()
    if distributed:
        _use_rank_0_buffers(model)
    share = _share(data) if distributed else data
    with eval_mode(model):
        for images, labels in eval_batches(share, batch_size, info_transform(info), workers, skip_bad_images):
            images = images.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                views = [images] + _shifted(images, tta_shift, channels_last)
                if tta_flip:
                    views += [v.flip(-1) for v in views]
                logits = sum(model(v).float() for v in views) / len(views)
            logits, labels = logits.cpu(), labels.cpu()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            k = min(5, num_classes)
            top5 += (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).sum().item()
            confusion += torch.bincount(labels * num_classes + logits.argmax(-1),
                                        minlength=num_classes ** 2).view(num_classes, num_classes)
            n += len(labels)
    if distributed:
        loss_sum, top5, n, confusion = _added_up(loss_sum, top5, n, confusion, device)
    if n == 0:
        raise DataError("the evaluation set is empty" + (" (no image was readable)" if len(data) else "") +
                        ": point --data-dir/--split at images")
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1).float()).tolist()
    return {"top1": confusion.diag().sum().item() / n, "top5": top5 / n, "loss": loss_sum / n, "n": n,
            "skipped": len(data) - n + data.dropped,
            "per_class": dict(zip(info.classes, per_class)), "confusion": confusion.tolist()}


def _use_rank_0_buffers(model: torch.nn.Module) -> None:
    """Each process's BatchNorm statistics drifted from the others' in training: rank 0's (the weights it saves)
    are made every process's."""
    if isinstance(model, torch.nn.Module):  # not an ONNX file's session
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def _share(data: ImageData) -> ImageData:
    """This process's share of a distributed evaluation: every world-th image from its rank."""
    return data.subset(torch.arange(len(data))[dist.get_rank()::dist.get_world_size()])  # empty past the end


def _added_up(loss_sum: float, top5: int, n: int, confusion: torch.Tensor, device: torch.device):
    """The sums of every process's share (reduced on the device: NCCL reduces GPU tensors only)."""
    sums = torch.tensor([loss_sum, top5, n], dtype=torch.float64, device=device)
    confusion = confusion.to(device)
    dist.all_reduce(sums)
    dist.all_reduce(confusion)
    return sums[0].item(), int(sums[1].item()), int(sums[2].item()), confusion.cpu()


def load_eval_data(info: RunInfo, dataset=None, data_dir=None, split=None, val_split=None,
                   skip_bad_images=False) -> tuple[ImageData, str, str]:
    """The images to evaluate a run's model on, and the name of the split. Defaults come from the run's
    config: its data set and folder, and the split it validated on: the same seeded split of the
    training set when it carved one, else the data set's own (an image folder's val/ or test/)."""
    from .config import check_val_split
    check_val_split("--val-split", val_split)
    cfg = info.config
    dataset = dataset or info.dataset or cfg.get("dataset")
    if not dataset:
        raise ConfigError("this model does not say which data it was trained on: pass --dataset and --data-dir")
    data_dir = os.path.expanduser(data_dir or cfg.get("data_dir", "data"))
    # the run's held-out split is only meaningful on the run's own data; --val-split N asks for one anyway
    trained_on = Path(os.path.expanduser(cfg.get("data_dir", "data"))).resolve()
    same_data = dataset == cfg.get("dataset") and Path(data_dir).resolve() == trained_on
    carved = val_split if val_split is not None else ((cfg.get("val_split") or 0) if same_data else 0)
    folders = [s for s in ("val", "test") if dataset == "imagefolder" and (Path(data_dir) / s).is_dir()]
    split = split or ("val" if carved or folders[:1] == ["val"] else "test")
    if split == "val" and not carved and dataset != "imagefolder":  # it would silently be the test split
        why = "this run carved no validation split" if same_data else "on other data than the run's there is no split"
        raise ConfigError(f"{why} to evaluate as val: pass --split test, or --val-split N to carve N seeded "
                          f"training images of {dataset}")
    kwargs = dict(img_size=info.img_size, download=False, skip_bad_images=skip_bad_images)
    if split == "val" and carved:
        data = split_train_val(load_dataset(dataset, data_dir, train=True, **kwargs), carved,
                               seed=cfg.get("seed", 0))[1]
        split = f"val (seeded {len(data)} of the training split)"
    elif split == "train":
        data = load_dataset(dataset, data_dir, train=True, **kwargs)
    else:  # the data set's own held-out split; an image folder's val/ or test/ as asked
        data = load_dataset(dataset, data_dir, train=False, prefer=split, **kwargs)
        if folders:
            split = split if split in folders else folders[0]
    data = data.with_channels(info.model_args.get("in_chans", 3))  # e.g. an MNIST model on a folder of digits
    if list(data.classes) != list(info.classes):
        raise DataError(f"the data's classes {data.classes[:4]}... differ from the checkpoint's {info.classes[:4]}...: "
                        f"use a folder with the same class names")
    return data, dataset, split


def image_files(paths: list[str]) -> list[str]:
    """The image files named, and those inside the folders named (recursively, sorted)."""
    from .data import IMAGE_SUFFIXES
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            out.append(str(p))
    if not out:
        raise DataError(f"no image files in {', '.join(paths)}")
    return out


def _image_channels(model) -> int:
    """The channels image files are read with for ``model``: 1 (grayscale) or 3 (RGB); image files have no
    other kind, so a model that takes 2 or 4 channels is refused in one line."""
    channels = getattr(model, "in_chans", 3)
    if channels not in (1, 3):
        raise ConfigError(f"this model takes {channels}-channel input, and image files are read as RGB or "
                          f"grayscale: call the model from Python on tensors you build")
    return channels


@torch.no_grad()
def embed(model: ConvMixer, info: RunInfo, files: list[str], batch_size: int = 64) -> torch.Tensor:
    """Pooled features (the classifier's input, N x dim) of image files, preprocessed as for evaluation."""
    transform, channels = info_transform(info), _image_channels(model)
    out = []
    with eval_mode(model):
        for start in range(0, len(files), batch_size):
            x = torch.stack([transform(decode(f, channels)) for f in files[start:start + batch_size]])
            features = model.forward_head(model.forward_features(x), pre_logits=True)
            out.append(features.mean((2, 3)) if features.ndim == 4 else features)  # global_pool "": pooled here
    return torch.cat(out)


@torch.no_grad()
def predict(model: ConvMixer, info: RunInfo, files: list[str], top_k: int = 5, device="cpu",
            skip_bad_images: bool = False) -> list[dict]:
    """Top-k classes with probabilities for image files of any size and mode: one {file, top} per file. With
    ``skip_bad_images`` an unreadable file gets {file, error} and the others are still predicted."""
    if top_k < 1:
        raise ConfigError(f"top-k must be at least 1, got {top_k}")
    if not info.classes or getattr(model, "num_classes", len(info.classes)) == 0:
        raise ConfigError("this model has no classifier (num_classes 0): `convmixer embed` gives its features")
    transform, channels = info_transform(info), _image_channels(model)
    results = []
    with eval_mode(model, device):
        for f in files:
            try:
                x = transform(decode(f, channels)).unsqueeze(0).to(device)
            except DataError as e:
                if not skip_bad_images:
                    raise DataError(f"{e}; pass --skip-bad-images to report it and predict the others") from None
                results.append({"file": str(f), "error": str(e)})
                continue
            probs = model(x).softmax(-1)[0].cpu()
            p, idx = probs.topk(min(top_k, len(probs)))
            results.append({"file": str(f), "top": [{"class": info.classes[i], "index": i, "probability": v}
                                                    for v, i in zip(p.tolist(), idx.tolist())]})
    return results
