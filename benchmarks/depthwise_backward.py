"""Micro-benchmark of the depthwise-convolution backward pass: PyTorch's (oneDNN's) kernels, the per-plane
form of convmixer.fastops (``_DepthwiseConv2d``) and what ``depthwise_conv2d`` ships (the per-plane form, or
PyTorch's op for fp32 kernels up to ``ONEDNN_BACKWARD_MAX_KERNEL``); same inputs, interleaved, medians.
bf16 rows only on CPUs with bf16 hardware (elsewhere oneDNN emulates it and the figures mean nothing).
Run: python benchmarks/depthwise_backward.py"""
import statistics
import time

import torch
import torch.nn.functional as F

import convmixer
from convmixer.fastops import _DepthwiseConv2d, depthwise_conv2d
from convmixer.runtime import cpu_has_bf16

SHAPES = [(128, 224, 9, 9, 3), (128, 256, 16, 16, 3), (128, 224, 9, 9, 5), (128, 256, 16, 16, 5),
          (128, 256, 32, 32, 9), (16, 1536, 32, 32, 9)]


def median_ms(fn, repeats=7):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main():
    convmixer.tune_cpu()  # as the convmixer command runs
    dtypes = (torch.float32, torch.bfloat16) if cpu_has_bf16() else (torch.float32,)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; inputs channels_last; "
          "ms per forward+backward of one depthwise layer")
    print(f"{'N x C x H x W, k':<24} {'dtype':<9} {'plain':>9} {'per-plane':>9} {'shipped':>9} {'plain/shipped':>13} "
          f"{'dW rel.err':>10}")
    forms = {"plain": lambda x, w, c: F.conv2d(x, w, None, padding="same", groups=c),
             "per-plane": lambda x, w, c: _DepthwiseConv2d.apply(x.to(torch.get_autocast_dtype("cpu"))
                                                                 if torch.is_autocast_enabled("cpu") else x, w, None),
             "shipped": lambda x, w, c: depthwise_conv2d(x, w, None)}
    for n, c, h, w, k in SHAPES:
        for dtype in dtypes:
            x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            weight = torch.randn(c, 1, k, k, requires_grad=True)
            grad = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)

            def run(form):
                x.grad = weight.grad = None
                with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
                    y = forms[form](x, weight, c)
                y.backward(grad.to(y.dtype))
                return weight.grad.clone()
            reference = run("plain")
            error = max(((run(f) - reference).abs().max() / reference.abs().max()).item() for f in ("per-plane", "shipped"))
            ms = {f: [] for f in forms}
            for _ in range(3):  # interleaved rounds, the median of the medians
                for f in forms:
                    ms[f].append(median_ms(lambda: run(f), repeats=5))
            plain, per_plane, shipped = (statistics.median(ms[f]) for f in forms)
            print(f"{f'{n}x{c}x{h}x{w}, k{k}':<24} {str(dtype)[6:]:<9} {plain:>9.1f} {per_plane:>9.1f} {shipped:>9.1f} "
                  f"{plain / shipped:>13.2f} {error:>10.1e}")


if __name__ == "__main__":
    main()
