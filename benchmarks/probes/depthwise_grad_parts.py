"""Issue 15, lever 2: what each half of the depthwise backward costs, with and without layout copies.

    python benchmarks/probes/depthwise_grad_parts.py [--dtype fp32|bf16]

For one ConvMixer-256/8 depthwise layer at 32 px (128 x 256 x 16 x 16, k5, channels_last), median ms of:
the input gradient by oneDNN's backward-data kernel and by fastops' flipped-kernel forward convolution;
the weight gradient by oneDNN's backward-weights kernel (no copies) and by fastops' per-plane convolution
(which needs the activations and gradients in NCHW, two layout copies, timed apart)."""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import convmixer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from depthwise_backward import median_ms  # noqa: E402  (the same timing as the layer benchmark)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--shape", type=int, nargs=5, default=[128, 256, 16, 16, 5], metavar=("N", "C", "H", "W", "K"))
    args = ap.parse_args()
    convmixer.tune_cpu()  # the allocator setting and subnormal flushing, as a training run has them
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    n, c, h, w, k = args.shape
    pad = k // 2
    cl = torch.channels_last
    x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=cl)
    grad = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=cl)
    weight = torch.randn(c, 1, k, k, dtype=dtype)

    def onednn(mask):
        return torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], c,
                                                   mask)

    def ours_dx():
        return F.conv2d(grad, weight.flip(-1, -2), padding=pad, groups=c)

    def copies():
        return x.contiguous(), grad.contiguous()

    xc, gc = copies()

    def ours_dw_no_copies():
        planes = F.pad(xc, (pad, pad, pad, pad)).view(1, n * c, h + 2 * pad, w + 2 * pad)
        return F.conv2d(planes, gc.view(n * c, 1, h, w), groups=n * c).view(n, c, k, k).sum(0, dtype=torch.float32)

    dw_ref = onednn([False, True, False])[1].float().view(c, k, k)
    err = ((ours_dw_no_copies() - dw_ref).abs().max() / dw_ref.abs().max()).item()
    rows = [
        ("input grad, oneDNN backward-data", lambda: onednn([True, False, False])),
        ("input grad, flipped forward conv (fastops)", ours_dx),
        ("weight grad, oneDNN backward-weights", lambda: onednn([False, True, False])),
        ("weight grad, per-plane conv (fastops), without its copies", ours_dw_no_copies),
        ("  its two channels_last -> NCHW copies", copies),
        ("both grads, oneDNN in one call", lambda: onednn([True, True, False])),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {n}x{c}x{h}x{w} k{k} channels_last; "
          f"weight-grad relative difference {err:.1e}")
    print("| part | ms (median of 7) |\n| --- | --- |")
    for name, fn in rows:
        print(f"| {name} | {median_ms(fn):.1f} |")


if __name__ == "__main__":
    main()
