"""Probe (2026-12-05): ConvMixer's 1x1 (pointwise) convolution on channels_last CPU activations, as oneDNN's
convolution (what nn.Conv2d runs) against F.linear on the (N*H*W, C) view of the same memory, forward and
forward + backward, interleaved, medians of medians. Output, with a whole-step A/B: pointwise_linear.txt.
`--bf16` (2026-12-06) times the two forms under bf16 autocast on bf16 activations, where the shipped
pointwise_conv2d keeps the convolution; both modes time fastops.pointwise_linear, the form it chooses in fp32.

    python benchmarks/probes/pointwise_linear.py [--bf16]"""
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import convmixer
from convmixer.fastops import pointwise_linear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from depthwise_backward import median_ms  # noqa: E402  (benchmarks/, the same timing for both probes)

SHAPES = [(128, 224, 9, 9), (128, 256, 16, 16), (128, 256, 8, 8), (32, 768, 32, 32)]


def main():
    bf16 = "--bf16" in sys.argv[1:]
    convmixer.tune_cpu()
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms, channels_last "
          f"{'bf16 autocast, bf16 activations' if bf16 else 'fp32'}")
    print(f"{'N x C x H x W':<16} {'conv fwd':>9} {'linear fwd':>10} {'conv f+b':>9} {'linear f+b':>10} {'max diff':>9}")
    for n, c, h, w in SHAPES:
        x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        weight = torch.randn(c, c, 1, 1, requires_grad=True)
        bias = torch.randn(c, requires_grad=True)
        grad = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
        forms = {"conv": F.conv2d, "linear": pointwise_linear}
        with autocast:
            diff = (forms["conv"](x, weight, bias).float() - forms["linear"](x, weight, bias).float()).abs().max().item()

        def fwd(f):
            with torch.no_grad(), autocast:
                forms[f](x, weight, bias)

        def both(f):
            x.grad = weight.grad = bias.grad = None
            with autocast:
                y = forms[f](x, weight, bias)
            y.backward(grad)
        ms = {k: [] for k in ("cf", "lf", "cb", "lb")}
        for _ in range(3):
            ms["cf"].append(median_ms(lambda: fwd("conv")))
            ms["lf"].append(median_ms(lambda: fwd("linear")))
            ms["cb"].append(median_ms(lambda: both("conv")))
            ms["lb"].append(median_ms(lambda: both("linear")))
        cf, lf, cb, lb = (statistics.median(v) for v in ms.values())
        print(f"{f'{n}x{c}x{h}x{w}':<16} {cf:>9.2f} {lf:>10.2f} {cb:>9.2f} {lb:>10.2f} {diff:>9.1e}")


if __name__ == "__main__":
    main()
