"""Training: one loop, read top to bottom. Works on one CPU/GPU process or many through torchrun.

    torchrun --nproc_per_node=N -m convmixer train --config cifar10_paper

``batch_size`` is the global batch of one optimizer step; each of the world_size x accum_steps
micro-batches is one equal slice of it, so N processes, or one process accumulating N micro-batches,
take the same steps (up to floating-point reduction order).
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
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import ConfigError, TrainConfig
from .data import (STATS, AugmentConfig, ImageData, TransformedImages, batch_mixer, load_dataset,
                   split_train_val, train_transform)
from .evaluate import evaluate
from .model import ConvMixer, model_kwargs
from .weights import atomic_write, save_weights, torch_load_safely


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, a checkpoint for another run, ...)."""


# --- small pure policies ----------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based) of ``total_steps``."""
    t = step / max(total_steps, 1)
    if cfg.schedule == "onecycle":  # piecewise linear: 0 -> 1 at peak_at (-> knee_lr at knee_at) -> final_lr
        knee = [(cfg.knee_at, cfg.knee_lr)] if cfg.knee_at > cfg.peak_at else []
        points = [(0.0, 0.0), (cfg.peak_at, 1.0), *knee, (1.0, cfg.final_lr)]
        for (t0, y0), (t1, y1) in zip(points, points[1:]):
            if t <= t1 or t1 == 1.0:
                return y0 + (y1 - y0) * min(t - t0, t1 - t0) / max(t1 - t0, 1e-12)
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return cfg.final_lr + (1.0 - cfg.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 where the hardware has it (CPU with AVX512-BF16/AMX, recent GPUs)."""
    if cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def soft_cross_entropy(logits, target, smoothing: float):
    if target.ndim == 1:
        return F.cross_entropy(logits, target, label_smoothing=smoothing)
    if smoothing:
        target = target * (1 - smoothing) + smoothing / logits.shape[-1]
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


# --- distributed ------------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# --- checkpoints --------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict):
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise TrainingError(f"could not write checkpoint {path} ({reason}); the previous one is intact: "
                            f"free space or fix permissions, then --resume {path}") from None


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint not found: {path}")
    ckpt = torch_load_safely(path, TrainingError)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise TrainingError(f"{path} is not a convmixer training checkpoint (for plain weights use eval/predict)")
    return ckpt


# --- the run ------------------------------------------------------------------------------------
def _log0(rank: int, *args):
    if rank == 0:
        print(*args, flush=True)


def prepare_data(cfg: TrainConfig) -> tuple[ImageData, ImageData, dict]:
    train_all = load_dataset(cfg.dataset, cfg.data_dir, train=True, img_size=cfg.img_size, download=cfg.download,
                             skip_bad_images=cfg.skip_bad_images, cache=cfg.cache)
    if cfg.val_split > 0:
        train, val = split_train_val(train_all, cfg.val_split, seed=cfg.seed)
    else:
        train = train_all
        val = load_dataset(cfg.dataset, cfg.data_dir, train=False, img_size=cfg.img_size, download=cfg.download,
                           skip_bad_images=cfg.skip_bad_images, cache=cfg.cache)
    if list(val.classes) != list(train_all.classes):
        raise ConfigError(f"the validation classes ({', '.join(val.classes[:4])}...) differ from the training classes "
                          f"({', '.join(train_all.classes[:4])}...): give both splits the same class folders")
    if cfg.subset:
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))[:cfg.subset]
        train = train.subset(pick.sort().values)  # a seeded random subset: every class, not the first folders
    if train.images is not None:
        native = train.images.shape[-1]
    elif cfg.dataset == "cifar10":
        native = 32
    else:
        native = 224
    img_size = cfg.img_size or native
    mean, std = STATS[cfg.dataset]
    if train.channels == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    info = dict(img_size=img_size, mean=list(mean), std=list(std), classes=train_all.classes,
                in_chans=train.channels, dataset=cfg.dataset, crop_pct=cfg.crop_pct)
    return train, val, info


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


def train(cfg: TrainConfig, resume: str | Path | None = None) -> dict:
    """Run a training job; returns the final summary (also written to <out>/summary.json)."""
    rank, world, device = setup_distributed()
    if cfg.batch_size % (world * cfg.accum_steps):
        raise ConfigError(f"batch_size {cfg.batch_size} does not split into {world} process(es) x "
                          f"{cfg.accum_steps} accumulation step(s): pick a multiple of {world * cfg.accum_steps}")
    out = Path(cfg.out)
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None:
        saved_cfg = ckpt.get("config", {})
        same = {k: v for k, v in ckpt["model_args"].items() if k != "fast"}
        if saved_cfg.get("model") != cfg.model or same != {k: v for k, v in _model_args(cfg, same).items() if k != "fast"}:
            raise TrainingError(f"{resume} was trained with another model ({saved_cfg.get('model')}); resume with "
                                f"the run's own config: --config {out / 'config.yaml'}")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    if world > 1 and rank != 0:
        dist.barrier()  # rank 0 downloads, unpacks and caches first; the others then read its cache
    train_data, val_data, info = prepare_data(cfg)
    if world > 1 and rank == 0:
        dist.barrier()
    num_classes = len(info["classes"])
    if len(train_data) < cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(train_data)} training images: "
                          f"lower batch_size")
    margs = dict(model_kwargs(cfg.model), num_classes=num_classes, in_chans=info["in_chans"], **cfg.model_overrides())
    if margs["patch_size"] > info["img_size"]:
        raise ConfigError(f"patch_size {margs['patch_size']} is larger than the {info['img_size']} px images")
    model = ConvMixer(**margs)
    if cfg.pretrained and ckpt is None:
        from .weights import load_into, read_state_dict
        skipped = load_into(model, read_state_dict(cfg.pretrained), strict=False, source=cfg.pretrained)
        _log0(rank, f"loaded {cfg.pretrained}" + (f"; new (not loaded): {', '.join(skipped)}" if skipped else ""))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if world > 1:  # distinct augmentation draws per process (the weights are broadcast by DDP anyway)
        torch.manual_seed(cfg.seed + 1000 * rank)
        random.seed(cfg.seed + 1000 * rank)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if world > 1 and cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model
    dtype = amp_dtype(cfg, device)
    ema = None
    if cfg.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(model) if cfg.compile else model

    decay, no_decay = [], []
    for name, p in raw_model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and norms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, eps=cfg.opt_eps,
                                  foreach=True)
    steps_per_epoch = len(train_data) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    # with a time limit the schedule follows the wall-clock fraction spent (agreed across processes)
    limit = cfg.time_limit * 60
    started = time.time() - (float(ckpt.get("elapsed", 0.0)) if ckpt is not None else 0.0)  # resumes keep counting

    def elapsed() -> float:
        return time.time() - started
    spent = elapsed()  # seconds: the last value all processes agreed on (read by schedule_step)

    def schedule_step(step: int) -> int:
        return max(step, min(total_steps, round(spent / limit * total_steps))) if limit else step
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(schedule_step(s), total_steps, cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    aug = AugmentConfig(img_size=info["img_size"], scale_min=cfg.scale_min, hflip=cfg.hflip,
                        randaugment_n=cfg.randaugment_n, randaugment_m=cfg.randaugment_m,
                        color_jitter=cfg.color_jitter, random_erasing=cfg.random_erasing, mixup=cfg.mixup,
                        cutmix=cfg.cutmix, crop_pct=cfg.crop_pct)
    train_set = TransformedImages(train_data, train_transform(aug, info["mean"], info["std"]), cfg.skip_bad_images)
    mixer = batch_mixer(aug, num_classes)

    start_epoch, start_batch, global_step, best = 0, 0, 0, {"val_top1": -1.0, "epoch": -1}
    partial = {}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, start_batch = ckpt["epoch"], ckpt["batch_in_epoch"]
        global_step, best, partial = ckpt["step"], ckpt["best"], ckpt.get("partial", {})
        _set_rng_state(ckpt["rng"])  # rank 0's; the other ranks continue from their own seeds
        if rank > 0:
            torch.manual_seed(cfg.seed + 1000 * rank + global_step)
            random.seed(cfg.seed + 1000 * rank + global_step)
        _log0(rank, f"resumed from {resume}: epoch {start_epoch + 1}, step {global_step}")

    state_meta = dict(model_args=margs, model_name=cfg.model, config=dataclasses.asdict(cfg), **info)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        import yaml
        atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)))
        _truncate_metrics(out / "metrics.jsonl", start_epoch)
    writer = None
    if cfg.tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            _log0(rank, "tensorboard is not installed (pip install tensorboard); continuing without it")

    stop = {"signal": None}
    previous_handlers = {}

    def on_signal(signum, frame):
        stop["signal"] = signum
    for sig in (signal.SIGINT, signal.SIGTERM):  # on every rank: torchrun forwards signals to all of them
        try:
            previous_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread
            pass

    def state(epoch, batch_in_epoch, partial_stats):
        return dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict(), ema=None if ema is None else ema.state_dict(), rng=_rng_state(),
                    epoch=epoch, batch_in_epoch=batch_in_epoch, step=global_step, best=best, partial=partial_stats,
                    elapsed=elapsed(), **state_meta)

    n_params = sum(p.numel() for p in raw_model.parameters())
    _log0(rank, f"{cfg.model} ({n_params / 1e6:.3f}M params) on {cfg.dataset}: {len(train_data)} train / "
                f"{len(val_data)} val images at {info['img_size']}px, {world} process(es) on {device}, "
                f"amp={dtype}, {cfg.epochs} epochs x {steps_per_epoch} steps")
    summary = {}
    stopping = time_up = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if limit and spent >= limit:  # resumed after the time limit was spent
                break
            model.train()
            batches = epoch_batches(len(train_data), cfg, epoch, world, rank)
            first = start_batch if epoch == start_epoch else 0
            loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches[first * cfg.accum_steps:],
                                                 num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                                 # its own generator: making the iterator must not draw from
                                                 # the global RNG, or a resumed epoch would shift it
                                                 generator=torch.Generator().manual_seed(cfg.seed + epoch))
            stats = partial if (epoch == start_epoch and partial) else {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
            progress = None
            if rank == 0 and cfg.progress:
                from tqdm import tqdm
                # a terminal gets a live bar; a log file (nohup, a cluster's job log) one frame a minute
                progress = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                                unit="step", dynamic_ncols=True, leave=False,
                                mininterval=0.1 if sys.stderr.isatty() else 60.0)
            tick = time.time()
            micro_iter = iter(loader)
            for batch_index in range(first, steps_per_epoch):
                # ---- one optimizer step: accum_steps micro-batches, then clip, step, schedule
                bad_loss = None
                for a in range(cfg.accum_steps):
                    images, labels = next(micro_iter)
                    images = images.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                    if cfg.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    images, targets = mixer(images, labels) if mixer else (images, labels)
                    sync = nullcontext() if (world == 1 or a == cfg.accum_steps - 1) else model.no_sync()
                    with sync:
                        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                            logits = step_model(images)
                            loss = soft_cross_entropy(logits.float(), targets, cfg.label_smoothing)
                        scaler.scale(loss / cfg.accum_steps).backward()
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        bad_loss = loss_value
                    hard = targets.argmax(-1) if targets.ndim == 2 else targets
                    stats["loss"] += loss_value * len(labels)
                    stats["correct"] += (logits.argmax(-1) == hard).sum().item()
                    stats["seen"] += len(labels)
                # all processes agree on stopping (a signal seen by any) and on a non-finite loss
                flags = torch.tensor([float(bad_loss is not None), float(stop["signal"] is not None), elapsed()],
                                     dtype=torch.float64, device=device)
                if world > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                if flags[0] > 0:
                    raise TrainingError(f"loss became {bad_loss if bad_loss is not None else 'non-finite'} at epoch "
                                        f"{epoch + 1}, step {global_step + 1}: lower lr (now {cfg.lr}), keep clip_grad "
                                        f"on, or set amp=off; the last good checkpoint {out / 'last.pt'} is untouched")
                stopping = flags[1] > 0
                spent = flags[2].item()
                time_up = bool(limit) and spent >= limit
                if cfg.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(raw_model)
                global_step += 1
                # ---- feedback
                if progress is not None:
                    busy = stats["seconds"] + time.time() - tick
                    progress.update(1)
                    progress.set_postfix(loss=f"{stats['loss'] / stats['seen']:.3f}",
                                         acc=f"{stats['correct'] / stats['seen']:.3f}",
                                         img_s=f"{stats['seen'] * world / max(busy, 1e-9):.0f}",
                                         lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
                if stopping and batch_index + 1 < steps_per_epoch:
                    stats["seconds"] += time.time() - tick
                    if rank == 0:
                        save_checkpoint(out / "last.pt", state(epoch, batch_index + 1, stats))
                    name = signal.Signals(stop["signal"] or signal.SIGTERM).name
                    _log0(rank, f"\n{name}: stopped at epoch {epoch + 1}, step {global_step}; checkpoint written to "
                                f"{out / 'last.pt'}; continue with --resume {out / 'last.pt'}")
                    return {"interrupted": True, "step": global_step, "checkpoint": str(out / "last.pt")}
                if time_up:
                    _log0(rank, f"time limit of {cfg.time_limit:g} min reached at epoch {epoch + 1}, step {global_step}")
                    break
            if progress is not None:
                progress.close()
            del micro_iter, loader
            seconds = stats["seconds"] + time.time() - tick
            record = dict(epoch=epoch + 1, step=global_step, lr=scheduler.get_last_lr()[0],
                          train_loss=stats["loss"] / stats["seen"], train_acc=stats["correct"] / stats["seen"],
                          epoch_seconds=seconds, images_per_second=stats["seen"] * world / seconds)
            if world > 1:  # sum the per-process training statistics
                t = torch.tensor([stats["loss"], stats["correct"], stats["seen"]], dtype=torch.float64, device=device)
                dist.all_reduce(t)
                record.update(train_loss=(t[0] / t[2]).item(), train_acc=(t[1] / t[2]).item())
            last_epoch = epoch + 1 == cfg.epochs or time_up
            rss = _resident_mib()
            if rss is not None:
                record["rss_mib"] = rss
            if rank == 0:  # every epoch is logged; the validation metrics every eval_every epochs and at the end
                improved = False
                if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
                    eval_start = time.time()
                    for suffix, m in [("", raw_model)] + ([("_ema", ema.module)] if ema is not None else []):
                        r = evaluate(m, val_data, info, batch_size=max(256, cfg.batch_size), device=device, amp=dtype,
                                     channels_last=cfg.channels_last, tta_flip=cfg.tta_flip, tta_shift=cfg.tta_shift)
                        record.update({f"val_loss{suffix}": r["loss"], f"val_top1{suffix}": r["top1"],
                                       f"val_top5{suffix}": r["top5"]})
                    record["eval_seconds"] = time.time() - eval_start
                    score = max(record["val_top1"], record.get("val_top1_ema", -1))
                    improved = score > best["val_top1"]
                    if improved:
                        best = {"val_top1": score, "epoch": epoch + 1}
                record["elapsed_seconds"] = elapsed()
                _print_epoch(record, epoch == start_epoch)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for k, v in record.items():
                        writer.add_scalar(k, v, epoch + 1)
                if improved:
                    use_ema = ema is not None and record.get("val_top1_ema", -1) >= record["val_top1"]
                    _save_weights(ema.module if use_ema else raw_model, out / "best.safetensors", state_meta, record)
                save_checkpoint(out / "last.pt", state(epoch + 1, 0, {}))
                if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
                    save_checkpoint(out / f"epoch_{epoch + 1:04d}.pt", state(epoch + 1, 0, {}))
            if world > 1:
                dist.barrier()
            if time_up:
                break
            if stopping and not last_epoch:
                _log0(rank, f"{signal.Signals(stop['signal'] or signal.SIGTERM).name}: stopped after epoch {epoch + 1}; continue with "
                            f"--resume {out / 'last.pt'}")
                return {"interrupted": True, "step": global_step, "checkpoint": str(out / "last.pt")}
        if rank == 0:
            final = ema.module if ema is not None else raw_model
            _save_weights(final, out / "model.safetensors", state_meta, {})
            lines = _read_metrics(out / "metrics.jsonl")
            summary = dict(model=cfg.model, params=n_params, dataset=cfg.dataset, epochs=cfg.epochs,
                           epochs_run=lines[-1]["epoch"] if lines else 0, time_limit_reached=time_up,
                           best_val_top1=best["val_top1"], best_epoch=best["epoch"],
                           final_val_top1=lines[-1].get("val_top1") if lines else None,
                           train_seconds=lines[-1].get("elapsed_seconds") if lines else None,
                           weights=str(out / "model.safetensors"), checkpoint=str(out / "last.pt"))
            atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
            _log0(rank, f"done: best val top-1 {100 * best['val_top1']:.2f}% (epoch {best['epoch']}), weights in "
                        f"{out / 'model.safetensors'}")
        return summary
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        if writer is not None:
            writer.close()


def _model_args(cfg: TrainConfig, saved: dict) -> dict:
    """The model arguments ``cfg`` would build, completed with what the data decided (classes, channels)."""
    args = dict(model_kwargs(cfg.model), **cfg.model_overrides())
    args["num_classes"], args["in_chans"] = saved.get("num_classes"), saved.get("in_chans")
    return args


def _save_weights(model: torch.nn.Module, path: Path, meta: dict, record: dict):
    metadata = {"model_args": json.dumps(meta["model_args"]), "model_name": meta["model_name"],
                "classes": json.dumps(meta["classes"]), "mean": json.dumps(meta["mean"]),
                "std": json.dumps(meta["std"]), "img_size": str(meta["img_size"]), "dataset": meta["dataset"],
                "metrics": json.dumps(record), "config": json.dumps(meta["config"])}
    try:
        save_weights(model, path, metadata)
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise TrainingError(f"could not write {path} ({reason}); the previous file is intact: free space or fix "
                            f"permissions, then --resume {path.parent / 'last.pt'}") from None


def _resident_mib() -> float | None:
    """This process's resident memory now (Linux), to spot growth over a long run."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _read_metrics(path: Path) -> list[dict]:
    """The epoch records; a line cut short by a crash is ignored."""
    records = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def _truncate_metrics(path: Path, start_epoch: int):
    """On resume, drop epoch lines the resumed run will write again (and any cut-short line)."""
    if path.exists():
        keep = [r for r in _read_metrics(path) if r.get("epoch", 0) <= start_epoch]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in keep)))


def _print_epoch(record: dict, header: bool):
    cols = [("epoch", "{:>5d}"), ("lr", "{:>9.2e}"), ("train_loss", "{:>10.4f}"), ("train_acc", "{:>9.4f}"),
            ("val_loss", "{:>8.4f}"), ("val_top1", "{:>8.4f}"), ("epoch_seconds", "{:>13.1f}"),
            ("images_per_second", "{:>17.1f}")]
    width = {name: len(fmt.format(0 if "d" in fmt else 0.0)) for name, fmt in cols}
    if header:
        print("  ".join(f"{name:>{width[name]}}" for name, _ in cols), flush=True)
    print("  ".join(fmt.format(record[name]) if name in record else " " * width[name] for name, fmt in cols),
          flush=True)
