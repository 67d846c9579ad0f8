"""Probe (2026-12-01; two configs of any kind since 2026-12-02): one whole training step of two variants of
a config, alternating step by step in one process, so that a machine's drift hits both.

    python benchmarks/probes/step_ab.py [--config cifar10_fast90] [--a optimizer=adamw] [--b]
        [--sizes 16 24 32] [--steps 10]

Each candidate is the config with its KEY=VALUE overrides (``--b`` alone: the config as it is): its model,
batch size, optimizers (built by ``train.make_optimizer``), clipping and label smoothing, bf16 autocast
where the CPU has it, channels_last, forward, backward and the optimizer's step. Prints the median ms a
step and img/s of each, and B's time per image over A's. Batch-size comparisons need this: two training
runs on one machine hours apart differed by 1.8x (2026-12-02), more than the change measured.
``muon_vs_adamw_step.txt`` is this probe's default (A = AdamW, B = the config's Muon) at batch 128."""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import convmixer
from convmixer.config import make_config, parse_overrides
from convmixer.runtime import amp_dtype
from convmixer.train import make_optimizer

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--config", default="cifar10_fast90", help="the config both candidates start from")
ap.add_argument("--a", nargs="*", default=["optimizer=adamw"], metavar="KEY=VALUE", help="candidate A's overrides")
ap.add_argument("--b", nargs="*", default=[], metavar="KEY=VALUE", help="candidate B's overrides")
ap.add_argument("--sizes", type=int, nargs="+", default=[16, 24, 32], help="image sizes in pixels")
ap.add_argument("--steps", type=int, default=10, help="timed steps per candidate and size (median reported)")
ap.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate and size first")
args = ap.parse_args()
convmixer.tune_cpu()  # the allocator setting and subnormal flushing, as the convmixer command applies them

candidates = {}
for name, overrides in (("A", args.a), ("B", args.b)):
    cfg = make_config(args.config, parse_overrides(overrides))
    dtype = amp_dtype(cfg.amp, torch.device("cpu"))
    torch.manual_seed(0)
    model = convmixer.create_model(cfg.model, **cfg.model_overrides()).to(memory_format=torch.channels_last)
    candidates[name] = (cfg, dtype, model, make_optimizer(cfg, model, dtype))


def step(cfg, dtype, model, optimizer, x, y) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)
    loss.backward()
    if cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, config {args.config}; "
      f"A: {' '.join(args.a) or '(the config)'}; B: {' '.join(args.b) or '(the config)'}")
for name, (cfg, dtype, _, optimizer) in candidates.items():
    print(f"{name}: batch {cfg.batch_size}, optimizer {cfg.optimizer}, autocast {dtype}")
print("size  A ms/step  B ms/step  A img/s  B img/s  B/A time per image")
for size in args.sizes:
    times = {name: [] for name in candidates}
    batches = {}
    for name, (cfg, *_rest) in candidates.items():
        x = torch.randn(cfg.batch_size, 3, size, size)  # the CIFAR-10 configs this probe is for
        batches[name] = (x.contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (cfg.batch_size,)))
    for i in range(args.warmup + args.steps):
        for name, candidate in candidates.items():
            seconds = step(*candidate, *batches[name])
            if i >= args.warmup:
                times[name].append(seconds)
    a, b = (statistics.median(times[n]) for n in "AB")
    na, nb = (candidates[n][0].batch_size for n in "AB")
    print(f"{size:4d}  {a * 1e3:9.1f}  {b * 1e3:9.1f}  {na / a:7.1f}  {nb / b:7.1f}  {(b / nb) / (a / na):19.3f}",
          flush=True)
