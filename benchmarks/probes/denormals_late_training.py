"""Probe (2026-11-25): why does training slow down as a run progresses (210 -> 184 img/s at the same
batch, no other load, resident memory flat)? Times training steps on real CIFAR-10 batches for a
freshly initialised model and for the weights of a long run, each with and without flushing
subnormal floats to zero (torch.set_flush_denormal), interleaved, and counts the subnormal values
in activations and gradients.

Run: python benchmarks/probes/denormals_late_training.py results/cifar10_90min_v2/model.safetensors
Figures quoted in BENCHMARKS.md and RESULTS.md."""
import json
import statistics
import subprocess
import sys
import time

import torch

from convmixer.data import STATS, load_dataset
from convmixer.fastops import tune_allocator
from convmixer.run import load_model

tune_allocator()  # as the convmixer command does; flushing subnormals is what this probe varies

TINY = torch.finfo(torch.float32).tiny  # bf16 shares fp32's exponent range, so the same threshold


def batches(n_batches=6, batch=256):
    data = load_dataset("cifar10", "../shared/data")
    mean = torch.tensor(STATS["cifar10"][0]).view(1, 3, 1, 1)
    std = torch.tensor(STATS["cifar10"][1]).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    for _ in range(n_batches):
        i = torch.randint(len(data.labels), (batch,), generator=g)
        x = (data.images[i].float() / 255 - mean) / std
        yield x.contiguous(memory_format=torch.channels_last), data.labels[i]


def subnormal_share(model, x, y):
    """Share of nonzero values below the smallest normal float in activations and in gradients."""
    acts, counts = [], {"activations": [0, 0], "gradients": [0, 0]}
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o)) for m in model.modules()
             if isinstance(m, (torch.nn.GELU, torch.nn.BatchNorm2d))]
    with torch.autocast("cpu", torch.bfloat16):
        out = model(x)
    for a in acts:
        a.retain_grad()
    torch.nn.functional.cross_entropy(out.float(), y).backward()
    for kind, tensors in (("activations", acts), ("gradients", [a.grad for a in acts if a.grad is not None])):
        for t in tensors:
            nz = t[t != 0]
            counts[kind][0] += (nz.abs() < TINY).sum().item()
            counts[kind][1] += nz.numel()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return {k: s / max(n, 1) for k, (s, n) in counts.items()}


def step_seconds(model, data):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7, foreach=True)
    times = []
    for x, y in data:
        t = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])  # first step dropped


def flushed_in_all_threads() -> bool:
    """Subnormal inputs come out as zero in every chunk of a multi-threaded elementwise op."""
    x = torch.full((1 << 22,), 1e-39)
    return bool(((x * 1.0) == 0).all())


def child(path, which, flush):
    # MXCSR (FTZ/DAZ) is per thread: set it before torch starts its thread pool, which inherits it
    torch.set_flush_denormal(flush)
    model, _ = load_model(path)
    if which == "fresh":
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    model.train().to(memory_format=torch.channels_last)
    data = list(batches())
    share = subnormal_share(model, *data[0])
    secs = step_seconds(model, data)
    print(json.dumps(dict(model=which, flush=flush, flushed_all_threads=flushed_in_all_threads(),
                          img_s=data[0][0].shape[0] / secs, **share)))


def main(path):
    rows = []
    for _ in range(2):  # interleaved rounds, each configuration in a fresh process
        for which in ("fresh", "trained"):
            for flush in ("0", "1"):
                out = subprocess.run([sys.executable, __file__, path, which, flush], capture_output=True, text=True,
                                     check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    for which in ("fresh", "trained"):
        for flush in (False, True):
            r = [x for x in rows if x["model"] == which and x["flush"] == flush]
            print(f"{which:8s} flush_denormal={flush!s:5s} (all threads: {r[0]['flushed_all_threads']!s:5s}): "
                  f"{max(x['img_s'] for x in r):6.1f} img/s; subnormal share of nonzero values: activations "
                  f"{r[0]['activations']:.2e}, gradients {r[0]['gradients']:.2e}")


if __name__ == "__main__":
    if len(sys.argv) == 4:
        child(sys.argv[1], sys.argv[2], sys.argv[3] == "1")
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "results/cifar10_90min/model.safetensors")
