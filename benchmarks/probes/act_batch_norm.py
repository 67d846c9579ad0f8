"""A rejected lever (issue 15, levers 3 and 5): ConvMixer's act -> BatchNorm pair as one autograd op that
keeps only the activation's input for the backward pass and recomputes the activation there. PyTorch
keeps both the input (for the activation's gradient) and the output (for BatchNorm's), so a training
step would hold one activation tensor fewer per pair (two per ConvMixer layer); the gradients are the
same ATen kernels on the same values, so they are bit-identical (checked below).

Part 1: one pair, forward + backward, the modules against the fused op, interleaved, medians, and the
bytes each keeps for the backward pass. Part 2: a whole ConvMixer-256/8 training step at batch 128,
32 px, each case in a fresh process: peak resident memory (VmHWM) and time per step, with glibc as
shipped and with the `convmixer` command's allocator setting (fastops.tune_allocator).
Run: python benchmarks/probes/act_batch_norm.py   (results: act_batch_norm.txt beside it)"""
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

class _GeluBatchNorm(torch.autograd.Function):
    """GELU then BatchNorm2d in training mode, keeping only GELU's input for the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        out, mean, invstd = torch.native_batch_norm(F.gelu(x), weight, bias, running_mean, running_var, True,
                                                    momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)  # not gelu(x): the backward recomputes it
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        a = F.gelu(x)
        grad_a, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad, a, weight, None, None, mean, invstd, True, ctx.eps, [True, True, True])
        # GELU's gradient written into the recomputed activation's buffer, free by then
        grad_x = torch.ops.aten.gelu_backward.grad_input(grad_a, x, grad_input=a)
        return grad_x, grad_w, grad_b, None, None, None, None


def act_batch_norm(x: torch.Tensor, act: torch.nn.GELU, norm: torch.nn.BatchNorm2d) -> torch.Tensor:
    """``norm(act(x))`` in a training step, as the fused op (what nn.BatchNorm2d.forward does around it)."""
    norm.num_batches_tracked.add_(1)
    return _GeluBatchNorm.apply(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.momentum,
                                norm.eps)


def median_ms(fn, repeats=9):
    fn(False), fn(True)
    times = {True: [], False: []}
    for _ in range(repeats):
        for fused in (False, True):
            t = time.perf_counter()
            fn(fused)
            times[fused].append(time.perf_counter() - t)
    return [1e3 * statistics.median(times[fused]) for fused in (False, True)]


def saved_mib(fn):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2 ** 20


def one_pair():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; channels_last; ms per forward + backward of "
          "GELU -> BatchNorm2d (training)")
    print(f"{'N x C x H x W':<18} {'dtype':<9} {'modules':>8} {'fused':>8} {'ratio':>6} {'saved MiB':>14} {'same grads':>10}")
    for n, c, h, w in [(128, 256, 16, 16), (128, 256, 7, 7), (16, 1536, 32, 32)]:
        for dtype in (torch.float32, torch.bfloat16):
            act, norm = torch.nn.GELU(), torch.nn.BatchNorm2d(c)
            x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            grad = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)

            def forward(fused):
                with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
                    return act_batch_norm(x, act, norm) if fused else norm(act(x))

            def step(fused):
                x.grad = norm.weight.grad = None
                out = forward(fused)
                out.backward(grad)
                return out, x.grad, norm.weight.grad
            same = all(torch.equal(a, b) for a, b in zip(step(False), step(True)))
            plain_ms, fused_ms = median_ms(step)
            mib = f"{saved_mib(lambda: forward(False)):.0f} -> {saved_mib(lambda: forward(True)):.0f}"
            print(f"{f'{n}x{c}x{h}x{w}':<18} {str(dtype)[6:]:<9} {plain_ms:>8.2f} {fused_ms:>8.2f} "
                  f"{plain_ms / fused_ms:>6.2f} {mib:>14} {str(same):>10}")


class FusedLayers(torch.nn.Sequential):
    def forward(self, x):
        *first, act, norm = self
        for module in first:
            x = module(x)
        return act_batch_norm(x, act, norm)


def whole_step(fused: bool, tuned: bool, steps: int = 4):
    """One fresh process: peak resident memory and median seconds of a training step."""
    from convmixer import create_model, tune_cpu
    from convmixer.runtime import peak_resident_mib
    if tuned:
        tune_cpu()
    model = create_model("convmixer_256_8")
    if fused:
        for module in list(model.modules()):
            for name, child in module.named_children():
                if type(child) is torch.nn.Sequential and isinstance(child[-1], torch.nn.BatchNorm2d):
                    setattr(module, name, FusedLayers(*child))
    model = model.train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    print(f"{'fused' if fused else 'modules':<8} {'tuned' if tuned else 'stock':<7} {peak_resident_mib() / 1024:>8.2f} GiB "
          f"{128 / statistics.median(times[1:]):>8.1f} img/s")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        whole_step(sys.argv[1] == "fused", sys.argv[2] == "tuned")
    else:
        one_pair()
        print("\nConvMixer-256/8 k5 p2, batch 128, 32 px, fp32 autograd, one fresh process each (4 steps)")
        print(f"{'path':<8} {'glibc':<7} {'peak resident':>12} {'train':>14}")
        for tuned in ("stock", "tuned"):
            for fused in ("modules", "fused"):
                subprocess.run([sys.executable, __file__, fused, tuned], check=True)
