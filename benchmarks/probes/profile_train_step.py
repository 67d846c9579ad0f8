"""Probe (2026-11-25; options 2026-11-27): torch.profiler table of one default ConvMixer-256/8 training step
(batch 128). Shares quoted in BENCHMARKS.md.

    python benchmarks/probes/profile_train_step.py [--dtype bf16|fp32] [--layout channels_last|contiguous]

bf16 autocast was the default path on the Zen 4 machine; on a CPU without bf16 hardware the default is fp32."""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import convmixer

ap = argparse.ArgumentParser()
ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
ap.add_argument("--layout", choices=("channels_last", "contiguous"), default="channels_last")
ap.add_argument("--rows", type=int, default=25)
args = ap.parse_args()
convmixer.tune_cpu()  # the allocator setting and subnormal flushing, as the convmixer command applies them
fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
m = convmixer.create_model("convmixer_256_8").to(memory_format=fmt)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)
x = torch.randn(128, 3, 32, 32).contiguous(memory_format=fmt)
y = torch.randint(0, 10, (128,))


def step():
    with torch.autocast("cpu", torch.bfloat16, enabled=args.dtype == "bf16"):
        loss = torch.nn.functional.cross_entropy(m(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(3):
    step()
t = time.perf_counter()
for _ in range(5):
    step()
print(f"{args.dtype} {args.layout}: step ms {(time.perf_counter() - t) / 5 * 1e3:.1f}")
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(3):
        step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
