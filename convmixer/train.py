"""Training: one loop, read top to bottom. Works on one CPU/GPU process or many through torchrun.

    torchrun --nproc_per_node=N -m convmixer train --config cifar10_paper

``batch_size`` is the global batch of one optimizer step; each of the world_size x accum_steps
micro-batches is one equal slice of it, so N processes, or one process accumulating N micro-batches,
take the same steps (up to floating-point reduction order).

A run lives in its folder (run.py owns the files): ``train`` refuses a folder that holds another run
(unless ``overwrite``) or that another process is training in; ``resume`` continues the checkpoint's
own run, in its own folder, with its own settings (config.RESUME_MUTABLE lists what may change).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import TrainConfig, check_resume
from .data import (STATS, ImageData, TransformedImages, batch_mixer, first_image, load_dataset, split_train_val,
                   eval_transform, leave_signals_to_the_parent, train_transform, worker_errors_in_one_line)
from .errors import ConfigError, TrainingError
from .augment import BatchAugment, plain_images, to_device
from .evaluate import evaluate
from .model import (ConvMixer, PointwiseConv2d, correlated_depthwise, identity_depthwise, model_kwargs,
                    stats_for_channels, whiten_stem)
from .muon import Muon, Optimizers
from .run import (RunFolder, RunInfo, append_metrics, check_shapes, is_training_checkpoint, load_checkpoint,
                  read_metrics, save_checkpoint, save_run_weights, truncate_metrics, write_config, write_summary)
from .runtime import amp_dtype, rank_zero_first, resident_mib, setup_distributed
from .weights import WeightsError, adapt_stem, checkpoint_filter_fn, load_into, read_metadata, read_state_dict


# --- small pure policies ----------------------------------------------------------------------
def lr_factor(progress: float, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``progress`` (0 = start, 1 = end of the run), a pure function as
    nanoGPT's get_lr. Progress is the larger of steps done / total and, with a time limit, time spent /
    limit."""
    t = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "onecycle":  # piecewise linear: 0 -> 1 at peak_at (-> knee_lr at knee_at) -> final_lr
        knee = [(cfg.knee_at, cfg.knee_lr)] if cfg.knee_at > cfg.peak_at else []
        points = [(0.0, 0.0), (cfg.peak_at, 1.0), *knee, (1.0, cfg.final_lr)]
        for (t0, y0), (t1, y1) in zip(points, points[1:]):
            if t <= t1:
                return y0 + (y1 - y0) * (t - t0) / max(t1 - t0, 1e-12)
    warmup = cfg.warmup_epochs / cfg.epochs
    if t < warmup:
        return t / warmup
    if cfg.schedule == "constant":
        return 1.0
    rest = (t - warmup) / max(1.0 - warmup, 1e-12)
    return cfg.final_lr + (1.0 - cfg.final_lr) * 0.5 * (1.0 + math.cos(math.pi * rest))


def soft_cross_entropy(logits, target, smoothing: float):
    if target.ndim == 1:
        return F.cross_entropy(logits, target, label_smoothing=smoothing)
    if smoothing:
        target = target * (1 - smoothing) + smoothing / logits.shape[-1]
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def epoch_batches(n: int, cfg: TrainConfig, epoch: int, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches for one epoch: a seeded shuffle cut into global batches (the
    incomplete last one dropped), each cut into world x accum equal micro-batches; process r takes
    micro-batches r*accum ... r*accum + accum - 1 of every global batch."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    micro = cfg.batch_size // (world * cfg.accum_steps)
    out = []
    for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
        batch = perm[start:start + cfg.batch_size]
        for a in range(cfg.accum_steps):
            chunk = (rank * cfg.accum_steps + a) * micro
            out.append(batch[chunk:chunk + micro])
    return out


class SignalFlag:
    """SIGINT/SIGTERM only set a flag (on every rank: torchrun forwards signals); the loop reads it
    between steps and after each epoch's evaluation, writes a checkpoint and stops. A second signal
    stops the process at once (whatever it is waiting for)."""

    def __init__(self):
        self.signum, self._previous = None, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _set(self, signum, frame):
        if self.signum is not None:  # the second one: stop now
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (send it again to stop "
              f"at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name


# --- the run's state --------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything one training run holds; ``build_run`` makes it, a checkpoint restores it."""
    cfg: TrainConfig
    info: RunInfo
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype | None
    model: ConvMixer                  # the bare model (what is saved)
    step_model: torch.nn.Module       # what the step calls: DDP and/or compiled around ``model``
    ema: torch.nn.Module | None
    optimizer: torch.optim.Optimizer | Optimizers  # Optimizers: Muon and AdamW (optimizer=muon)
    scaler: torch.amp.GradScaler
    train_data: ImageData
    val_data: ImageData
    train_set: TransformedImages | BatchAugment  # per image (streamed files) or per batch (decoded images)
    mixer: object
    out: Path
    folder: RunFolder | None = None
    writer: object = None
    epoch: int = 0                    # epochs completed
    batch: int = 0                    # optimizer steps done in the current epoch
    step: int = 0                     # optimizer steps done in all
    best: dict = field(default_factory=lambda: {"val_top1": -1.0, "epoch": -1})
    stats: dict = field(default_factory=dict)   # the current epoch's sums (kept across an interruption)
    started: float = 0.0              # time.time() at which a run that had never stopped would have started
    printed: bool = False             # the epoch table's header is out
    spent: float = 0.0                # the time spent that all processes last agreed on (sets the lr)
    pending: torch.Tensor | None = None  # loss and accuracy sums on the device since the last agree()
    pending_seen: int = 0
    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_data) // self.cfg.batch_size

    def elapsed(self) -> float:
        return time.time() - self.started

    def progress(self, spent: float) -> float:
        """Of the step about to be taken, counted as the authors' script does ((i + 1) / len(loader)): the
        first step moves the weights and the last one ends the schedule; or time spent / time_limit."""
        total = self.steps_per_epoch * self.cfg.epochs
        limit = self.cfg.time_limit * 60
        return max((self.step + 1) / total, spent / limit if limit else 0.0)

    def out_of_time(self, spent: float) -> bool:
        """Whether ``spent`` seconds (a figure all processes agree on) reach the time limit, if there is one."""
        return bool(self.cfg.time_limit) and spent >= self.cfg.time_limit * 60

    def log(self, *args):
        if self.rank == 0:
            print(*args, flush=True)

    @property
    def distributed(self) -> bool:
        """Whether this run's processes form the process group (torchrun; also one process with CONVMIXER_DDP=1)."""
        return dist.is_initialized() and dist.get_world_size() == self.world

    def rng_states(self) -> list[dict] | None:
        """Every process's generator states, gathered on rank 0 (None elsewhere); every process calls it."""
        if not self.distributed:
            return [_rng_state(self.device)]
        states = [None] * self.world if self.rank == 0 else None
        dist.gather_object(_rng_state(self.device), states, dst=0)
        return states

    def checkpoint(self, rng: list[dict], record: dict | None = None) -> dict:
        """What last.pt holds (rank 0 writes it); ``rng``: rng_states(), so that a resumed run draws on each
        process what the uninterrupted run would have drawn."""
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict(), ema=None if self.ema is None else self.ema.state_dict(),
                    rng=rng[0], rng_ranks=rng, epoch=self.epoch, batch_in_epoch=self.batch, step=self.step, best=self.best,
                    partial=self.stats, elapsed=self.elapsed(), record=record,
                    data_sizes=self.data_sizes(),
                    **dataclasses.asdict(self.info))

    def data_sizes(self) -> list[int]:
        """Training and validation images, unreadable ones left out in decoding counted (so that streaming
        the same folder gives the same figures)."""
        return [len(d) + d.dropped if d is not None else 0 for d in (self.train_data, self.val_data)]

    def restore(self, ckpt: dict):
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.epoch, self.batch, self.step, self.best = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"], ckpt["best"]
        self.stats = ckpt.get("partial") or {}
        self.started = time.time() - float(ckpt.get("elapsed", 0.0))
        self.spent = float(ckpt.get("elapsed", 0.0))
        ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]  # checkpoints before 2026-12-07 hold rank 0's only
        if isinstance(ranks, list) and len(ranks) == self.world and isinstance(ranks[self.rank], dict):
            _set_rng_state(ranks[self.rank], self.device)
        else:  # resumed on another number of processes: rank 0 has its own, the others a seed of their own
            _set_rng_state(ckpt["rng"], self.device)
            if self.rank > 0:
                torch.manual_seed(self.cfg.seed + 1000 * self.rank + self.step)
                random.seed(self.cfg.seed + 1000 * self.rank + self.step)


def _rng_state(device: torch.device) -> dict:
    """This process's generators: the CPU's, Python's and its own GPU's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    saved = state.get("cuda")
    if device.type == "cuda" and isinstance(saved, torch.Tensor):
        torch.cuda.set_rng_state(saved, device)
    elif device.type == "cuda" and isinstance(saved, list):  # before 2026-12-07: every GPU's, by number
        for index, gpu_state in enumerate(saved[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)


# --- building a run -----------------------------------------------------------------------------
def prepare_data(cfg: TrainConfig, like: RunInfo | None = None) -> tuple[ImageData, ImageData, dict]:
    """Training and validation images, and what the data decides: classes, channels, size, mean/std.
    Fine-tuning (``like``: the pretrained weights' RunInfo) keeps the weights' image size and
    normalisation unless img_size is set."""
    size = cfg.img_size or (like.img_size if like else None)
    load = dict(img_size=size, download=cfg.download, skip_bad_images=cfg.skip_bad_images, cache=cfg.cache,
                progress=cfg.progress)
    train_all = load_dataset(cfg.dataset, cfg.data_dir, train=True, **load)
    if cfg.val_split > 0:
        train, val = split_train_val(train_all, cfg.val_split, seed=cfg.seed)
    else:
        train, val = train_all, load_dataset(cfg.dataset, cfg.data_dir, train=False, **load)
    if list(val.classes) != list(train_all.classes):
        raise ConfigError(f"the validation classes ({', '.join(val.classes[:4])}...) differ from the training classes "
                          f"({', '.join(train_all.classes[:4])}...): give both splits the same class folders")
    train, val = _seeded_subset(train, cfg.subset, cfg.seed + 1), _seeded_subset(val, cfg.val_max, cfg.seed + 2)
    mean, std = stats_for_channels(*((like.mean, like.std) if like and len(like.mean) == train.channels
                                     else STATS[cfg.dataset]), train.channels)
    found = dict(classes=list(train_all.classes), in_chans=train.channels,
                 img_size=size or _native_size(train, cfg.skip_bad_images), mean=list(mean), std=list(std))
    return train, val, found


def _seeded_subset(data: ImageData, n: int, seed: int) -> ImageData:
    """A seeded random n of the images (every class, not the first folders); all when n is 0."""
    if not n or n >= len(data):
        return data
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return data.subset(pick.sort().values)


def resolve_val_split(cfg: TrainConfig) -> TrainConfig:
    """val_split unset: an image folder's own val/ or test/ split when it has one, else a seeded 10% of
    its training images; 5,000 images carved from the training split of the named data sets."""
    if cfg.val_split is not None:
        return cfg
    if cfg.dataset != "imagefolder":
        return dataclasses.replace(cfg, val_split=5000)
    own = any((Path(cfg.data_dir).expanduser() / s).is_dir() for s in ("val", "test"))
    return dataclasses.replace(cfg, val_split=0 if own else 0.1)


@dataclass
class Pretrained:
    """Trained weights to fine-tune from: the file (named in messages) and its weights, read once."""
    path: Path
    state: dict
    info: RunInfo | None  # what the file says about its model and data, when it says anything

    def __str__(self):
        return str(self.path)


def _pretrained(cfg: TrainConfig) -> Pretrained:
    from .run import resolve_weights
    path = resolve_weights(cfg.pretrained)
    if not path.is_file():
        raise WeightsError(f"--pretrained {cfg.pretrained}: no such file, run folder or shipped weights "
                           f"(cifar10, fashion_mnist)")
    state, info = read_state_dict(path), None
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        if "classes" in meta and "model_args" in meta:
            info = RunInfo.from_metadata(meta, path)
    elif is_training_checkpoint(state):
        info = RunInfo.from_dict(state, path)  # a run's training checkpoint carries its RunInfo too
    state = checkpoint_filter_fn(state)  # the weights alone (a checkpoint's optimizer state is let go here)
    if info is not None:  # the architecture we will build comes from the file: it must be the tensors'
        check_shapes(info.model_args, state, path)
    return Pretrained(path, state, info)


def _architecture(model_args: dict) -> dict:
    """What a run's model arguments say about the architecture (not about its data)."""
    return {k: v for k, v in model_args.items() if k not in ("num_classes", "in_chans", "drop_rate", "fast")}


def _native_size(data: ImageData, skip_bad: bool) -> int:
    """The image size to train at when img_size is not set: the decoded images' own, or for streamed
    files the first one's when it is square (so --cache on and off agree), else 224 (photos)."""
    height, width = (data.images if data.images is not None else first_image(data, skip_bad)).shape[-2:]
    return height if height == width else 224


def build_run(cfg: TrainConfig, ckpt: dict | None, out: Path, overwrite: bool) -> Run:
    rank, world, device = setup_distributed()
    if cfg.batch_size % (world * cfg.accum_steps):
        raise ConfigError(f"batch_size {cfg.batch_size} does not split into {world} process(es) x "
                          f"{cfg.accum_steps} accumulation step(s): pick a multiple of {world * cfg.accum_steps}")
    folder = RunFolder(out).open(resume=ckpt is not None, overwrite=overwrite) if rank == 0 else None
    try:
        return _build(cfg, ckpt, out, rank, world, device, folder)
    except BaseException:
        if folder is not None:
            folder.close()
        raise


def _build(cfg, ckpt, out, rank, world, device, folder) -> Run:
    _seed(cfg, device)
    with rank_zero_first(rank, world):
        if ckpt is not None:  # a resumed run: the architecture and preprocessing it started with
            source, like, arch = None, RunInfo.from_dict(ckpt, cfg.out), _architecture(ckpt["model_args"])
        else:
            source = _pretrained(cfg) if cfg.pretrained else None
            like = source.info if source else None
            arch = _architecture(like.model_args) if like else {}
        train_data, val_data, found = prepare_data(cfg, like)
    model, info = _make_model(cfg, found, arch, source, train_data, fresh=ckpt is None, rank=rank)
    if world > 1:  # distinct augmentation draws per process (the weights are broadcast by DDP anyway)
        torch.manual_seed(cfg.seed + 1000 * rank)
        random.seed(cfg.seed + 1000 * rank)
    model, step_model, ema = _place(cfg, model, device, world)
    dtype = amp_dtype(cfg.amp, device)
    run = Run(cfg=cfg, info=info, rank=rank, world=world, device=device, dtype=dtype, model=model,
              step_model=step_model, ema=ema, optimizer=make_optimizer(cfg, model, dtype),
              scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
              train_data=train_data, val_data=val_data,
              train_set=_augmentation(cfg, train_data, info, device),
              mixer=batch_mixer(cfg, len(info.classes)), out=out, folder=folder, started=time.time())
    if ckpt is not None:
        _restore(run, ckpt)
    if rank == 0:
        _open_logs(run, ckpt)
    return run


def _seed(cfg: TrainConfig, device: torch.device) -> None:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def _make_model(cfg: TrainConfig, found: dict, arch: dict, source: Pretrained | None, train_data: ImageData,
                fresh: bool, rank: int) -> tuple[ConvMixer, RunInfo]:
    """The run's model, initialised (a ``fresh`` run: the stem whitened if stem_init says so, the depthwise
    filters as the config says; then the weights of ``source`` to fine-tune from, if any), and the RunInfo that
    describes it and its data."""
    if len(train_data) < cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(train_data)} training images: "
                          f"lower batch_size")
    # the architecture: the variant's, then the pretrained weights', then what the config changes
    margs = {**model_kwargs(cfg.model), **arch, "num_classes": len(found["classes"]), "in_chans": found["in_chans"],
             **cfg.model_overrides()}
    if margs["patch_size"] > found["img_size"]:
        raise ConfigError(f"patch_size {margs['patch_size']} is larger than the {found['img_size']} px images")
    info = RunInfo(model_args=margs, classes=found["classes"], mean=found["mean"], std=found["std"],
                   img_size=found["img_size"], crop_pct=cfg.crop_pct, model_name=cfg.model, dataset=cfg.dataset,
                   config=dataclasses.asdict(cfg))
    if cfg.translate >= found["img_size"] or cfg.res_start > found["img_size"]:
        raise ConfigError(f"translate {cfg.translate} must stay below the {found['img_size']} px images and "
                          f"res_start {cfg.res_start} must not exceed them: lower them")
    model = ConvMixer(**margs)
    if cfg.stem_init == "whiten" and fresh:
        _check_whiten(margs, source, len(train_data) * (info.img_size // margs["patch_size"]) ** 2)
        whiten_stem(model, _stem_sample(train_data, info, cfg), cfg.whiten_eps, cfg.seed)
    if fresh:
        _init_depthwise(model, cfg, source)
    if source is not None:
        state = adapt_stem(source.state, model)  # RGB weights, grey data
        skipped = load_into(model, state, strict=False, source=str(source))
        if rank == 0:
            print(f"fine-tuning from {source}" + (f"; new (not loaded): {', '.join(skipped)}" if skipped else ""))
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model, info


def _place(cfg: TrainConfig, model: ConvMixer, device: torch.device, world: int):
    """Moves the model to its device and layout; returns it (with SyncBatchNorm if asked), the module the
    training step calls (DDP- and compile-wrapped as the config asks) and the EMA copy (None without ema_decay)."""
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if world > 1 and cfg.sync_bn:
        if device.type != "cuda":  # PyTorch's SyncBatchNorm runs on GPUs only (it failed at the first step)
            raise ConfigError("sync_bn needs GPU processes, but this run's processes are on the CPU: drop sync_bn")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = None
    if cfg.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    step_model = model
    if world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        step_model = torch.compile(step_model)
    return model, step_model, ema


def _restore(run: Run, ckpt: dict) -> None:
    """Puts a resumed run back where its checkpoint left it, after checking the data is the run's own."""
    info, margs = run.info, run.info.model_args
    if list(ckpt["classes"]) != info.classes or ckpt["model_args"].get("in_chans") != margs["in_chans"]:
        raise TrainingError(f"the data in {run.cfg.data_dir} has {len(info.classes)} classes ({', '.join(info.classes[:3])}"
                            f"...) and {margs['in_chans']} channel(s), but this run trained on {len(ckpt['classes'])} "
                            f"({', '.join(map(str, ckpt['classes'][:3]))}...): resume with the run's own data")
    sizes = run.data_sizes()
    if ckpt.get("data_sizes", sizes) != sizes:  # images added or removed: the seeded split would move
        raise TrainingError(f"the data in {run.cfg.data_dir} gives {sizes[0]} training / {sizes[1]} validation images, "
                            f"but this run had {ckpt['data_sizes'][0]} / {ckpt['data_sizes'][1]}: resume with the "
                            f"run's own data (or start a new run with --pretrained)")
    run.restore(ckpt)
    run.log(f"resumed at epoch {run.epoch + 1}, step {run.step}")
    _repair_best(run, ckpt)
    longer = [f"{key} {ckpt['config'].get(key)} -> {getattr(run.cfg, key)}" for key in ("epochs", "time_limit")
              if ckpt["config"].get(key) != getattr(run.cfg, key)]
    if longer:  # progress is steps (or minutes) done over the whole length, so it moves back
        run.log(f"{', '.join(longer)}: the schedule now spans the new length, so the learning rate (and progressive "
                f"resizing, randaugment_from, augment_until) continue from {100 * run.progress(run.spent):.0f}% of it, "
                f"not where the run stopped")


def _open_logs(run: Run, ckpt: dict | None) -> None:
    """Rank 0: the run's config.yaml (the run --overwrite replaces deleted first), its metrics cut back to
    the checkpoint on resume, and TensorBoard."""
    run.folder.clear_replaced()
    write_config(run.out / "config.yaml", dataclasses.asdict(run.cfg))
    if ckpt is not None:
        truncate_metrics(run.out / "metrics.jsonl", run.epoch, ckpt.get("record"))
    if run.cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            run.writer = SummaryWriter(str(run.out / "tensorboard"))
        except ImportError:
            print("tensorboard is not installed (pip install tensorboard); continuing without it")


def make_optimizer(cfg: TrainConfig, model: ConvMixer, dtype: torch.dtype | None = None):
    """AdamW; or, with optimizer=muon, Muon on the pointwise (1x1) convolutions and AdamW on the rest (Muon's
    matrix products in bf16 when the run's autocast ``dtype`` is bf16: hardware where they are fast). Weight
    decay on weights only, unless decay_all (the authors' CIFAR-10 script decays every parameter)."""
    muon = [m.weight for m in model.modules() if isinstance(m, PointwiseConv2d)] if cfg.optimizer == "muon" else []
    on_muon = {id(p) for p in muon}
    rest = [p for p in model.parameters() if id(p) not in on_muon]
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.ndim > 1 or cfg.decay_all], "weight_decay": cfg.weight_decay},
                               {"params": [p for p in rest if p.ndim <= 1 and not cfg.decay_all], "weight_decay": 0.0}],
                              lr=cfg.lr, eps=cfg.opt_eps, foreach=True)
    if not muon:
        return adamw
    scale = (cfg.muon_lr or cfg.lr) / cfg.lr
    return Optimizers(adamw, Muon([{"params": muon, "lr_scale": scale}], lr=cfg.lr * scale,
                                  momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay,
                                  ns_dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32))


# --- one optimizer step -------------------------------------------------------------------------------
def train_step(run: Run, micro_batches):
    """accum_steps micro-batches, then clip, step. Nothing waits for the device: the loss and accuracy
    sums stay there until the next ``agree``; the learning rate follows the last agreed time spent."""
    cfg, model = run.cfg, run.step_model
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss x n, correct
    progress = run.progress(run.spent)
    size = train_size(cfg, run.info.img_size, run.info.model_args["patch_size"], progress)
    for a in range(cfg.accum_steps):
        images, labels = next(micro_batches)
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        if size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        mix = run.mixer and not plain_images(cfg, progress)
        images, targets = run.mixer(images, labels) if mix else (images, labels)
        sync = nullcontext() if (run.world == 1 or a == cfg.accum_steps - 1) else model.no_sync()
        with sync:
            with torch.autocast(run.device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
                logits = model(images)
                loss = soft_cross_entropy(logits.float(), targets, cfg.label_smoothing)
            run.scaler.scale(loss / cfg.accum_steps).backward()
        hard = targets.argmax(-1) if targets.ndim == 2 else targets
        sums += torch.stack([loss.detach().double() * len(labels), (logits.argmax(-1) == hard).sum().double()])
        run.pending_seen += len(labels) * run.world
    run.pending = sums if run.pending is None else run.pending + sums
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0) * lr_factor(progress, cfg)
    if cfg.clip_grad > 0:
        run.scaler.unscale_(run.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
        if not run.scaler.is_enabled():  # no GradScaler to skip the step: a non-finite gradient makes the loss sum
            run.pending[0] += norm.double() * 0  # NaN (0 otherwise, no host sync), so agree() stops before a checkpoint
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    run.step += 1
    run.batch += 1


def agree(run: Run, stop: SignalFlag) -> bool:
    """The one host synchronisation, every sync_every steps and at the end of an epoch: one reduction
    (all processes at once) brings back the loss and accuracy sums since the last one, whether any
    process was signalled, and the time spent (their mean, which all then use). Returns: signalled."""
    flags = torch.tensor([float(stop.signum is not None), run.elapsed()], dtype=torch.float64, device=run.device)
    agreed = torch.cat([run.pending, flags]) if run.pending is not None else torch.cat([flags.new_zeros(2), flags])
    if run.world > 1:
        dist.all_reduce(agreed)
    loss_sum, correct, signalled, spent = agreed.tolist()
    if not math.isfinite(loss_sum):
        cfg = run.cfg
        raise TrainingError(f"loss (or its gradient) became {loss_sum / max(run.pending_seen, 1)} at epoch "
                            f"{run.epoch + 1}, by step "
                            f"{run.step}: training diverged with lr={cfg.lr}, weight_decay={cfg.weight_decay}, "
                            f"clip_grad={cfg.clip_grad}, amp={cfg.amp}; lower lr, keep clip_grad on or set amp=off; "
                            f"the last good checkpoint {run.out / 'last.pt'} is untouched")
    stats = run.stats
    stats["loss"], stats["correct"], stats["seen"] = (stats["loss"] + loss_sum, stats["correct"] + correct,
                                                      stats["seen"] + run.pending_seen)
    run.pending, run.pending_seen, run.spent = None, 0, spent / run.world
    return signalled > 0


def _stem_sample(data: ImageData, info: RunInfo, cfg: TrainConfig, values: int = 2 ** 24) -> torch.Tensor:
    """A seeded random sample of the training images (about `values` floats in all, at most 5,000 images) as
    the model sees them at evaluation, for the whitening initialisation. The same images whether the set
    is decoded or read from files; sets are often sorted by class, hence random."""
    n = min(len(data), 5000, max(2, values // (info.model_args["in_chans"] * info.img_size ** 2)))
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))[:n].sort().values
    transform = eval_transform(info.img_size, info.crop_pct, info.mean, info.std)
    if data.images is not None:
        return transform(data.images[pick])
    images = TransformedImages(data, transform, cfg.skip_bad_images)
    return torch.stack([images[i][0] for i in pick.tolist()])


def _init_depthwise(model: ConvMixer, cfg: TrainConfig, source) -> None:
    """A new model's depthwise filters: correlated taps (depthwise_cov), then the identity added
    (depthwise_identity); fine-tuned weights would overwrite both, so they are refused with them."""
    for key in ("depthwise_cov", "depthwise_identity"):
        if getattr(cfg, key):
            _refuse_beside_pretrained(key, "depthwise filters", source)
    if cfg.depthwise_cov:
        correlated_depthwise(model, cfg.depthwise_cov, cfg.seed)
    if cfg.depthwise_identity:
        identity_depthwise(model, cfg.depthwise_identity)


def _refuse_beside_pretrained(key: str, part: str, source) -> None:
    """An initialisation of a new model's ``part`` that the fine-tuned weights from ``source`` would overwrite."""
    if source is not None:
        raise ConfigError(f"{key} initialises a new model's {part}, but {source} brings trained weights: "
                          f"drop {key.split('=')[0]} or pretrained")


def _check_whiten(margs: dict, source, patches: int) -> None:
    _refuse_beside_pretrained("stem_init=whiten", "patch embedding", source)
    if margs["in_chans"] * margs["patch_size"] ** 2 < 2:
        raise ConfigError(f"stem_init=whiten needs patches of 2 or more values, but {margs['in_chans']} channel(s) "
                          f"x patch_size {margs['patch_size']}^2 make 1: use stem_init=default or a larger patch")
    if patches < 2:
        raise ConfigError("stem_init=whiten estimates a covariance from the training patches, and there is only "
                          "one: use stem_init=default or more images")


def train_size(cfg: TrainConfig, img_size: int, patch_size: int, progress: float) -> int:
    """The image size at this point of training: with progressive resizing, from res_start at the start
    to img_size at res_until, in multiples of the patch size."""
    if not cfg.res_start or cfg.res_start >= img_size or progress >= cfg.res_until:
        return img_size
    size = cfg.res_start + (img_size - cfg.res_start) * progress / cfg.res_until
    return max(patch_size, int(size) // patch_size * patch_size)


def _augmentation(cfg: TrainConfig, data: ImageData, info: RunInfo, device: torch.device):
    """Decoded images are augmented a whole batch at a time, on the training device, where they are moved
    once; files are decoded and augmented image by image in DataLoader workers."""
    if data.images is not None and cfg.randaugment_impl != "timm":  # timm's RandAugment: image by image
        if device.type == "cuda" and data.images.nbytes <= torch.cuda.mem_get_info(device)[0] // 4:
            data.images = data.images.to(device)  # else batches are cut on the CPU and moved one by one
        return BatchAugment(cfg, info.img_size, info.mean, info.std, len(data))
    for key, off in (("hflip_alternate", False), ("randaugment_from", 0.0), ("augment_until", 1.0)):
        if getattr(cfg, key) != off:
            why = "randaugment_impl timm augments image by image" if data.images is not None else \
                "this image folder streams from disk"
            raise ConfigError(f"{key} needs a decoded data set augmented by batches, but {why}: drop {key}")
    return TransformedImages(data, train_transform(cfg, info.img_size, info.mean, info.std), cfg.skip_bad_images)


def _loader(run: Run):
    """This epoch's remaining micro-batches. The loader has its own generator: making the iterator
    must not draw from the global RNG, or a resumed epoch would shift it. Streamed images are augmented
    each from a seed of its own (run seed, epoch, index): the same batches with any number of workers,
    and after a resume."""
    batches = epoch_batches(len(run.train_data), run.cfg, run.epoch, run.world, run.rank)
    if isinstance(run.train_set, BatchAugment):
        return _augmented_batches(run, batches[run.batch * run.cfg.accum_steps:])
    first = (run.cfg.seed * 100_003 + run.epoch) * 2 ** 32
    seeded = [[(i, (first + i) % 2 ** 63) for i in batch] for batch in batches[run.batch * run.cfg.accum_steps:]]
    return worker_errors_in_one_line(torch.utils.data.DataLoader(
        run.train_set, batch_sampler=seeded, num_workers=run.cfg.workers,
        pin_memory=run.device.type == "cuda", generator=torch.Generator().manual_seed(run.cfg.seed + run.epoch),
        worker_init_fn=leave_signals_to_the_parent))


def _augmented_batches(run: Run, batches: list[list[int]]):
    images, labels = run.train_data.images, run.train_data.labels
    for index in batches:
        pick = torch.tensor(index)
        # made lazily, when train_step asks for the batch: progress is that of the step it feeds
        progress = run.progress(run.spent)
        yield run.train_set(images[to_device(pick, images.device)], pick, run.epoch, progress), labels[pick]


def _progress_bar(run: Run):
    if run.rank != 0 or not run.cfg.progress:
        return None
    from tqdm import tqdm
    # a terminal gets a live bar; a log file (nohup, a cluster's job log) one frame a minute
    return tqdm(total=run.steps_per_epoch, initial=run.batch, desc=f"epoch {run.epoch + 1}/{run.cfg.epochs}",
                unit="step", dynamic_ncols=True, leave=False, mininterval=0.1 if sys.stderr.isatty() else 60.0)


def train_epoch(run: Run, stop: SignalFlag) -> str | None:
    """Steps until the epoch ends (None), a signal arrives ("signal") or the time is up ("time")."""
    stats = run.stats or {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
    run.stats = stats
    bar, micro_batches, tick = _progress_bar(run), _loader(run), time.time()
    ended = None
    every = run.cfg.sync_every or (20 if run.device.type == "cuda" else 1)
    while run.batch < run.steps_per_epoch and ended is None:
        train_step(run, micro_batches)
        if bar is not None:
            bar.update(1)
        if run.step % every and run.batch < run.steps_per_epoch:
            continue
        if agree(run, stop):
            ended = "signal"
        elif run.out_of_time(run.spent):
            ended = "time"
        if bar is not None:
            bar.set_postfix(loss=f"{stats['loss'] / stats['seen']:.3f}", acc=f"{stats['correct'] / stats['seen']:.3f}",
                            img_s=f"{stats['seen'] / max(stats['seconds'] + time.time() - tick, 1e-9):.0f}",
                            lr=f"{run.optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    stats["seconds"] += time.time() - tick
    if bar is not None:
        bar.close()
    return ended


# --- end of an epoch, end of the run -------------------------------------------------------------------
def end_of_epoch(run: Run, last: bool) -> dict:
    """Log the epoch, evaluate every eval_every epochs and at the end, then write, in this order: the
    checkpoint (it also holds this epoch's record, so a failed metrics write loses nothing), the best
    weights, the metrics line."""
    cfg, stats = run.cfg, run.stats
    record = dict(epoch=run.epoch + 1, step=run.step, lr=run.optimizer.param_groups[0]["lr"],
                  train_loss=stats["loss"] / stats["seen"], train_acc=stats["correct"] / stats["seen"],
                  epoch_seconds=stats["seconds"], images_per_second=stats["seen"] / max(stats["seconds"], 1e-9))
    rss = resident_mib()
    if rss is not None:
        record["rss_mib"] = rss
    run.epoch, run.batch, run.stats = run.epoch + 1, 0, {}
    # every process evaluates its share of the validation images; all get the whole set's figures
    improved = (run.epoch % cfg.eval_every == 0 or last) and _validate(run, record)
    rng = run.rng_states()
    if run.rank == 0:
        record["elapsed_seconds"] = run.elapsed()
        state = run.checkpoint(rng, record)
        save_checkpoint(run.out / "last.pt", state)
        if cfg.save_every and run.epoch % cfg.save_every == 0:
            save_checkpoint(run.out / f"epoch_{run.epoch:04d}.pt", state)
        if improved:
            save_run_weights(_scored(run, record), run.out / "best.safetensors", run.info, record)
        _print_epoch(record, header=not run.printed)
        run.printed = True
        append_metrics(run.out / "metrics.jsonl", record)
        if run.writer is not None:
            for k, v in record.items():
                run.writer.add_scalar(k, v, run.epoch)
    if run.world > 1:
        dist.barrier()
    return record


def _scored(run: Run, record: dict) -> torch.nn.Module:
    """The weights behind an epoch's best score: the EMA's when it scored at least the model's."""
    use_ema = run.ema is not None and record.get("val_top1_ema", -1) >= record["val_top1"]
    return run.ema.module if use_ema else run.model


def _repair_best(run: Run, ckpt: dict) -> None:
    """best.safetensors is written after last.pt: a kill or a full disk between the two leaves it older than
    the best epoch the checkpoint records. It is rewritten from the checkpoint's own weights on resume."""
    record, path = ckpt.get("record") or {}, run.out / "best.safetensors"
    if run.rank != 0 or run.best.get("epoch") != ckpt["epoch"] or record.get("epoch") != ckpt["epoch"]:
        return
    try:
        written = json.loads(read_metadata(path).get("metrics") or "{}").get("epoch") if path.is_file() else None
    except (WeightsError, ValueError, AttributeError):
        written = None  # unreadable: rewritten
    if written != ckpt["epoch"]:
        save_run_weights(_scored(run, record), path, run.info, record)
        run.log(f"best.safetensors rewritten with epoch {ckpt['epoch']}'s weights (the write after last.pt was lost)")


def _validate(run: Run, record: dict) -> bool:
    """Validation metrics of the model (and its EMA) into ``record``; True if the best so far."""
    start = time.time()
    for suffix, m in [("", run.model)] + ([("_ema", run.ema.module)] if run.ema is not None else []):
        r = evaluate(m, run.val_data, run.info, batch_size=max(256, run.cfg.batch_size), device=run.device,
                     amp=run.dtype, channels_last=run.cfg.channels_last, tta_flip=run.cfg.tta_flip,
                     tta_shift=run.cfg.tta_shift, skip_bad_images=run.cfg.skip_bad_images, workers=run.cfg.workers,
                     distributed=run.distributed)
        record.update({f"val_loss{suffix}": r["loss"], f"val_top1{suffix}": r["top1"], f"val_top5{suffix}": r["top5"]})
    record["eval_seconds"] = time.time() - start
    score = max(record["val_top1"], record.get("val_top1_ema", -1))
    if score <= run.best["val_top1"]:
        return False
    run.best = {"val_top1": score, "epoch": run.epoch}
    return True


def finish(run: Run, time_up: bool) -> dict:
    """The final weights and summary (rank 0)."""
    if run.rank != 0:
        return {}
    cfg, out = run.cfg, run.out
    save_run_weights(run.ema.module if run.ema is not None else run.model, out / "model.safetensors", run.info)
    lines = read_metrics(out) if (out / "metrics.jsonl").exists() else []
    summary = dict(model=cfg.model, params=sum(p.numel() for p in run.model.parameters()), dataset=cfg.dataset,
                   epochs=cfg.epochs, epochs_run=lines[-1]["epoch"] if lines else 0, time_limit_reached=time_up,
                   best_val_top1=run.best["val_top1"], best_epoch=run.best["epoch"],
                   final_val_top1=lines[-1].get("val_top1") if lines else None,
                   **({"final_val_top1_ema": lines[-1].get("val_top1_ema") if lines else None} if run.ema else {}),
                   train_seconds=lines[-1].get("elapsed_seconds") if lines else None,
                   weights=str(out / "model.safetensors"), checkpoint=str(out / "last.pt"))
    write_summary(out / "summary.json", summary)
    run.log(f"done: best val top-1 {100 * run.best['val_top1']:.2f}% (epoch {run.best['epoch']}), weights in "
            f"{out / 'model.safetensors'}")
    return summary


def _interrupted(run: Run, stop: SignalFlag, save: bool = False) -> dict:
    """Stopped by a signal; ``save``: mid-epoch, so last.pt is written here (at an epoch's end it was already)."""
    if save:
        rng = run.rng_states()  # every process takes part
        if run.rank == 0:
            save_checkpoint(run.out / "last.pt", run.checkpoint(rng))
    where = f"at epoch {run.epoch + 1}, step {run.step}" if run.batch else f"after epoch {run.epoch}"
    run.log(f"\n{stop.name}: stopped {where}; checkpoint written to {run.out / 'last.pt'}; continue with "
            f"convmixer train --resume {run.out / 'last.pt'}")
    return {"interrupted": True, "step": run.step, "checkpoint": str(run.out / "last.pt")}


def _agreed_after_epoch(run: Run, stop: SignalFlag) -> tuple[bool, float]:
    """After an epoch's end (its evaluation and writes): whether any process was signalled, and the time spent
    (the processes' mean, which all then use)."""
    t = torch.tensor([float(stop.signum is not None), run.elapsed()], dtype=torch.float64, device=run.device)
    if run.world > 1:
        dist.all_reduce(t)
    return t[0].item() > 0, t[1].item() / run.world


def _announce(run: Run):
    """The start line: the model actually built, the data, the device; and what makes a run pointless."""
    cfg, a = run.cfg, run.info.model_args
    n_params = sum(p.numel() for p in run.model.parameters())
    run.log(f"{cfg.model} (h={a['dim']}, d={a['depth']}, k={a['kernel_size']}, p={a['patch_size']}; "
            f"{n_params / 1e6:.3f}M params) on {cfg.dataset}: {len(run.train_data)} train / {len(run.val_data)} val "
            f"images at {run.info.img_size}px, {run.world} process(es) on {run.device}, "
            f"amp={str(run.dtype).replace('torch.', '') if run.dtype else 'off (fp32)'}, "
            f"{cfg.epochs} epochs x {run.steps_per_epoch} steps")
    total = cfg.epochs * run.steps_per_epoch
    if total < 50 and not cfg.time_limit:
        run.log(f"warning: only {total} optimizer steps in all: the schedule rises to lr {cfg.lr:g} and falls back "
                f"to {cfg.final_lr * cfg.lr:g} within them, too few to learn much; use more epochs, a smaller "
                f"batch_size or a constant schedule")
    if cfg.subset and len(run.val_data) > 4 * len(run.train_data):
        run.log(f"note: each evaluation reads {len(run.val_data)} validation images for {len(run.train_data)} "
                f"training images; --val-max N evaluates on a seeded N of them")


# --- the loop ------------------------------------------------------------------------------------------
def train(cfg: TrainConfig | None = None, resume: str | Path | None = None, overwrite: bool = False,
          changes: dict | None = None) -> dict:
    """Run a training job; returns the final summary (also written to <out>/summary.json).

    ``resume``: a checkpoint (``<out>/last.pt``) whose run to continue, in its own folder, with its own
    settings; ``cfg`` may then be None (or the settings given explicitly as ``changes``), or differ from
    the run's only in config.RESUME_MUTABLE.
    ``overwrite``: replace a finished or abandoned run in ``cfg.out`` instead of refusing."""
    ckpt = load_checkpoint(resume, for_resume=True) if resume else None
    # checked also when a program built the config itself (TrainConfig(eval_every=0) or epochs="3")
    cfg = resolve_val_split(dataclasses.replace(cfg).validate()) if cfg is not None else None
    if ckpt is not None:
        cfg = resumed_config(ckpt, Path(resume), cfg, changes)
    elif cfg is None:
        raise ConfigError("train() needs a config, or resume= a checkpoint")
    # the data folder saved absolute, so that a resume or an eval from another directory finds it
    cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir))
    if ckpt is not None:
        _refuse_an_earlier_checkpoint(ckpt, Path(resume))
    caller = _process_settings()  # restored at the end: a program that calls train() keeps its own
    run = None
    try:
        run = build_run(cfg, ckpt, Path(cfg.out), overwrite)
        # resumed with its time spent: the checkpoint's own figure, the same on every process
        time_up = ckpt is not None and run.out_of_time(run.spent)
        _announce(run)
        with SignalFlag() as stop:
            if time_up and run.batch:  # a signal stopped it mid-epoch as the time ran out: close that epoch
                end_of_epoch(run, last=True)
            while run.epoch < cfg.epochs and not time_up:
                ended = train_epoch(run, stop)
                time_up = ended == "time"
                if ended == "signal" and run.batch < run.steps_per_epoch:
                    return _interrupted(run, stop, save=True)
                last = run.epoch + 1 == cfg.epochs or time_up
                end_of_epoch(run, last)
                if time_up:
                    run.log(f"time limit of {cfg.time_limit:g} min reached at epoch {run.epoch}, step {run.step}")
                elif not last:  # a signal, or the time running out, during the evaluation just done
                    signalled, spent = _agreed_after_epoch(run, stop)
                    if signalled:
                        return _interrupted(run, stop)
                    if run.out_of_time(spent) and run.epoch % cfg.eval_every == 0:
                        time_up, run.spent = True, spent  # not a step more, and not a second evaluation
                        run.log(f"time limit of {cfg.time_limit:g} min reached at epoch {run.epoch}, step {run.step} "
                                f"(while it was evaluated)")
            return finish(run, time_up)
    finally:
        if run is not None:
            if run.folder is not None:
                run.folder.close()
            if run.writer is not None:
                run.writer.close()
        if dist.is_initialized() and not caller["process_group"]:
            dist.destroy_process_group()  # the group this call made, also when building the run failed
        _restore_process_settings(caller)


def _restore_process_settings(saved: dict) -> None:
    torch.use_deterministic_algorithms(saved["deterministic"], warn_only=saved["warn_only"])
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = \
        saved["cuda"]


def _process_settings() -> dict:
    """The process-wide switches a run sets (deterministic algorithms, cuDNN autotuning, TF32), and whether a
    process group existed before it (_restore_process_settings puts the switches back)."""
    return {"deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cuda": (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32),
            "process_group": dist.is_available() and dist.is_initialized()}


def _refuse_an_earlier_checkpoint(ckpt: dict, resume: Path) -> None:
    """Resuming writes the run's folder from the checkpoint's epoch on: from an earlier checkpoint than the
    folder's last epoch (epoch_0004.pt of a run at epoch 9) it would cut the later metrics and replace
    last.pt and best.safetensors. That is refused; the earlier checkpoint resumes in a folder of its own."""
    done = [r.get("epoch", 0) for r in read_metrics(resume.parent)] if (resume.parent / "metrics.jsonl").is_file() else []
    if done and max(done) > ckpt["epoch"]:
        branch = resume.parent.with_name(f"{resume.parent.name}_from_{resume.stem}")
        raise ConfigError(f"{resume} is at epoch {ckpt['epoch']} but its run went on to epoch {max(done)}: resuming it "
                          f"there would replace the later epochs. Resume a copy in a new folder: mkdir {branch} && "
                          f"cp {resume} {branch}/ && convmixer train --resume {branch / resume.name}")


def resumed_config(ckpt: dict, resume: Path, cfg: TrainConfig | None = None,
                   changes: dict | None = None) -> TrainConfig:
    """The config of the run in ``ckpt``: its own, with ``changes`` (keys given explicitly), or ``cfg``
    checked against it; either may only change what config.RESUME_MUTABLE allows. The run continues
    in the checkpoint's folder."""
    from .config import BEFORE_THE_KEY, resume_config
    folder = str(resume.parent)
    out = cfg.out if cfg is not None else (changes or {}).get("out", folder)
    if Path(out).expanduser().resolve() != resume.parent.resolve():
        raise ConfigError(f"--resume continues the run in its own folder {folder}, not --out {out}: drop --out "
                          f"(or copy the folder and resume from the copy)")
    if cfg is None:
        return resume_config(ckpt["config"], {**(changes or {}), "out": folder}, _epochs_begun(ckpt))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in BEFORE_THE_KEY.items() if k not in ckpt["config"]})
    check_resume(ckpt["config"], cfg, _epochs_begun(ckpt))
    return cfg


def _epochs_begun(ckpt: dict) -> int:
    """The epochs a resumed run cannot end before: those done, and the one a mid-epoch checkpoint stopped in."""
    return ckpt["epoch"] + (1 if ckpt.get("batch_in_epoch") else 0)


def _print_epoch(record: dict, header: bool):
    cols = [("epoch", "{:>5d}"), ("lr", "{:>9.2e}"), ("train_loss", "{:>10.4f}"), ("train_acc", "{:>9.4f}"),
            ("val_loss", "{:>8.4f}"), ("val_top1", "{:>8.4f}"), ("epoch_seconds", "{:>13.1f}"),
            ("images_per_second", "{:>17.1f}")]
    width = {name: len(fmt.format(0 if "d" in fmt else 0.0)) for name, fmt in cols}
    if header:
        print("  ".join(f"{name:>{width[name]}}" for name, _ in cols), flush=True)
    print("  ".join(fmt.format(record[name]) if name in record else " " * width[name] for name, fmt in cols),
          flush=True)
