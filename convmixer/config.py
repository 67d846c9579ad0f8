"""Training configuration: one flat dataclass, read from YAML/TOML plus command-line overrides.
Unknown keys, wrong types and impossible values are rejected before any work starts."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# the allowed range of every number: (lowest, highest, lowest excluded, highest excluded); values a file or
# a flag may set are bounded so that no setting can make us allocate without limit
RANGES = {
    "val_max": (0, 10 ** 8, False, False), "dim": (1, 8192, False, False), "depth": (1, 256, False, False), "kernel_size": (1, 63, False, False),
    "patch_size": (1, 64, False, False), "img_size": (1, 4096, False, False), "val_split": (0, 1e8, False, False),
    "subset": (0, 10 ** 8, False, False), "workers": (0, 256, False, False), "epochs": (1, 100_000, False, False),
    "batch_size": (1, 2 ** 20, False, False), "accum_steps": (1, 4096, False, False), "lr": (0, 10, True, False),
    "muon_lr": (0, 10, False, False), "muon_momentum": (0, 1, False, True),
    "weight_decay": (0, 10, False, False), "opt_eps": (0, 1, True, False), "peak_at": (0, 1, True, False),
    "knee_at": (0, 1, False, True), "knee_lr": (0, 1, False, False), "final_lr": (0, 1, False, False),
    "warmup_epochs": (0, 100_000, False, False), "clip_grad": (0, 1e6, False, False),
    "label_smoothing": (0, 1, False, True), "scale_min": (0, 1, True, False), "hflip": (0, 1, False, False),
    "randaugment_n": (0, 14, False, False), "randaugment_m": (0, 30, False, False),
    "randaugment_from": (0, 1, False, True), "augment_until": (0, 1, True, False),
    "color_jitter": (0, 10, False, False), "random_erasing": (0, 1, False, False), "mixup": (0, 100, False, False),
    "cutmix": (0, 100, False, False), "crop_pct": (0, 1, True, False), "ema_decay": (0, 1, False, True),
    "tta_shift": (0, 64, False, False), "translate": (0, 64, False, False), "res_start": (0, 4096, False, False),
    "res_until": (0, 1, True, True), "whiten_eps": (1e-6, 10, False, False),
    "depthwise_identity": (0, 10, False, False), "depthwise_cov": (0, 64, False, False), "seed": (0, 2 ** 32 - 1, False, False),
    "save_every": (0, 100_000, False, False), "eval_every": (1, 100_000, False, False),
    "time_limit": (0, 10 ** 6, False, False), "sync_every": (0, 100_000, False, False),
}
# what a run saved before a key existed did, when that differs from the key's default now
BEFORE_THE_KEY = {"decay_all": False}
# what --resume may change: how the run is executed and logged, and its length (epochs down to those done,
# time_limit upwards)
RESUME_MUTABLE = ("epochs", "time_limit", "workers", "progress", "tensorboard", "save_every", "eval_every",
                  "data_dir", "download", "cache", "compile", "grad_checkpointing", "sync_every")


def _f(default, help: str):
    """A config field with its one-line --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # model: a named variant, optionally changed
    model: str = _f("convmixer_256_8", "a named variant (convmixer models lists them)")
    dim: int | None = _f(None, "hidden width h (default: the variant's)")
    depth: int | None = _f(None, "number of ConvMixer layers d (default: the variant's)")
    kernel_size: int | None = _f(None, "depthwise kernel size k (default: the variant's)")
    patch_size: int | None = _f(None, "patch size p (default: the variant's)")
    activation: str | None = _f(None, "gelu | relu | silu (default: the variant's)")
    residual: bool = _f(True, "the residual around the depthwise convolution (false: the paper's ablation)")
    norm: str = _f("batchnorm", "batchnorm | layernorm (the paper's ablation)")
    pretrained: str | None = _f(None, "weights to start from: a file, a run folder, or a shipped name (cifar10, "
                                      "fashion_mnist); takes their normalisation and image size; the head is "
                                      "replaced when the classes differ")
    # data
    dataset: str = _f("cifar10", "cifar10 | cifar100 | fashion_mnist | mnist | imagefolder")
    data_dir: str = _f("data", "where the data set is (for imagefolder: DIR/train/<class>/*, DIR/val/<class>/*)")
    val_split: float | None = _f(None, "validation images carved from the training split (a count, or a "
                                       "fraction < 1); 0 = the data set's own val/test split; default: an "
                                       "imagefolder's val/ or test/ (else 10%), 5000 for the named data sets")
    val_max: int = _f(0, "evaluate on at most N validation images (a seeded subset; quick runs); 0 = all")
    img_size: int | None = _f(None, "training and evaluation image size (default: the images' own, or the "
                                    "pretrained weights')")
    subset: int = _f(0, "train on a seeded random N of the training images (quick runs); 0 = all")
    download: bool = _f(True, "download the data set when it is not in data_dir")
    skip_bad_images: bool = _f(False, "skip unreadable images (and entries that are not files) instead of stopping")
    workers: int = _f(0, "DataLoader worker processes (0 = in the training process)")
    cache: bool = _f(True, "decode small image sets once into a uint8 tensor (false: decode every epoch)")
    # recipe
    epochs: int = _f(25, "training epochs (with time_limit: the most epochs)")
    batch_size: int = _f(512, "global batch per optimizer step (all processes, all accumulation steps)")
    accum_steps: int = _f(1, "gradient accumulation: micro-batch = batch_size / (processes x accum_steps)")
    optimizer: str = _f("adamw", "adamw | muon (Muon on the pointwise 1x1 convolutions, AdamW on the rest)")
    lr: float = _f(0.05, "peak learning rate (AdamW)")
    muon_lr: float = _f(0.0, "optimizer=muon: Muon's peak learning rate (its updates have AdamW's RMS); 0 = lr")
    muon_momentum: float = _f(0.95, "optimizer=muon: Muon's (Nesterov) momentum")
    weight_decay: float = _f(0.005, "AdamW decoupled weight decay (on weights; see decay_all)")
    decay_all: bool = _f(True, "weight decay on biases and norm parameters too (as the authors' CIFAR-10 script)")
    opt_eps: float = _f(1e-8, "AdamW epsilon")
    schedule: str = _f("onecycle", "onecycle (piecewise linear) | cosine | constant")
    peak_at: float = _f(0.4, "onecycle: fraction of training at which the lr peaks")
    knee_at: float = _f(0.8, "onecycle: fraction at which the decline reaches knee_lr (0 = no knee)")
    knee_lr: float = _f(0.05, "onecycle: lr at knee_at as a fraction of lr (the authors' script: 0.05)")
    final_lr: float = _f(0.0, "onecycle / cosine: lr at the end, as a fraction of lr")
    warmup_epochs: float = _f(0.0, "cosine / constant: linear warm-up epochs (with a time_limit, the same fraction "
                                   "of the run: warmup_epochs / epochs of the time)")
    clip_grad: float = _f(0.0, "gradient-norm clipping; 0 = off (the authors' CIFAR-10 script)")
    label_smoothing: float = _f(0.0, "label smoothing in [0, 1)")
    scale_min: float = _f(1.0, "random-resized-crop scale range (scale_min, 1); 1 = no crop")
    hflip: float = _f(0.5, "probability of a horizontal flip")
    hflip_alternate: bool = _f(False, "derandomised flips (decoded data sets): a seeded half of the images is "
                                      "mirrored in odd epochs, the other half in even ones; needs hflip > 0")
    translate: int = _f(0, "random translation by up to N pixels, reflecting at the border; 0 = off")
    randaugment_n: int = _f(2, "RandAugment operations per image; 0 = off")
    randaugment_m: int = _f(12, "RandAugment magnitude: 0..30 for torchvision's (31 levels), 0..10 for timm's")
    randaugment_impl: str = _f("torchvision", "whose RandAugment: torchvision (the authors' CIFAR-10 script) or timm "
                                             "(rand-mM-nN-mstd0.5-inc1, the paper's ImageNet recipe; image by image, "
                                             "needs timm)")
    randaugment_from: float = _f(0.0, "fraction of training (below 1, before augment_until) from which RandAugment "
                                      "applies, so that augmentation strengthens late in a run (decoded data sets); "
                                      "0 = throughout")
    augment_until: float = _f(1.0, "fraction of training (above 0) from which the images are plain but for flips: "
                                   "translation, crops, RandAugment, jitter, erasing, mixup and CutMix stop; 1 = never")
    color_jitter: float = _f(0.0, "brightness/contrast/saturation jitter strength; 0 = off")
    random_erasing: float = _f(0.0, "probability of random erasing; 0 = off")
    mixup: float = _f(0.0, "mixup alpha; 0 = off")
    cutmix: float = _f(0.0, "CutMix alpha; 0 = off (with mixup: one of the two per batch)")
    res_start: int = _f(0, "progressive resizing: train at this image size first, growing linearly to img_size "
                           "by res_until of training, rounded down to multiples of the patch size; 0 = off")
    res_until: float = _f(0.75, "progressive resizing: fraction of training (below 1) from which on it runs at img_size")
    stem_init: str = _f("default", "patch-embedding initialisation: default | whiten (filters that whiten the "
                                   "training images' p x p patches, from their covariance)")
    whiten_eps: float = _f(5e-4, "stem_init=whiten: added to the patch covariance's eigenvalues")
    depthwise_identity: float = _f(0.0, "added to the centre tap of every depthwise filter of a new model, so that "
                                        "each layer starts near the identity (a dirac initialisation); 0 = off")
    depthwise_cov: float = _f(0.0, "resample the depthwise filters of a new model with neighbouring taps correlated, "
                                   "over a length scale that grows with depth to this many pixels at the last "
                                   "layer; 0 = off (independent taps)")
    crop_pct: float = _f(1.0, "evaluation: resize to img_size / crop_pct, then centre-crop img_size")
    ema_decay: float = _f(0.0, "exponential moving average of the weights, in [0, 1); 0 = off")
    tta_flip: bool = _f(False, "evaluation averages each image and its mirror")
    tta_shift: int = _f(0, "evaluation also averages views shifted by +-N pixels; 0 = off")
    # execution
    amp: str = _f("auto", "auto | bf16 | fp16 | off (auto: bf16 where the hardware has it)")
    channels_last: bool = _f(True, "channels-last memory layout")
    fast: bool = _f(True, "the fast depthwise-convolution backward (CPU)")
    grad_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory)")
    compile: bool = _f(False, "torch.compile the model")
    sync_bn: bool = _f(False, "SyncBatchNorm across processes (GPU DDP)")
    seed: int = _f(0, "random seed (data order, augmentation, initialisation, validation split)")
    sync_every: int = _f(0, "optimizer steps between host synchronisations (loss, NaN check, signals, time); "
                            "0 = every step on a CPU, every 20 on a GPU")
    deterministic: bool = _f(False, "deterministic algorithms (bitwise-repeatable CPU runs)")
    # output
    out: str = _f("runs/default", "the run's folder (refused if it holds another run, unless --overwrite)")
    save_every: int = _f(0, "also keep epoch_<n>.pt every N epochs; 0 = off")
    eval_every: int = _f(1, "validate every N epochs (and at the end)")
    time_limit: float = _f(0.0, "minutes: the schedule spans this wall-clock and training stops when it is "
                                "spent; epochs is then an upper bound; 0 = off")
    progress: bool = _f(True, "progress bars on stderr")
    tensorboard: bool = _f(False, "also write TensorBoard logs (pip install 'convmixer[tensorboard]')")

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
        for f in dataclasses.fields(self):  # values a program set directly are converted as a file's would be
            value = getattr(self, f.name)
            setattr(self, f.name, coerce(f.name, os.fspath(value) if isinstance(value, os.PathLike) else value))
        if self.model not in VARIANTS:
            close = difflib.get_close_matches(self.model, VARIANTS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown model {self.model!r}{hint}; `convmixer models` lists them")
        choices = {"dataset": DATASETS, "schedule": ("onecycle", "cosine", "constant"),
                   "amp": ("auto", "bf16", "fp16", "off"), "norm": ("batchnorm", "layernorm"),
                   "activation": (None, "gelu", "relu", "silu"), "stem_init": ("default", "whiten"),
                   "optimizer": ("adamw", "muon"), "randaugment_impl": ("torchvision", "timm")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {', '.join(map(str, allowed))}")
        for key, (low, high, open_low, open_high) in RANGES.items():
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
            if value < low or value > high or (open_low and value == low) or (open_high and value == high):
                span = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
                raise ConfigError(f"{key}={value:g} is outside its range {span}")
        for key in ("out", "data_dir", "model", "dataset"):
            if not str(getattr(self, key)).strip():
                raise ConfigError(f"{key} is empty: give a value")
        if self.knee_at and not self.peak_at < self.knee_at < 1:
            raise ConfigError(f"knee_at must lie between peak_at ({self.peak_at}) and 1, got {self.knee_at}")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs={self.warmup_epochs:g} is longer than the {self.epochs} epochs")
        check_val_split("val_split", self.val_split)
        patch = self.patch_size or VARIANTS[self.model].patch_size
        if self.img_size is not None and patch > self.img_size:
            raise ConfigError(f"patch_size {patch} is larger than img_size {self.img_size}: use a smaller patch")
        if self.hflip_alternate and not self.hflip:
            raise ConfigError("hflip_alternate alternates the flips that hflip turns on, but hflip is 0: set hflip 0.5")
        if self.randaugment_impl == "timm" and self.randaugment_m > 10:
            raise ConfigError(f"randaugment_m={self.randaugment_m} is beyond timm's scale of 0..10 (randaugment_impl "
                              f"timm): the paper's m9 is 9")
        if self.randaugment_from and not self.randaugment_n:
            raise ConfigError("randaugment_from delays RandAugment, but randaugment_n is 0: set randaugment_n 2")
        if self.augment_until < 1:
            if self.scale_min == 1 and not any(getattr(self, k) for k in ("translate", "randaugment_n", "color_jitter",
                                                                         "random_erasing", "mixup", "cutmix")):
                raise ConfigError(f"augment_until {self.augment_until:g} stops the augmentation beyond flips, but this "
                                  f"recipe has none: drop augment_until")
            if self.randaugment_n and self.randaugment_from >= self.augment_until:
                raise ConfigError(f"randaugment_from {self.randaugment_from:g} is not before augment_until "
                                  f"{self.augment_until:g}, so RandAugment would never run: lower randaugment_from")
        if self.res_start and self.res_start < patch:
            raise ConfigError(f"res_start {self.res_start} is smaller than the patch size {patch}: raise res_start")
        return self


def check_range(name: str, value, low, high):
    """For command arguments outside TrainConfig (image sizes, batch sizes of bench/summary/export)."""
    if value is not None and not low <= value <= high:
        raise ConfigError(f"{name} {value} is outside {low}..{high}")
    return value


def check_val_split(name: str, value) -> None:
    """A validation split is a fraction below 1 or a whole number of images (None: the default)."""
    check_range(name, value, RANGES["val_split"][0], RANGES["val_split"][1])
    if value is not None and value >= 1 and not float(value).is_integer():
        raise ConfigError(f"{name} {value:g}: give a fraction below 1 or a whole number of images")


def check_batch_bytes(batch: int, channels: int, size: int, limit: int = 2 ** 31):
    """A synthetic input batch must stay allocatable (2 GiB of float32 by default)."""
    if batch * channels * size * size * 4 > limit:
        raise ConfigError(f"a batch of {batch} x {channels} x {size} x {size} floats is "
                          f"{batch * channels * size * size * 4 / 2 ** 30:.0f} GiB: lower --batch-size or --img-size")


def _field_types() -> dict:
    return typing.get_type_hints(TrainConfig)


PATHS = ("data_dir", "out", "pretrained")  # "~/data" in a config file (or --data-dir=~/data) is the home folder's


def coerce(key: str, value):
    """Turn a YAML/TOML/command-line value into the field's type, or raise ConfigError."""
    hint = _field_types()[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")) or (
            key == "pretrained" and value is False):  # "pretrained: false" in YAML: none
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty")
    if not isinstance(value, (str, int, float, bool)):
        raise ConfigError(f"{key} must be a single value, got a {type(value).__name__}: {str(value)[:60]}")
    if isinstance(value, str) and len(value) > 4096:
        raise ConfigError(f"{key} is {len(value)} characters long: give a value under 4096")
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
            if isinstance(value, str) and "e" in value.lower():
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError
                return int(as_float)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return os.path.expanduser(str(value)) if key in PATHS else str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}={str(value)[:60]!r} is not a valid {base.__name__}") from None


def check_key(key) -> str:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    if not isinstance(key, str):
        raise ConfigError(f"config keys are names, got {key!r} ({type(key).__name__})")
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
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p} is {p.stat().st_size} bytes; a config is a short list of key: value lines")
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p} ({getattr(e, 'strerror', None) or e})") from None
    try:
        if p.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = _load_yaml(text)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except Exception as e:
        raise ConfigError(f"{p} is not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: {_parse_error(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of key: value")
    spelled = {}
    for key in data:  # batch-size and batch_size are one key: the later would silently win
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name in spelled:
            raise ConfigError(f"{p} sets {name} more than once ({spelled[name]} and {key}): keep one")
        spelled[name] = key
    return data


def _parse_error(e: Exception) -> str:
    """What a YAML or TOML parser found wrong, and where (PyYAML's first line is often only its context)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return (str(e).splitlines() or [type(e).__name__])[0]


MAX_CONFIG_BYTES = 1 << 20


def _load_yaml(text: str):
    """YAML without aliases (a few bytes of nested aliases expand to gigabytes), without duplicate keys
    (the later one would silently win), and with YAML 1.2's booleans: ``amp: off`` is the word off (YAML 1.1
    read it as false), as are yes/no/on; ``coerce`` still reads them as booleans for on/off settings."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        yaml_implicit_resolvers = {
            first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise ConfigError("uses a YAML alias (*name); a config needs none: write the values out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen, dupes = set(), set()
            for k, _ in node.value:  # one pass: a generated file of 100,000 keys must not take minutes
                key = self.construct_object(k, deep=deep)
                key = key if isinstance(key, (str, int, float, bool)) or key is None else repr(key)
                (dupes if key in seen else seen).add(key)
            if dupes:
                raise ConfigError(f"sets {', '.join(sorted(map(str, dupes)))} more than once: keep one")
            return super().construct_mapping(node, deep=deep)
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    return yaml.load(text, Loader=Loader) or {}


def make_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    values = {}
    if path:
        try:
            values = _coerce_all(read_config_file(path))
        except ConfigError as e:
            raise ConfigError(e if str(path) in str(e) else f"{path}: {e}") from e
    values.update(_coerce_all(overrides or {}))
    return TrainConfig(**values).validate()


def _coerce_all(source: dict) -> dict:
    return {check_key(key): coerce(check_key(key), value) for key, value in source.items()}


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
    base = {**BEFORE_THE_KEY, **{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}}
    values = dict(base)
    for key, value in changes.items():
        key = check_key(key)
        values[key] = coerce(key, value)
    cfg = TrainConfig(**values).validate()
    check_resume(saved, cfg, epochs_done)
    return cfg


def check_resume(saved: dict, cfg: TrainConfig, epochs_done: int = 0):
    """Refuse to resume a run with settings that cannot change mid-run (one line listing them)."""
    # a key the checkpoint predates ran as BEFORE_THE_KEY says, else as its default
    was = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **BEFORE_THE_KEY, **saved}
    differ = [f"{k} ({was[k]!r} -> {v!r})" for k, v in dataclasses.asdict(cfg).items()
              if k not in RESUME_MUTABLE and k != "out" and was[k] != v]
    if differ:
        raise ConfigError(f"--resume continues a run as it was configured, but these settings differ from its "
                          f"checkpoint: {', '.join(differ)}; only {', '.join(RESUME_MUTABLE)} may change (start a new "
                          f"run with --pretrained to change the others)")
    if cfg.epochs < epochs_done:
        raise ConfigError(f"epochs={cfg.epochs} is fewer than the {epochs_done} epochs this run has done or begun: pass "
                          f"--epochs {epochs_done} or more")
    if saved.get("time_limit") and cfg.time_limit < saved["time_limit"]:
        raise ConfigError(f"time_limit can only grow on --resume (the run has {saved['time_limit']} min), got "
                          f"{cfg.time_limit}")
