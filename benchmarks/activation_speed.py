"""Training steps per second of a config's model with GELU and with ReLU, side by side in one process on
this machine, at sizes its progressive resizing passes through (16 -> 32 px for cifar10_fast90): the speed half of the ReLU/GELU question
of issue 16, separate from the machine (full runs on two machines differed by up to 1.9x).

    python benchmarks/activation_speed.py [--config cifar10_fast90] [--sizes 16 24 32] [--steps 10] [--rounds 2]

The step is the config's: its model, optimizer (Muon + AdamW), batch, autocast and memory layout, with the
same random batch for both; the candidates alternate within each round, so a drift of the machine's speed
falls on both. Prints JSON (machine, versions, command, images per second, ratio ReLU / GELU per size)."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from convmixer.bench import cpu_name
from convmixer.config import make_config
from convmixer.model import ConvMixer, model_kwargs
from convmixer.runtime import amp_dtype, tune_cpu
from convmixer.train import make_optimizer


def candidate(cfg, activation: str):
    model = ConvMixer(**{**model_kwargs(cfg.model), **cfg.model_overrides(), "act_layer": activation,
                         "num_classes": 10}).to(memory_format=torch.channels_last)
    return model, make_optimizer(cfg, model, amp_dtype(cfg.amp, torch.device("cpu")))


def seconds_per_step(model, optimizer, dtype, images, labels) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(model(images).float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10_fast90")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 24, 32])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per candidate per round (median)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    tune_cpu()  # as the convmixer command does for itself
    cfg = make_config(args.config, {})
    dtype = amp_dtype(cfg.amp, torch.device("cpu"))
    torch.manual_seed(0)
    models = {a: candidate(cfg, a) for a in ("gelu", "relu")}
    report = {"machine": f"{cpu_name()} ({platform.machine()})", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "amp": str(dtype), "config": args.config, "batch_size": cfg.batch_size,
              "command": " ".join(["python"] + sys.argv), "sizes": {}}
    for size in args.sizes:
        images = torch.randn(cfg.batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(10, (cfg.batch_size,))
        times = {a: [] for a in models}
        for _ in range(2):  # warm-up
            for model, optimizer in models.values():
                seconds_per_step(model, optimizer, dtype, images, labels)
        for r in range(args.rounds):
            for a in (list(models) if r % 2 == 0 else list(models)[::-1]):
                times[a] += [seconds_per_step(*models[a], dtype, images, labels) for _ in range(args.steps)]
        ips = {a: cfg.batch_size / statistics.median(t) for a, t in times.items()}
        report["sizes"][size] = {"gelu_images_per_second": round(ips["gelu"], 1),
                                 "relu_images_per_second": round(ips["relu"], 1),
                                 "relu_over_gelu": round(ips["relu"] / ips["gelu"], 3)}
        print(f"{size} px: GELU {ips['gelu']:.0f} img/s, ReLU {ips['relu']:.0f} img/s, "
              f"ReLU / GELU {ips['relu'] / ips['gelu']:.3f}", file=sys.stderr)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
