"""Probe (2026-11-25): torch.compile against eager for a ConvMixer-256/8 training step and inference.
Run: python benchmarks/probes/compile_vs_eager.py [fp32]  (bf16 autocast unless fp32 is given; 2026-11-27:
the option, for CPUs without bf16). Figures quoted in BENCHMARKS.md."""
import sys, torch, time
import convmixer
BF16 = sys.argv[1:] != ["fp32"]
convmixer.tune_cpu()  # the allocator setting and subnormal flushing, as the convmixer command applies them
m = convmixer.create_model("convmixer_256_8").to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)
x = torch.randn(128,3,32,32).contiguous(memory_format=torch.channels_last); y = torch.randint(0,10,(128,))
cm = torch.compile(m)
def step(mm):
    with torch.autocast("cpu", torch.bfloat16, enabled=BF16):
        loss = torch.nn.functional.cross_entropy(mm(x).float(), y)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
t=time.perf_counter(); step(cm); print("compile s", time.perf_counter()-t)
for mm, name in ((m, "eager"), (cm, "compiled")):
    for _ in range(2): step(mm)
    t=time.perf_counter()
    for _ in range(5): step(mm)
    print(name, "step ms", (time.perf_counter()-t)/5*1e3)
m.eval(); 
xi = torch.randn(256,3,32,32).contiguous(memory_format=torch.channels_last)
with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=BF16):
    for mm, name in ((m, "eager"), (cm, "compiled")):
        mm(xi); mm(xi)
        t=time.perf_counter()
        for _ in range(5): mm(xi)
        print(name, "infer img/s", 256*5/(time.perf_counter()-t))
