"""Muon for ConvMixer's pointwise (1x1) convolutions, AdamW for everything else.

Muon (Jordan et al. 2024) replaces each matrix's momentum-smoothed gradient by the nearest semi-orthogonal
matrix (five Newton-Schulz iterations), so that every direction of the update has the same size. It is the
optimizer of the fastest CIFAR-10 trainings (airbench94_muon). ``torch.optim.Muon`` accepts only 2-D
parameters, and the pointwise weights are (dim, dim, 1, 1) convolution filters that must keep their shape
(timm state dicts load with strict=True), so this module holds the step for filters viewed as matrices;
the rest of the network (patch embedding, depthwise filters, norms, biases, head) stays on torch's AdamW.
"""
from __future__ import annotations

import torch

# the quintic Newton-Schulz coefficients of Keller Jordan's Muon (also torch.optim.Muon's defaults)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T of each matrix g = U S V^T (the last two dimensions), computed in ``dtype``."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values in [0, 1], where it converges
    for _ in range(steps):
        m = x @ x.mT
        x = a * x + (b * m + c * m @ m) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalized, with decoupled weight decay; for matrices and convolution filters
    (flattened to out x in*k*k). The update is scaled to the RMS of an AdamW update (0.2 sqrt(max(out, in)),
    as torch.optim.Muon's ``match_rms_adamw``) so that the same learning rate suits both. Filters of one
    shape are orthogonalized together, in ``ns_dtype`` (bfloat16 halves the cost where the hardware has it)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            by_shape: dict[torch.Size, list] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for params in by_shape.values():
                grads = torch.stack([p.grad.reshape(len(p), -1) for p in params])
                bufs = []
                for p, g in zip(params, grads):
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    state["momentum_buffer"].lerp_(g, 1 - mu)
                    bufs.append(state["momentum_buffer"])
                bufs = torch.stack(bufs)
                update = orthogonalize(grads.lerp_(bufs, mu) if group["nesterov"] else bufs, group["ns_steps"],
                                       self.ns_dtype)
                scale = 0.2 * max(update.shape[-2:]) ** 0.5
                for p, u in zip(params, update):
                    p.mul_(1 - lr * wd).add_(u.reshape(p.shape), alpha=-lr * scale)
        return loss


class Optimizers:
    """Several optimizers stepped as one: what the training loop, GradScaler and checkpoints see."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict):
        saved = state.get("optimizers")
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state is not this run's (optimizer= differs)")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)
