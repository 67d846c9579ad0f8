"""Issue 15, lever 2 (2026-11-27): a whole fp32 training step of ConvMixer-256/8 (batch 128, 32 px,
channels_last) with fastops' depthwise backward as shipped, and with its weight gradient taken from
oneDNN's own kernel instead (no channels_last -> NCHW copies), interleaved step by step.

    python benchmarks/probes/depthwise_weight_grad_step.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

import convmixer
from convmixer import fastops

SHIPPED = fastops._DepthwiseConv2d.backward


def onednn_weight_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    channels, pad = weight.shape[0], weight.shape[-1] // 2
    grad_x = F.conv2d(grad, weight.flip(-1, -2).to(grad.dtype), padding=pad, groups=channels).to(x.dtype)
    grad_w = torch.ops.aten.convolution_backward(grad, x, weight.to(x.dtype), None, [1, 1], [pad, pad], [1, 1], False,
                                                 [0, 0], channels, [False, True, False])[1]
    grad_b = grad.sum((0, 2, 3), dtype=torch.float32).to(weight.dtype) if ctx.has_bias else None
    return grad_x, grad_w.to(weight.dtype), grad_b


def main():
    convmixer.tune_cpu()
    torch.manual_seed(0)
    model = convmixer.create_model("convmixer_256_8").to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    variants = {"fastops as shipped (per-plane dW, two copies)": SHIPPED,
                "oneDNN weight gradient (no copies)": staticmethod(onednn_weight_grad)}
    grads = {}
    for name, backward in variants.items():
        fastops._DepthwiseConv2d.backward = backward
        F.cross_entropy(model(x), y).backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    a, b = grads.values()
    print(f"largest relative gradient difference: {max(((u - v).norm() / v.norm()).item() for u, v in zip(a, b)):.1e}")
    times = {name: [] for name in variants}
    for round_ in range(10):
        for name, backward in variants.items():
            fastops._DepthwiseConv2d.backward = backward
            t = time.perf_counter()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if round_ >= 2:
                times[name].append(time.perf_counter() - t)
    fastops._DepthwiseConv2d.backward = SHIPPED
    for name, t in times.items():
        print(f"{name}: {128 / statistics.median(t):.1f} img/s (median of {len(t)} steps)")


if __name__ == "__main__":
    main()
