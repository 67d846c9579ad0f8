"""Probe (2026-12-01): the cost of --optimizer muon against AdamW, side by side in one process.

    python benchmarks/probes/muon_vs_adamw_step.py [--sizes 16 24 32] [--steps 10] [--batch-size 128]

The tenth session's 30-minute Muon run trained 28-32 px images about 20% slower than an AdamW run of the
same config had on another machine, with the same speed at 16 px. This measures the whole optimizer step
of the training loop (bf16 autocast where the CPU has it, channels_last, forward, backward, the config's
clipping and label smoothing, the optimizer's step) for the cifar10_fast90 model (ConvMixer-256/8 k3 p2),
with optimizers built by ``train.make_optimizer`` from that config (Muon) and from it with optimizer=adamw;
the two candidates alternate step by step, so a machine's drift hits both. Prints median ms a step and img/s for each, and Muon's time over AdamW's."""
import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

import convmixer
from convmixer.config import make_config
from convmixer.runtime import amp_dtype
from convmixer.train import make_optimizer

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--sizes", type=int, nargs="+", default=[16, 24, 32], help="image sizes in pixels")
ap.add_argument("--steps", type=int, default=10, help="timed steps per candidate and size (median reported)")
ap.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate and size first")
ap.add_argument("--batch-size", type=int, default=128, help="training batch")
args = ap.parse_args()
convmixer.tune_cpu()  # the allocator setting and subnormal flushing, as the convmixer command applies them

run_cfg = make_config("cifar10_fast90")
dtype = amp_dtype(run_cfg.amp, torch.device("cpu"))
candidates = {}
for name, cfg in (("adamw", dataclasses.replace(run_cfg, optimizer="adamw")), ("muon", run_cfg)):
    torch.manual_seed(0)
    model = convmixer.create_model(cfg.model, **cfg.model_overrides()).to(memory_format=torch.channels_last)
    candidates[name] = (model, make_optimizer(cfg, model, dtype))


def step(model, optimizer, x, y) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(model(x).float(), y, label_smoothing=run_cfg.label_smoothing)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), run_cfg.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, autocast {dtype}, batch {args.batch_size}")
print("size  adamw ms  muon ms  adamw img/s  muon img/s  muon/adamw time")
for size in args.sizes:
    x = torch.randn(args.batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    times = {name: [] for name in candidates}
    for i in range(args.warmup + args.steps):
        for name, (model, optimizer) in candidates.items():
            seconds = step(model, optimizer, x, y)
            if i >= args.warmup:
                times[name].append(seconds)
    a, m = (statistics.median(times[n]) for n in ("adamw", "muon"))
    print(f"{size:4d}  {a * 1e3:8.1f}  {m * 1e3:7.1f}  {args.batch_size / a:11.1f}  {args.batch_size / m:10.1f}"
          f"  {m / a:15.3f}")
