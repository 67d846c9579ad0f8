"""Probe (2026-12-06): the elementwise half of a bf16 training step, one activation -> BatchNorm pair alone.

    python benchmarks/probes/act_norm_region.py [--shapes 128x256x8x8 128x256x16x16] [--steps 20]

A ConvMixer layer runs act -> BatchNorm twice (after the depthwise and after the pointwise convolution);
in a bf16 step on a Zen 4 the pairs with their backward take about 40-45% of the step (the CIFAR-10 and
Fashion-MNIST configs), and exact GELU in bf16 is slower than in fp32. Each candidate here is forward + backward of norm(act(x)) in training
mode, on a bf16 channels_last tensor of the given shape under CPU autocast, timed alone (median of
``--steps``): eager exact GELU, eager tanh GELU, eager ReLU (the floor), and the same pairs as one
torch.compile region (inductor fuses the activation into BatchNorm's passes, forward and backward).
The candidates alternate step by step, so a machine's drift hits all."""
import argparse
import statistics
import time

import torch
import torch.nn as nn

import convmixer

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--shapes", nargs="+", default=["128x256x8x8", "128x256x12x12", "128x256x16x16"],
                help="N x C x H x W of the activation (cifar10_fast90: 8x8 at 16 px, 16x16 at 32 px)")
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--no-compile", action="store_true", help="eager candidates only")
args = ap.parse_args()
convmixer.tune_cpu()
torch._dynamo.config.recompile_limit = 64  # shapes x autocast on/off x 3 regions share one forward


class ActNorm(nn.Module):
    def __init__(self, act: nn.Module, dim: int):
        super().__init__()
        self.act, self.norm = act, nn.BatchNorm2d(dim)

    def forward(self, x):
        return self.norm(self.act(x))


ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"), "relu": nn.ReLU}


def candidates(dim: int) -> dict:
    out = {name: ActNorm(make(), dim) for name, make in ACTIVATIONS.items()}
    if not args.no_compile:
        out.update({f"{name}_compiled": torch.compile(ActNorm(make(), dim), dynamic=False)
                    for name, make in ACTIVATIONS.items()})
    return out


def step(module, x) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    y.backward(torch.ones_like(y))
    return time.perf_counter() - t


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward ms of norm(act(x)), bf16")
for shape in args.shapes:
    n, c, h, w = map(int, shape.split("x"))
    x = torch.randn(n, c, h, w).to(torch.bfloat16).to(memory_format=torch.channels_last).requires_grad_()
    mods = candidates(c)
    times = {name: [] for name in mods}
    for i in range(args.warmup + args.steps):
        for name, module in mods.items():
            x.grad = None
            t = step(module, x)
            if i >= args.warmup:
                times[name].append(t)
    # the compiled region computes what the eager one does
    ref = mods["gelu"](x.float()).detach()
    if "gelu_compiled" in mods:
        mods["gelu_compiled"].norm.load_state_dict(mods["gelu"].norm.state_dict())
        err = (mods["gelu_compiled"](x.float()).detach() - ref).abs().max().item()
        print(f"{shape}: compiled vs eager fp32 GELU max abs difference {err:.2e}")
    print(f"{shape}: " + ", ".join(f"{name} {statistics.median(t) * 1e3:.2f}" for name, t in times.items()))
