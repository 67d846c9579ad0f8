"""A training run's folder and every file in it: one owner for each format.

    <out>/config.yaml        the resolved settings           (write_config / read by --resume via last.pt)
    <out>/metrics.jsonl      one JSON line per epoch          (append_metrics, read_metrics, truncate_metrics)
    <out>/last.pt            everything needed to resume      (save_checkpoint, load_checkpoint)
    <out>/*.safetensors      weights + RunInfo metadata       (save_run_weights, load_model)
    <out>/summary.json       the final summary                (write_summary)
    <out>/.lock              held while a process trains here (RunFolder)

``RunInfo`` is what a model needs beside its weights to be used (architecture, classes,
preprocessing); checkpoints and weight files carry it, and eval/predict/viz/export read it back.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import RANGES, TrainConfig
from .errors import TrainingError, WeightsError
from .weights import (atomic_write, decode_metadata, load_into, read_metadata, read_state_dict, save_weights,
                      shipped_weights, torch_load_safely)

CHECKPOINT_HELP = ("a run folder (its model.safetensors), a run's model.safetensors / best.safetensors / last.pt, "
                   "weights saved with convmixer.save_weights, shipped weights (cifar10, fashion_mnist), or a "
                   "variant name with released weights (e.g. convmixer_768_32)")
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.safetensors", "model.safetensors", "summary.json")
# what a file's metadata may ask us to build (a 25 KB file must not make us allocate 160 GB)
LIMITS = {**{k: int(RANGES[k][1]) for k in ("dim", "depth", "kernel_size", "patch_size", "img_size")},
          "in_chans": 64, "num_classes": 100_000}


# --- what a model needs beside its weights ----------------------------------------------------------
@dataclass
class RunInfo:
    model_args: dict                 # ConvMixer(**model_args) builds the architecture
    classes: list[str]
    mean: list[float]
    std: list[float]
    img_size: int
    crop_pct: float                  # evaluation: resize to img_size / crop_pct, centre-crop img_size
    model_name: str = ""
    interpolation: str = "bilinear"  # of that resize: "bicubic" for the released ImageNet weights (timm's)
    dataset: str = ""
    config: dict = field(default_factory=dict)  # the training config, when a run made it

    def to_metadata(self, metrics: dict | None = None) -> dict[str, str]:
        """safetensors metadata (string values)."""
        return {"model_args": json.dumps(self.model_args), "model_name": self.model_name,
                "classes": json.dumps(self.classes), "mean": json.dumps(self.mean), "std": json.dumps(self.std),
                "img_size": str(self.img_size), "crop_pct": str(self.crop_pct), "dataset": self.dataset,
                "interpolation": self.interpolation,
                "config": json.dumps(self.config), "metrics": json.dumps(metrics or {})}

    @classmethod
    def from_dict(cls, d: dict, source) -> "RunInfo":
        """From a checkpoint's entries or decoded metadata; older files lack crop_pct (taken from config)."""
        names = [f.name for f in dataclasses.fields(cls)]
        values = {k: d[k] for k in names if k in d}
        shapes = {"model_args": dict, "config": dict, "classes": list, "mean": list, "std": list}
        wrong = [k for k, kind in shapes.items() if k in values and not isinstance(values[k], kind)]
        wrong += [k for k in ("mean", "std") if k in values and isinstance(values[k], list) and not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in values[k])]
        if wrong:
            raise WeightsError(f"{source} has a malformed model description ({', '.join(wrong)}): re-export it "
                               f"with convmixer")
        values.setdefault("crop_pct", values.get("config", {}).get("crop_pct", TrainConfig.crop_pct))
        try:
            info = cls(**values)
            info.classes = [str(c) for c in info.classes]
            info.img_size, info.crop_pct = int(info.img_size), float(info.crop_pct)
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{source} has an incomplete or malformed model description ({e}): "
                               f"re-export it with convmixer") from None
        info.check(source)
        return info

    @classmethod
    def from_metadata(cls, meta: dict, source) -> "RunInfo":
        """From safetensors metadata: a run's weights, or weights saved by ``convmixer.save_weights``
        (architecture only: classes are numbered and preprocessing is the variant's, if named)."""
        if "model_args" not in meta:
            raise WeightsError(f"{source} has no model description in its metadata (not written by convmixer): "
                               f"build the model with convmixer.create_model and load it with load_weights")
        d = decode_metadata(meta, source)
        if not isinstance(d["model_args"], dict):
            raise WeightsError(f"{source}: model_args must be a mapping, got {type(d['model_args']).__name__}")
        if "classes" not in d:
            d.update(_variant_preprocessing(d.get("model_name", ""), d["model_args"]))
        return cls.from_dict(d, source)

    def check(self, source):
        args = self.model_args
        if not isinstance(args, dict):
            raise WeightsError(f"{source}: model_args must be a mapping, got {type(args).__name__}")
        for key, limit in LIMITS.items():
            value = self.img_size if key == "img_size" else args.get(key, 1)
            if not isinstance(value, int) or isinstance(value, bool) or not (0 if key == "num_classes" else 1) <= value <= limit:
                raise WeightsError(f"{source}: {key}={value!r} is outside 1..{limit}: the file is corrupt or not "
                                   f"a convmixer model")
        from .model import ACTIVATIONS, NORMS
        kinds = {"act_layer": lambda v: v in ACTIVATIONS, "norm_layer": lambda v: v in NORMS,
                 "residual": lambda v: isinstance(v, bool), "fast": lambda v: isinstance(v, bool),
                 "drop_rate": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                 "global_pool": lambda v: v in ("avg", "")}
        unknown = sorted(set(args) - set(LIMITS) - set(kinds) - {"img_size"})
        wrong = [k for k, ok in kinds.items() if k in args and not ok(args[k])]
        if unknown or wrong:
            raise WeightsError(f"{source}: model_args has {'unknown keys ' + ', '.join(unknown) if unknown else ''}"
                               f"{'; ' if unknown and wrong else ''}{'bad values for ' + ', '.join(wrong) if wrong else ''}"
                               f": the file is corrupt or not a convmixer model")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise WeightsError(f"{source}: interpolation={self.interpolation!r} is not bilinear or bicubic")
        if not 0 < self.crop_pct <= 1:
            raise WeightsError(f"{source}: crop_pct={self.crop_pct} is outside (0, 1]")
        if len(self.classes) != args.get("num_classes", len(self.classes)):
            raise WeightsError(f"{source} names {len(self.classes)} classes for a {args.get('num_classes')}-class "
                               f"head: the file is inconsistent")
        channels = args.get("in_chans", 3)
        if len(self.mean) != channels or len(self.std) != channels or min(self.std) <= 0:
            raise WeightsError(f"{source}: mean/std must have {channels} entries with std > 0")


def _variant_preprocessing(model_name: str, model_args: dict) -> dict:
    from .model import VARIANTS, stats_for_channels
    v = VARIANTS.get(model_name)
    # a value out of bounds is refused by RunInfo.check afterwards; here it only must not crash
    sane = {k: model_args.get(k, d) if isinstance(model_args.get(k, d), int) and 0 <= model_args.get(k, d) <= LIMITS[k]
            else d for k, d in (("in_chans", 3), ("num_classes", 0))}
    channels = sane["in_chans"] or 3
    mean, std = stats_for_channels(v.mean, v.std, channels) if v else ([0.5] * channels, [0.5] * channels)
    return dict(classes=[str(i) for i in range(sane["num_classes"])], mean=mean, std=std,
                img_size=v.input_size if v else 224, crop_pct=v.crop_pct if v else TrainConfig.crop_pct,
                interpolation="bicubic" if v and v.url else "bilinear")


def check_shapes(args: dict, state: dict, source):
    """The architecture the metadata describes against the tensors actually in the file, before
    anything is built."""
    from .model import ConvMixer
    from .weights import checkpoint_filter_fn, describe_mismatch
    state = checkpoint_filter_fn(state)  # as load_into reads it: a training checkpoint's "model", DDP prefixes
    stem = state.get("stem.0.weight")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    dw = state.get("blocks.0.0.fn.0.weight")
    expect = {"dim": stem.shape[0] if stem is not None else None,
              "in_chans": stem.shape[1] if stem is not None else None,
              "patch_size": stem.shape[-1] if stem is not None else None, "depth": depth,
              "kernel_size": dw.shape[-1] if dw is not None else None}
    wrong = [f"{k}={args.get(k)} but the tensors say {v}" for k, v in expect.items()
             if v is not None and args.get(k, 3 if k == "in_chans" else None) != v]
    if stem is None or wrong:
        raise WeightsError(f"{source}: its metadata does not match its tensors "
                           f"({'; '.join(wrong) or 'no stem.0.weight'}): the file is corrupt")
    # then every tensor, against a model built on the meta device (no memory): values each within LIMITS can
    # still multiply to 100 GB (dim 8192, depth 256, kernel 63), which the file's few tensors must not order
    with torch.device("meta"):
        skeleton = ConvMixer(**args)
    mismatch = describe_mismatch(skeleton, state)
    if mismatch:
        raise WeightsError(f"{source}: its metadata does not match its tensors ({mismatch}): the file is corrupt")


def resolve_weights(path: str | Path) -> Path:
    """A weights file from what a user may name: a file, a run folder (its final, best or last
    weights), or shipped weights by name."""
    path = Path(path)
    holds_weights = path.is_file() or any((path / n).is_file() for n in ("model.safetensors", "best.safetensors",
                                                                         "last.pt"))
    if shipped_weights(str(path)) is not None and not holds_weights:  # e.g. a data folder named cifar10
        return shipped_weights(str(path))
    if path.is_dir():
        found = next((path / n for n in ("model.safetensors", "best.safetensors", "last.pt") if (path / n).is_file()),
                     None)
        if found is None:
            raise WeightsError(f"{path} is a folder without model.safetensors, best.safetensors or last.pt: "
                               f"point at a run folder or a weights file")
        return found
    return path


def load_model(path: str | Path):
    """A model (eval mode) and its RunInfo (classes, preprocessing) from a run folder, a run's weights
    (.safetensors), a training checkpoint (.pt), weights saved with ``convmixer.save_weights``, shipped
    weights by name (``cifar10``), or the name of a variant with released weights (downloaded once;
    predicted with the variant's own preprocessing)."""
    from .model import VARIANTS, ConvMixer, create_model, input_cfg
    path = resolve_weights(path)
    if not path.exists() and str(path) in VARIANTS and VARIANTS[str(path)].url:  # released weights by name
        model = create_model(str(path), pretrained=True)
        return model.eval(), RunInfo(model_args=model.model_args, model_name=str(path),
                                     **_variant_preprocessing(str(path), model.model_args))
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        info = RunInfo.from_metadata(read_metadata(path), path)
        state = read_state_dict(path)
    else:
        ckpt = torch_load_safely(path, WeightsError)
        if not is_training_checkpoint(ckpt):
            raise WeightsError(f"{path} holds weights without their architecture and classes: name a variant with "
                               f"released weights instead (e.g. --checkpoint convmixer_768_32), or save the model with "
                               f"convmixer.save_weights(model, 'model.safetensors')")
        info, state = RunInfo.from_dict(ckpt, path), ckpt["model"]
    check_shapes(info.model_args, state, path)
    model = ConvMixer(**info.model_args)
    load_into(model, state, strict=True, source=str(path))
    model.pretrained_cfg = input_cfg(model, info.img_size, info.interpolation, info.mean, info.std, info.crop_pct,
                                     label_names=info.classes)
    return model.eval(), info


def save_run_weights(model: torch.nn.Module, path: Path, info: RunInfo, record: dict | None = None):
    try:
        save_weights(model, path, info.to_metadata(record))
    except (OSError, RuntimeError) as e:
        raise write_error(path, e, _tensor_bytes(model.state_dict())) from e


# --- checkpoints ------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict):
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise write_error(path, e, _tensor_bytes(state)) from e


RESUME_SECTIONS = ("optimizer", "rng", "epoch", "batch_in_epoch", "step", "best", "classes")


def is_training_checkpoint(obj) -> bool:
    """Whether a loaded .pt file is a run's checkpoint (weights, architecture and config), not bare weights."""
    return isinstance(obj, dict) and all(isinstance(obj.get(k), dict) for k in ("model", "model_args", "config"))


def load_checkpoint(path: str | Path, for_resume: bool = False) -> dict:
    """A training checkpoint; ``for_resume`` also requires everything a resumed run restores."""
    path = Path(path)
    if path.is_dir():
        raise TrainingError(f"{path} is a run folder, not a checkpoint: pass its checkpoint, --resume {path / 'last.pt'}")
    if not path.is_file():
        raise TrainingError(f"checkpoint not found: {path}")
    ckpt = torch_load_safely(path, TrainingError)
    if not is_training_checkpoint(ckpt):
        raise TrainingError(f"{path} is not a convmixer training checkpoint (<out>/last.pt); weights files go to "
                            f"eval/predict, or start a new run from them with --pretrained {path}")
    missing = [k for k in RESUME_SECTIONS if k not in ckpt] if for_resume else []
    if missing:
        raise TrainingError(f"{path} lacks {', '.join(missing)}, so its run cannot be resumed: start a new run "
                            f"with --pretrained {path}")
    return ckpt


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 64


def write_error(path: Path, error: BaseException, need: int) -> TrainingError:
    """One line for a failed write: the file, why, the space free and needed; nothing was replaced."""
    reason = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2 ** 20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return TrainingError(f"could not write {path} ({reason}; {free}, about {need / 2 ** 20:.1f} MiB needed); "
                         f"the previous file is intact: free space or fix permissions, then --resume "
                         f"{path.parent / 'last.pt'}")


# --- metrics.jsonl ---------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict]:
    """The epoch records of a run (its folder or its metrics.jsonl); a line cut short by a crash is
    ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise TrainingError(f"no metrics file at {path}: pass a run folder or its metrics.jsonl")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def append_metrics(path: Path, record: dict):
    line = json.dumps(record) + "\n"
    try:
        with open(path, "a") as f:
            f.write(line)
    except OSError as e:
        raise write_error(path, e, len(line)) from e


def truncate_metrics(path: Path, epoch: int, record: dict | None = None):
    """On resume: drop the lines the resumed run will write again (and a cut-short line), and restore
    the checkpoint's own last record if a failed write lost it."""
    keep = [r for r in read_metrics(path) if r["epoch"] <= epoch] if path.exists() else []
    if record and record.get("epoch") == epoch and (not keep or keep[-1]["epoch"] < epoch):
        keep.append(record)
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in keep)))


def write_summary(path: Path, summary: dict):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))


def write_config(path: Path, config: dict):
    import yaml
    atomic_write(path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(config, sort_keys=False)))


# --- the folder ---------------------------------------------------------------------------------------
class RunFolder:
    """Exclusive use of a run folder. ``open`` refuses a folder that another process is training in
    (the lock names its pid and host; the kernel drops it when that process dies, kill -9 included),
    refuses to start a new run over an existing one unless ``overwrite`` (the old run is then deleted by
    ``clear_replaced`` once the new one has started), and removes temporaries that a killed write of a
    run file left behind."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = None
        self.replaced: list[str] = []

    def open(self, resume: bool, overwrite: bool = False) -> "RunFolder":
        import fcntl
        if self.path.exists() and not self.path.is_dir():
            raise TrainingError(f"--out {self.path} is a file, not a folder: choose another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / ".lock", "a+")
        except OSError as e:
            raise TrainingError(f"cannot create the run folder {self.path} ({e.strerror}): choose another --out "
                                f"or fix its permissions") from e
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise TrainingError(f"{self.path} is in use by a running training ({holder}): wait for it, stop it, "
                                f"or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        self._lock = lock
        try:
            self._prepare(resume, overwrite)
        except BaseException:
            self.close()
            raise
        return self

    def _prepare(self, resume: bool, overwrite: bool):
        names = RUN_FILES + ("epoch_*.pt", "tensorboard")
        for name in names:  # temporaries left by a write that was killed (we hold the lock); no other file
            for tmp in self.path.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        if resume:
            return
        existing = [found for pattern in names for found in sorted(p.name for p in self.path.glob(pattern))]
        if existing and not overwrite:
            hint = (f"continue it with --resume {self.path / 'last.pt'}, " if (self.path / "last.pt").exists() else "")
            raise TrainingError(f"{self.path} already holds a run ({', '.join(existing[:4])}): {hint}choose another "
                                f"--out, or pass --overwrite to replace it")
        self.replaced = existing  # deleted by clear_replaced once the new run has started (data, model)

    def clear_replaced(self):
        """Delete the run that --overwrite replaces: called once the new run has built its data and model,
        so a new run that fails to start (a typo in --data-dir) leaves the old one as it was."""
        for name in self.replaced:
            path = self.path / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self.replaced = []

    def close(self):
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None
            if [p.name for p in self.path.iterdir()] == [".lock"]:  # a run that wrote nothing leaves nothing
                (self.path / ".lock").unlink(missing_ok=True)
                try:
                    self.path.rmdir()
                except OSError:
                    pass
