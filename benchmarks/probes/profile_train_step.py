"""Probe (2026-11-25): torch.profiler table of one default ConvMixer-256/8 training step (batch 128).
Run: python benchmarks/probes/profile_train_step.py. Shares quoted in BENCHMARKS.md."""
import torch, time
import convmixer
convmixer.tune_cpu()  # the allocator setting and subnormal flushing, as the convmixer command applies them
from torch.profiler import profile, ProfilerActivity
m = convmixer.create_model("convmixer_256_8").to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)
x = torch.randn(128,3,32,32).contiguous(memory_format=torch.channels_last); y = torch.randint(0,10,(128,))
def step():
    with torch.autocast("cpu", torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(m(x).float(), y)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(3): step()
t=time.perf_counter()
for _ in range(5): step()
print("step ms", (time.perf_counter()-t)/5*1e3)
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(3): step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
