"""Faster CPU paths for ConvMixer's hot spots, each exact and each with a switch back.

1. ``depthwise_conv2d``: the depthwise convolution with a hand-routed backward pass. PyTorch's
   (oneDNN's) depthwise backward is the slowest op of a ConvMixer training step on CPUs: its input
   gradient is several times slower than a forward convolution, although it *is* one (a depthwise
   convolution with the kernel flipped), and its weight gradient is twice as slow in bf16 as in
   fp32. The backward here computes the input gradient as that flipped forward convolution and
   the weight gradient as a per-plane depthwise convolution with the output gradient as the kernel.
   For kernels of 1 and 3 it is the other way round: oneDNN has a fast kernel for them, in fp32 and
   in bf16 (whole layer 2.3-4x faster than the per-plane form), so those take PyTorch's own op.
   BENCHMARKS.md has the measurements.
2. ``tune_allocator``: glibc hands every large activation back to the kernel (mmap/munmap) and
   pays page faults to get it again on the next step; keeping freed memory in the process halves
   the system time of an eager CPU training step.
3. ``flush_denormals``: as a model trains, its backward pass produces subnormal floats, which x86
   cores handle in a slow microcode path: a trained ConvMixer-256/8 trained at 176 img/s against
   248 for a fresh one. Flushing them to zero (FTZ/DAZ) restores 225 img/s; values below 1.2e-38
   become 0, which no training step notices.

4. ``inference_tile`` and ``conv_act``: CPU inference without gradients runs a large batch as tiles of
   images whose activations stay cached between the memory-bound passes (GELU, BatchNorm, the residual
   add), and runs each convolution with its activation as one oneDNN primitive in fp32, one pass fewer
   per layer. Both are exact (BatchNorm in eval mode treats each image alone); BENCHMARKS.md has the
   measurements.

Importing this module changes nothing; ``runtime.tune_cpu()`` applies 2 and 3 (the ``convmixer``
command does so for itself).
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        pad = weight.shape[-1] // 2
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                        padding=pad, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        channels, pad = weight.shape[0], weight.shape[-1] // 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # d(out)/d(x) of a cross-correlation is a cross-correlation with the flipped kernel.
            grad_x = F.conv2d(grad, weight.flip(-1, -2).to(grad.dtype), padding=pad, groups=channels).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # dW[c, i, j] = sum_n (x_pad[n, c] cross-correlated with grad[n, c])[i, j]: one depthwise
            # convolution over the N*C planes with the gradient as the kernel, then a sum over n.
            # 2-4x faster than oneDNN's depthwise weight-gradient kernel (BENCHMARKS.md).
            n, _, h, w = x.shape
            planes = F.pad(x.contiguous(), (pad, pad, pad, pad)).view(1, n * channels, h + 2 * pad, w + 2 * pad)
            kernels = grad.to(x.dtype).contiguous().view(n * channels, 1, h, w)
            per_sample = F.conv2d(planes, kernels, groups=n * channels)
            acc = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
            grad_w = per_sample.view(n, channels, 2 * pad + 1, 2 * pad + 1).sum(0, dtype=acc)
            grad_w = grad_w.unsqueeze(1).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3), dtype=torch.promote_types(grad.dtype, torch.float32)).to(weight.dtype)
        return grad_x, grad_w, grad_b


# Odd kernels up to this size take PyTorch's own depthwise backward on CPU, in fp32 and in bf16: oneDNN's
# small-kernel backward is faster than the per-plane form there (fp32 weight gradient k3: 0.58 against 6.5 ms at
# 128x224x9x9, 7.5 against 27 at 128x256x16x16; bf16 whole layer k3 on a Zen 4: 1.4 against 5.6 ms, 9.6 against
# 22.1), while from k5 up the per-plane form wins (fp32 k5 at 128x256x16x16: 32 against 41 ms; bf16 k5 and k9 3.8-4.5x).
# benchmarks/depthwise_backward.txt, BENCHMARKS.md.
ONEDNN_BACKWARD_MAX_KERNEL = 3


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise convolution, stride 1, padding "same", with a faster backward on CPU for odd square kernels.
    Falls back to F.conv2d for other kernels, for CUDA, where cuDNN's backward is already good, for kernels
    of 3 or less, where oneDNN's is (ONEDNN_BACKWARD_MAX_KERNEL), for empty batches, and under torch.func
    transforms and forward-mode AD."""
    k = weight.shape[-1]
    if (torch.jit.is_scripting() or torch.jit.is_tracing() or k % 2 == 0 or x.device.type != "cpu"
            or k <= ONEDNN_BACKWARD_MAX_KERNEL  # PyTorch's op; autocast, where on, casts as for any convolution
            or weight.shape[-2] != k or weight.shape[1] != 1 or x.numel() == 0
            or under_torch_func() or has_tangent(x, weight, bias)):
        return F.conv2d(x, weight, bias, padding="same", groups=weight.shape[0])
    if torch.is_autocast_enabled("cpu") and x.dtype == torch.float32:  # as autocast casts: float64 stays
        x = x.to(torch.get_autocast_dtype("cpu"))
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                        padding=k // 2, groups=weight.shape[0])
    return _DepthwiseConv2d.apply(x, weight, bias)


def has_tangent(*tensors) -> bool:
    """Whether any of ``tensors`` carries a forward-mode AD tangent (torch.autograd.forward_ad), which the
    fast paths do not propagate: PyTorch's own ops serve there."""
    from torch.autograd import forward_ad
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def under_torch_func() -> bool:
    """Inside torch.func transforms (vmap, grad, jacrev: per-sample gradients), which refuse an autograd
    Function without a vmap rule: PyTorch's own convolution serves there."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)  # private; absent: assume not
    return bool(active is not None and active())


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """1x1 convolution (ConvMixer's channel mixing). On fp32 channels_last CPU activations it runs as F.linear
    on the (N*H*W, C) view of the same memory: the same forward time as oneDNN's 1x1 convolution and a faster
    backward (forward + backward 20.6 against 33.3 ms at 128x224x9x9, 84 against 99 at 128x256x16x16,
    benchmarks/probes/pointwise_linear.txt). Elsewhere, and when traced or scripted, it is F.conv2d: under bf16
    autocast oneDNN's 1x1 convolution is the faster of the two (pointwise_linear_bf16.txt)."""
    if (torch.jit.is_scripting() or torch.jit.is_tracing() or x.device.type != "cpu" or x.ndim != 4
            or torch.is_autocast_enabled("cpu") or not x.dtype == torch.float32 == weight.dtype
            or x.numel() == 0 or under_torch_func()  # vmap refuses the layout query below
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return F.conv2d(x, weight, bias)
    return pointwise_linear(x, weight, bias)


def pointwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 1x1 convolution as F.linear on the (N*H*W, C) view of channels_last activations, unconditionally
    (:func:`pointwise_conv2d` chooses when to use it)."""
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: channels_last memory is (N, H, W, C)
    out = F.linear(rows, weight.view(weight.shape[0], c), bias)
    return out.view(n, h, w, weight.shape[0]).permute(0, 3, 1, 2)


# One activation of a tile of images: small enough to stay cached between the passes over it. On the 2-core
# fp32 Xeon, ConvMixer-256/8 at 32 px inferred 527 img/s in tiles of 16 images (4 MiB; 593 with the fusion)
# against 354 at batch 256; 768/32 and 1536/20 at 224 px (3 and 6 MiB per image, tiles of 4) lost nothing
# (benchmarks/probes/inference_passes.py, BENCHMARKS.md).
INFERENCE_TILE_BYTES = 4 << 20


def inference_tile(activation_bytes_per_image: int) -> int:
    """Images per forward pass in CPU inference for activations of this size: at least 4, since for large
    models (ConvMixer-1536/20 at 224 px: 6 MiB per image) single images ran 10% slower than fours."""
    return max(4, INFERENCE_TILE_BYTES // max(1, activation_bytes_per_image))


_FUSED_ACTS = {nn.GELU: "gelu", nn.ReLU: "relu"}
_FUSED_WORKS: bool | None = None  # whether this PyTorch build has the fused op; found on first use


def conv_act(conv: nn.Conv2d, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(conv(x))`` for fp32 CPU inference, as one oneDNN convolution with the activation as its
    post-op (the op inductor emits for the same fusion) where this PyTorch build has it; otherwise, and
    for activations oneDNN does not fuse exactly (tanh-approximated GELU, SiLU), the two modules."""
    global _FUSED_WORKS
    name = _FUSED_ACTS.get(type(act))
    padding = conv.padding
    if padding == "same" and all(k % 2 for k in conv.kernel_size) and conv.dilation == (1, 1):
        padding = tuple(k // 2 for k in conv.kernel_size)
    if _FUSED_WORKS is False or name is None or getattr(act, "approximate", "none") != "none" \
            or x.dtype != torch.float32 or conv.weight.dtype != torch.float32 or not isinstance(padding, tuple) \
            or conv.padding_mode != "zeros" or torch.is_autocast_enabled("cpu"):
        return act(conv(x))
    try:
        out = torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, list(padding), list(conv.stride), list(conv.dilation), conv.groups,
            name, [], "none" if name == "gelu" else None)
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):  # not in this build: stop trying
        _FUSED_WORKS = False
        return act(conv(x))
    _FUSED_WORKS = True
    return out


_ALLOCATOR_TUNED = False
_GLIBC_DEFAULTS = {-4: 65536, -1: 128 * 1024}  # M_MMAP_MAX, M_TRIM_THRESHOLD


def set_allocator_tuned(enable: bool) -> None:
    """Switch the glibc setting on or off at run time (the benchmark compares both in one process).
    A no-op in a process where tune_allocator() was not applied, so that process stays on stock glibc
    (setting the options explicitly, even to their defaults, turns off glibc's dynamic mmap threshold)."""
    libc = _libc()
    if not _ALLOCATOR_TUNED or libc is None:
        return
    for option, default in _GLIBC_DEFAULTS.items():
        libc.mallopt(option, (0 if option == -4 else 1 << 30) if enable else default)


def tune_allocator() -> bool:
    """Keep freed memory inside the process (glibc: no mmap for large blocks, no trimming).
    Skipped when CONVMIXER_NO_MALLOPT=1, when the user already set MALLOC_* variables, or off glibc."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get("CONVMIXER_NO_MALLOPT") == "1" or not sys.platform.startswith("linux"):
        return False
    if any(k.startswith("MALLOC_") for k in os.environ) or "LD_PRELOAD" in os.environ:
        return False
    libc = _libc()
    try:
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except AttributeError:  # no libc (None), or one without mallopt
        return False
    _ALLOCATOR_TUNED = ok
    return ok


def trim_allocator() -> bool:
    """Hand the memory glibc holds free back to the system now (malloc_trim), whatever tune_allocator
    set: the benchmark does so before it measures each candidate's peak. False off glibc."""
    try:
        return bool(_libc().malloc_trim(0))
    except AttributeError:
        return False


def _libc():
    """glibc, or None where there is none."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def flush_denormals() -> bool:
    """Treat subnormal floats as zero in this thread (x86 FTZ/DAZ; ARM FZ); threads started later
    inherit it (runtime.tune_cpu also reaches torch's running worker threads). Skipped when
    CONVMIXER_NO_FTZ=1."""
    if os.environ.get("CONVMIXER_NO_FTZ") == "1":
        return False
    return torch.set_flush_denormal(True)
