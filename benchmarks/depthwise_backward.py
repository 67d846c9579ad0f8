"""Micro-benchmark of the depthwise-convolution backward pass: PyTorch's (oneDNN's) kernels against
convmixer.fastops, same inputs, interleaved, medians. Run: python benchmarks/depthwise_backward.py"""
import statistics
import time

import torch
import torch.nn.functional as F

from convmixer.fastops import depthwise_conv2d


def median_ms(fn, repeats=7):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; inputs channels_last; ms per forward+backward of one depthwise layer")
    print(f"{'N x C x H x W, k':<24} {'dtype':<9} {'plain':>9} {'fast':>9} {'ratio':>6} {'dW rel.err':>10}")
    for n, c, h, w, k in [(128, 256, 16, 16, 5), (128, 256, 32, 32, 9), (16, 1536, 32, 32, 9)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            weight = torch.randn(c, 1, k, k, requires_grad=True)
            grad = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)

            def run(fast):
                x.grad = weight.grad = None
                with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
                    y = depthwise_conv2d(x, weight, None) if fast else F.conv2d(x, weight, None, padding="same", groups=c)
                y.backward(grad.to(y.dtype))
                return weight.grad.clone()
            reference, ours = run(False), run(True)
            error = ((ours - reference).abs().max() / reference.abs().max()).item()
            plain, fast = median_ms(lambda: run(False)), median_ms(lambda: run(True))
            print(f"{f'{n}x{c}x{h}x{w}, k{k}':<24} {str(dtype)[6:]:<9} {plain:>9.1f} {fast:>9.1f} {plain / fast:>6.2f} "
                  f"{error:>10.1e}")


if __name__ == "__main__":
    main()
