"""Training configuration: one flat dataclass, read from YAML/TOML plus command-line overrides.
Unknown keys, wrong types and impossible values are rejected before any work starts."""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# what --resume may change: how the run is executed and logged, and its length (epochs down to those done,
# time_limit upwards)
RESUME_MUTABLE = ("epochs", "time_limit", "workers", "progress", "tensorboard", "save_every", "eval_every",
                  "data_dir", "download", "cache", "compile", "grad_checkpointing")


@dataclass
class TrainConfig:
    # model: a named variant, optionally changed
    model: str = "convmixer_256_8"
    dim: int | None = None
    depth: int | None = None
    kernel_size: int | None = None
    patch_size: int | None = None
    activation: str | None = None        # gelu | relu | silu (default: the variant's)
    residual: bool = True                # ablation: False drops the depthwise residual
    norm: str = "batchnorm"              # batchnorm | layernorm (ablation)
    pretrained: str | None = None        # path to weights to start from (fine-tuning)
    # data
    dataset: str = "cifar10"             # cifar10 | cifar100 | fashion_mnist | mnist | imagefolder
    data_dir: str = "data"
    val_split: float = 5000              # images (or fraction if < 1) carved from train; 0 = use the test split
    img_size: int | None = None          # default: the data set's own size
    subset: int = 0                      # train on a seeded random N of the training images (quick runs); 0 = all
    download: bool = True
    skip_bad_images: bool = False
    workers: int = 0                     # DataLoader worker processes (0 = in the training process)
    cache: bool = True                   # decode small image sets once into a uint8 tensor (false: every epoch)
    # recipe
    epochs: int = 25
    batch_size: int = 512                # global batch per optimizer step (all processes, all accumulation)
    accum_steps: int = 1                 # gradient accumulation: micro-batch = batch_size / (world * accum)
    lr: float = 0.05
    weight_decay: float = 0.005
    opt_eps: float = 1e-8
    schedule: str = "onecycle"           # onecycle (piecewise linear) | cosine | constant
    peak_at: float = 0.4                 # onecycle: fraction of training at which lr peaks
    knee_at: float = 0.8                 # onecycle: the decline reaches knee_lr at this fraction, then
    knee_lr: float = 0.05                #   goes on to final_lr (the authors' script: 0.8, lr/20); 0 = no knee
    final_lr: float = 0.0                # onecycle / cosine: lr at the end, as a fraction of lr
    warmup_epochs: float = 0.0           # cosine / constant: linear warm-up
    clip_grad: float = 1.0               # gradient-norm clipping; 0 = off
    label_smoothing: float = 0.0
    scale_min: float = 1.0               # random-resized-crop scale range (scale_min, 1)
    hflip: float = 0.5
    randaugment_n: int = 2
    randaugment_m: int = 12
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    crop_pct: float = 1.0
    ema_decay: float = 0.0               # exponential moving average of weights; 0 = off
    tta_flip: bool = False               # evaluation averages the image and its mirror
    tta_shift: int = 0                   # evaluation also averages views shifted by +-N pixels; 0 = off
    # execution
    amp: str = "auto"                    # auto | bf16 | fp16 | off
    channels_last: bool = True
    fast: bool = True                    # the fast depthwise-convolution backward (fastops)
    grad_checkpointing: bool = False
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    deterministic: bool = False
    # output
    out: str = "runs/default"
    save_every: int = 0                  # also keep epoch_<n>.pt every N epochs; 0 = off
    eval_every: int = 1
    time_limit: float = 0.0              # minutes: the schedule spans this much wall-clock (training and
                                         # evaluations) and training stops when it is spent; epochs is
                                         # then an upper bound; 0 = off
    progress: bool = True
    tensorboard: bool = False

    def model_overrides(self) -> dict:
        out = {k: getattr(self, k) for k in ("dim", "depth", "kernel_size", "patch_size") if getattr(self, k)}
        if self.activation:
            out["act_layer"] = self.activation
        if not self.residual:
            out["residual"] = False
        if self.norm != "batchnorm":
            out["norm_layer"] = self.norm
        out["fast"] = self.fast
        return out

    def validate(self):
        from .data import DATASETS
        from .model import VARIANTS
        if self.model not in VARIANTS:
            close = difflib.get_close_matches(self.model, VARIANTS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown model {self.model!r}{hint}; `convmixer models` lists them")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        choices = {"dataset": DATASETS, "schedule": ("onecycle", "cosine", "constant"),
                   "amp": ("auto", "bf16", "fp16", "off"), "norm": ("batchnorm", "layernorm"),
                   "activation": (None, "gelu", "relu", "silu")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {', '.join(map(str, allowed))}")
        positive = ("epochs", "batch_size", "accum_steps", "eval_every")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("dim", "depth", "kernel_size", "patch_size", "img_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)}")
        for key in ("lr", "weight_decay", "opt_eps", "clip_grad", "label_smoothing", "mixup", "cutmix",
                    "warmup_epochs", "val_split", "final_lr", "ema_decay", "color_jitter", "subset", "workers",
                    "save_every", "time_limit", "tta_shift", "knee_at", "knee_lr"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        if self.lr == 0:
            raise ConfigError("lr must be positive")
        if self.knee_at and not self.peak_at < self.knee_at < 1:
            raise ConfigError(f"knee_at must lie between peak_at ({self.peak_at}) and 1, got {self.knee_at}")
        for key in ("peak_at", "scale_min", "crop_pct"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"{key} must be in (0, 1], got {getattr(self, key)}")
        for key in ("hflip", "random_erasing", "label_smoothing"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 = off; 1 would never move), got {self.ema_decay}")
        patch = self.patch_size or VARIANTS[self.model].patch_size
        if self.img_size is not None and patch > self.img_size:
            raise ConfigError(f"patch_size {patch} is larger than img_size {self.img_size}: use a smaller patch")
        return self


def _field_types() -> dict:
    return typing.get_type_hints(TrainConfig)


def coerce(key: str, value):
    """Turn a YAML/TOML/command-line value into the field's type, or raise ConfigError."""
    hint = _field_types()[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {base.__name__}") from None


def check_key(key: str) -> str:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    key = key.replace("-", "_")
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    return key


def read_config_file(path: str | Path) -> dict:
    """A YAML or TOML file, or the name of a shipped config (``cifar10_script``)."""
    p = Path(path)
    if not p.is_file():
        shipped = CONFIG_DIR / f"{path}.yaml"
        if shipped.is_file():
            p = shipped
        else:
            names = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError(f"config file not found: {path} (shipped configs: {names})")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text) or {}
    except Exception as e:
        raise ConfigError(f"{p} is not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: "
                          f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of key: value")
    return data


def make_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    values = {}
    for source in (read_config_file(path) if path else {}, overrides or {}):
        for key, value in source.items():
            key = check_key(key)
            values[key] = coerce(key, value)
    return TrainConfig(**values).validate()


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` strings from the command line."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. epochs=10)")
        key, value = item.split("=", 1)
        out[check_key(key.strip())] = value.strip()
    return out


def resume_config(saved: dict, changes: dict, epochs_done: int = 0) -> TrainConfig:
    """The config of a run being resumed: the checkpoint's own settings, with ``changes`` (the keys the
    user gave explicitly) allowed only where RESUME_MUTABLE says so."""
    base = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    values = dict(base)
    for key, value in changes.items():
        key = check_key(key)
        values[key] = coerce(key, value)
    cfg = TrainConfig(**values).validate()
    check_resume(saved, cfg, epochs_done)
    return cfg


def check_resume(saved: dict, cfg: TrainConfig, epochs_done: int = 0):
    """Refuse to resume a run with settings that cannot change mid-run (one line listing them)."""
    differ = [f"{k} ({saved[k]!r} -> {v!r})" for k, v in dataclasses.asdict(cfg).items()
              if k in saved and k not in RESUME_MUTABLE and k != "out" and saved[k] != v]
    if differ:
        raise ConfigError(f"--resume continues a run as it was configured, but these settings differ from its "
                          f"checkpoint: {', '.join(differ)}; only {', '.join(RESUME_MUTABLE)} may change (start a new "
                          f"run with --pretrained to change the others)")
    if cfg.epochs < epochs_done:
        raise ConfigError(f"epochs={cfg.epochs} is fewer than the {epochs_done} epochs this run has done: pass "
                          f"--epochs {epochs_done} or more")
    if saved.get("time_limit") and cfg.time_limit < saved["time_limit"]:
        raise ConfigError(f"time_limit can only grow on --resume (the run has {saved['time_limit']} min), got "
                          f"{cfg.time_limit}")
