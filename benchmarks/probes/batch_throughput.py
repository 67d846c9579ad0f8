"""Probe (2026-12-02): training throughput of ConvMixer-256/8 k3 p2 (the cifar10_fast90 model) at batch 64
and 128, at 16 and 32 px, fp32 eager with the convmixer command's CPU tuning; median of 5 steps. Output in
batch_throughput.txt. Run: python benchmarks/probes/batch_throughput.py"""
import time, torch, convmixer
convmixer.tune_cpu()
m = convmixer.create_model("convmixer_256_8", kernel_size=3, num_classes=10).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)
for px in (16, 32):
    for b in (64, 128):
        x = torch.randn(b,3,px,px).contiguous(memory_format=torch.channels_last); y = torch.randint(0,10,(b,))
        def step():
            loss = torch.nn.functional.cross_entropy(m(x), y); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        for _ in range(2): step()
        ts=[]
        for _ in range(5):
            t=time.perf_counter(); step(); ts.append(time.perf_counter()-t)
        ts.sort(); print(px, b, "img/s %.1f" % (b/ts[2]), flush=True)
