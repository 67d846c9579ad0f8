"""ConvMixer, as "Patches Are All You Need?" (Trockman & Kolter, 2022) defines it.

    patch embedding:  Conv2d(C, h, p, stride=p) -> act -> BN
    d times:          x = x + BN(act(DepthwiseConv2d(h, k, padding="same")(x)))
                      x = BN(act(Conv2d(h, h, 1)(x)))
    head:             global average pool -> Linear(h, n)

Module names follow timm (``stem``, ``blocks.i.0.fn``, ``head``) so the officially released
checkpoints and timm state dicts load with ``strict=True``.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .errors import ModelError
from .fastops import conv_act, depthwise_conv2d, has_tangent, inference_tile, pointwise_conv2d, under_torch_func

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
NORMS = {
    "batchnorm": nn.BatchNorm2d,
    # "LayerNorm-style": normalise each sample over (C, H, W), the paper's normalisation ablation.
    "layernorm": lambda dim: nn.GroupNorm(1, dim),
}


class Residual(nn.Module):
    def __init__(self, fn: nn.Module, enabled: bool = True):
        super().__init__()
        self.fn = fn
        self.enabled = enabled

    def forward(self, x):
        return self.fn(x) + x if self.enabled else self.fn(x)


class DepthwiseConv2d(nn.Conv2d):
    """k x k depthwise convolution, padding "same". Same parameters as nn.Conv2d(groups=dim);
    the forward goes through :func:`convmixer.fastops.depthwise_conv2d`, whose backward is faster
    than PyTorch's on CPUs for kernels of 5 and more and in bf16 (smaller fp32 kernels take PyTorch's
    own; set ``fast=False`` for the plain op everywhere)."""

    def __init__(self, dim: int, kernel_size: int, fast: bool = True):
        super().__init__(dim, dim, kernel_size, groups=dim, padding="same")
        self.fast = fast

    def forward(self, x):
        if self.fast:
            return depthwise_conv2d(x, self.weight, self.bias)
        return super().forward(x)


class PointwiseConv2d(nn.Conv2d):
    """1x1 convolution, dim to dim. Same parameters as nn.Conv2d(dim, dim, 1); the forward goes through
    :func:`convmixer.fastops.pointwise_conv2d`, a matrix product on fp32 channels_last CPU activations
    whose backward is faster than oneDNN's 1x1 convolution's (``fast=False``: the plain op)."""

    def __init__(self, dim: int, fast: bool = True):
        super().__init__(dim, dim, kernel_size=1)
        self.fast = fast

    def forward(self, x):
        if self.fast:
            return pointwise_conv2d(x, self.weight, self.bias)
        return super().forward(x)


def _make_act(act_layer) -> nn.Module:
    if isinstance(act_layer, str):
        if act_layer.lower() not in ACTIVATIONS:
            raise ModelError(f"unknown activation {act_layer!r}: choose one of {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[act_layer.lower()]()
    return act_layer()


@torch.no_grad()
def whiten_stem(model: "ConvMixer", images: torch.Tensor, eps: float = 5e-4, seed: int = 0) -> None:
    """Initialise the patch embedding from the data, as fast CIFAR-10 training initialises its first
    layer: with the eigen-decomposition V diag(l) V^T of the covariance of the images' p x p patches,
    the first filters are the whitening directions +-v / sqrt(l + eps), the rest random unit
    combinations of them, and the biases centre every output on the data. Each channel then sees
    unit-variance input in which fine and coarse patch structure weigh alike. ``images``: normalised
    N x C x H x W."""
    conv = model.stem[0]
    p = conv.kernel_size[0]
    patches = F.unfold(images.double(), p, stride=p).transpose(1, 2).reshape(-1, conv.weight[0].numel())
    mean = patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))
    order = eigenvalues.argsort(descending=True)
    whiten = eigenvectors[:, order].T / (eigenvalues[order].clamp(min=0) + eps).sqrt().unsqueeze(1)  # D x D
    d = whiten.shape[0]
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randn(max(0, conv.out_channels - 2 * d), d, generator=generator, dtype=torch.float64)
    mix = torch.cat([torch.eye(d, dtype=torch.float64), -torch.eye(d, dtype=torch.float64),
                     extra / extra.norm(dim=1, keepdim=True)])[:conv.out_channels]
    weight = mix @ whiten
    conv.weight.copy_(weight.view_as(conv.weight))
    if conv.bias is not None:
        conv.bias.copy_(-weight @ mean)


def depthwise_layers(model: nn.Module) -> list[DepthwiseConv2d]:
    """The model's depthwise convolutions, first layer first."""
    return [m for m in model.modules() if isinstance(m, DepthwiseConv2d)]


@torch.no_grad()
def identity_depthwise(model: nn.Module, scale: float) -> None:
    """Add ``scale`` to the tap of every depthwise filter that passes each position through unchanged (the
    centre; for an even kernel the one "same" padding aligns with the output), so that with the default random
    filters beside it each spatial-mixing layer starts close to ``scale`` times the identity, as fast CIFAR-10
    training's dirac initialisation does for its convolutions."""
    for layer in depthwise_layers(model):
        centre = (layer.kernel_size[0] - 1) // 2
        layer.weight[:, 0, centre, centre] += scale


@torch.no_grad()
def correlated_depthwise(model: nn.Module, scale: float, seed: int = 0) -> None:
    """Resample every depthwise filter from a zero-mean Gaussian whose covariance between taps p and q is
    exp(-|p - q|^2 / (2 s^2)), with s = ``scale`` * i / depth at layer i (1..depth): neighbouring taps move
    together, the more so the deeper the layer, as the covariances of trained ConvMixer filters do (Trockman
    et al., ICLR 2023; a closed form of the same kind, not theirs). Each tap keeps the variance of PyTorch's
    default initialisation, 1 / (3 k^2); biases are kept."""
    layers = depthwise_layers(model)
    generator = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(layers, start=1):
        k = layer.kernel_size[0]
        taps = torch.cartesian_prod(torch.arange(k), torch.arange(k)).double()
        s = scale * i / len(layers)
        cov = torch.exp(-torch.cdist(taps, taps) ** 2 / (2 * s * s)) + 1e-6 * torch.eye(k * k, dtype=torch.float64)
        samples = torch.randn(layer.out_channels, k * k, generator=generator, dtype=torch.float64)
        weight = samples @ torch.linalg.cholesky(cov).T / (3 * k * k) ** 0.5
        layer.weight.copy_(weight.view_as(layer.weight))


def _check_pool(num_classes: int, pool) -> None:
    """timm's global_pool: "avg", or "" (no pooling, so no classifier: forward_head returns the maps)."""
    if pool not in ("avg", ""):
        raise ModelError(f"global_pool {pool!r}: ConvMixer pools by average (\"avg\") or not at all (\"\")")
    if pool == "" and num_classes:
        raise ModelError("global_pool='' keeps the feature maps, which a classifier cannot take: use num_classes=0")


class ConvMixer(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        kernel_size: int = 9,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        act_layer="gelu",
        drop_rate: float = 0.0,
        residual: bool = True,
        norm_layer: str = "batchnorm",
        fast: bool = True,
        global_pool: str = "avg",
    ):
        super().__init__()
        for name, value in (("dim", dim), ("depth", depth), ("kernel_size", kernel_size),
                            ("patch_size", patch_size), ("in_chans", in_chans)):
            if not isinstance(value, int) or value < 1:
                raise ModelError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ModelError(f"num_classes must be an integer >= 0 (0 = feature extractor), got {num_classes!r}")
        if norm_layer not in NORMS:
            raise ModelError(f"unknown norm_layer {norm_layer!r}: choose one of {sorted(NORMS)}")
        _check_pool(num_classes, global_pool)
        # the constructor arguments, recorded by save_weights so a weights file rebuilds its model
        self.model_args = dict(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size,
                               in_chans=in_chans, num_classes=num_classes, act_layer=act_layer, drop_rate=drop_rate,
                               residual=residual, norm_layer=norm_layer) if isinstance(act_layer, str) else None
        if self.model_args is not None and global_pool == "":
            self.model_args["global_pool"] = ""
        norm = NORMS[norm_layer]
        self.dim, self.depth, self.kernel_size, self.patch_size = dim, depth, kernel_size, patch_size
        self.in_chans, self.num_classes, self.num_features = in_chans, num_classes, dim
        self.grad_checkpointing = False
        self.global_pool = global_pool  # "" (with num_classes 0): forward_head keeps the feature maps
        self.fast = fast  # also the exact CPU inference path (forward_features)

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
            _make_act(act_layer),
            norm(dim),
        )
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                Residual(nn.Sequential(
                    DepthwiseConv2d(dim, kernel_size, fast=fast),
                    _make_act(act_layer),
                    norm(dim),
                ), enabled=residual),
                PointwiseConv2d(dim, fast=fast),
                _make_act(act_layer),
                norm(dim),
            )
            for _ in range(depth)
        ])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        # timm's description of the feature maps forward_intermediates returns: the stem, then each layer
        self.feature_info = FeatureInfo([dict(num_chs=dim, reduction=patch_size, module="stem")] + [
            dict(num_chs=dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)])

    # --- the timm-style interface -------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def set_fast(self, enable: bool = True):
        """Switch the fast paths on or off: the depthwise backward and the pointwise matrix product (else
        plain nn.Conv2d) and the tiled, fused CPU inference (else the modules one by one)."""
        self.fast = enable
        for layer in self.modules():
            if isinstance(layer, (DepthwiseConv2d, PointwiseConv2d)):
                layer.fast = enable
        return self

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        """A new classifier (0: none) on the stem's device and dtype; ``global_pool`` as timm's: "avg" (the
        default) or "" (no pooling: forward_head returns the feature maps, with num_classes 0)."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ModelError(f"num_classes must be an integer >= 0 (0 = feature extractor), got {num_classes!r}")
        pool = self.global_pool if global_pool is None else global_pool
        _check_pool(num_classes, pool)
        weight = self.stem[0].weight
        self.num_classes, self.global_pool = num_classes, pool
        if self.model_args is not None:
            self.model_args["num_classes"] = num_classes
            self.model_args.pop("global_pool", None)
            if pool == "":
                self.model_args["global_pool"] = ""
        self.head = (nn.Linear(self.dim, num_classes, device=weight.device, dtype=weight.dtype) if num_classes > 0
                     else nn.Identity())

    def _check_input(self, x: torch.Tensor):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # export: shapes are symbolic
            return
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ModelError(f"expected a batch of shape (N, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():  # e.g. torchvision.io.read_image's uint8
            raise ModelError(f"expected float images, got {x.dtype}: scale to [0, 1] and normalise with "
                             f"model.pretrained_cfg's mean and std")
        if x.shape[-1] < self.patch_size or x.shape[-2] < self.patch_size:
            raise ModelError(f"input {x.shape[-2]}x{x.shape[-1]} is smaller than the patch size "
                             f"{self.patch_size}: resize the images to at least {self.patch_size} px")

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return _checkpointed(block, x)
        return block(x)

    def forward_intermediates(self, x: torch.Tensor, indices=None, intermediates_only: bool = False,
                              stop_early: bool = False):
        """Features and the per-layer feature maps, as timm's: index 0 is the patch embedding, index i the
        output of ConvMixer layer i (1..depth); ``indices`` is None (all), an int n (the last n) or a
        list (negative counts from the end). Returns (final features, maps), or the maps alone."""
        self._check_input(x)
        keep = self._feature_indices(indices)
        last = max(keep) if (stop_early or intermediates_only) and keep else self.depth
        x = self.stem(x)
        maps = [x] if 0 in keep else []
        for i, block in enumerate(self.blocks[:last], start=1):
            x = self._run_block(block, x)
            if i in keep:
                maps.append(x)
        return maps if intermediates_only else (x, maps)

    def _feature_indices(self, indices) -> list[int]:
        n = self.depth + 1
        if indices is None:
            return list(range(n))
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ModelError(f"indices={indices}: ask for the last 1..{n} feature maps")
            return list(range(n - indices, n))
        out = sorted({i + n if i < 0 else i for i in indices})
        if any(not 0 <= i < n for i in out):
            raise ModelError(f"feature indices {list(indices)} outside 0..{n - 1} (or -{n}..-1)")
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self._cpu_inference(x):
            itemsize = 2 if torch.is_autocast_enabled("cpu") else x.element_size()
            tokens = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
            tile = inference_tile(self.dim * tokens * itemsize)
            return torch.cat([self._inference_features(t) for t in x.split(tile)]) if len(x) > tile \
                else self._inference_features(x)
        x = self.stem(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return x

    def _cpu_inference(self, x: torch.Tensor) -> bool:
        """Eval mode, no gradients, on a CPU, in eager mode, no hooks: the exact fast path of fastops point 4
        (it calls the layers' functions, not the modules, so a module's hooks would not run)."""
        if not getattr(self, "fast", True) or self.training or torch.is_grad_enabled() or x.device.type != "cpu":
            return False
        from torch.nn.modules import module as nn_module
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return False
        if any(m.training or m._forward_hooks or m._forward_pre_hooks  # BatchNorm recalibrating; a feature hook,
               for m in self.modules() if m is not self):               # pruning's weight pre-hook
            return False
        return not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                    or torch.compiler.is_compiling() or under_torch_func() or has_tangent(x))

    def _inference_features(self, x: torch.Tensor) -> torch.Tensor:
        """forward_features for one tile of images, each convolution fused with its activation (fp32)."""
        conv, act, norm = self.stem
        x = norm(conv_act(conv, act, x))
        for residual, pointwise, act, norm in self.blocks:
            depthwise, dw_act, dw_norm = residual.fn
            y = dw_norm(conv_act(depthwise, dw_act, x))
            x = y + x if residual.enabled else y
            x = norm(conv_act(pointwise, act, x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.global_pool:
            return x
        x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class FeatureInfo(list):
    """timm-style feature information: one {num_chs, reduction, module} per feature map."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


class ConvMixerFeatures(nn.Module):
    """``create_model(name, features_only=True, out_indices=...)``: the feature maps as a list (timm's
    FeatureListNet, mmpretrain's out_indices); ``feature_info`` describes them."""

    def __init__(self, model: ConvMixer, out_indices=None):
        super().__init__()
        model.reset_classifier(0)
        self.model = model
        self.out_indices = model._feature_indices(out_indices)
        self.feature_info = FeatureInfo(model.feature_info[i] for i in self.out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True)


def _checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Activation checkpointing of one block. The backward pass re-runs the block; that re-run
    must not update the BatchNorm running statistics a second time."""
    calls = []

    def run(inp):
        if not calls:
            calls.append(True)
            return block(inp)
        bns = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
        for m in bns:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
        try:
            return block(inp)
        finally:
            for m, (momentum, tracked) in zip(bns, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(tracked)

    return checkpoint(run, x, use_reentrant=False)


# --- named variants ---------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
RELEASE_URL = "https://github.com/tmp-iclr/convmixer/releases/download/v1.0/"


@dataclass(frozen=True)
class Variant:
    dim: int
    depth: int
    kernel_size: int
    patch_size: int
    act_layer: str = "gelu"
    num_classes: int = 1000
    input_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    crop_pct: float = 0.96
    url: str | None = None
    shipped: str | None = None  # weights shipped in the package (pretrained=True loads them)
    note: str = ""
    extra: dict = field(default_factory=dict)


_CIFAR = dict(num_classes=10, input_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0)

VARIANTS: dict[str, Variant] = {
    # ImageNet-1k models with the officially released weights.
    "convmixer_1536_20": Variant(1536, 20, 9, 7, url=RELEASE_URL + "convmixer_1536_20_ks9_p7.pth.tar",
                                 note="ImageNet 81.37% top-1, 51.6M params"),
    "convmixer_768_32": Variant(768, 32, 7, 7, act_layer="relu",
                                url=RELEASE_URL + "convmixer_768_32_ks7_p7_relu.pth.tar",
                                note="ImageNet 80.16% top-1 (300 epochs, ReLU), 21.1M params"),
    "convmixer_1024_20_ks9_p14": Variant(1024, 20, 9, 14, url=RELEASE_URL + "convmixer_1024_20_ks9_p14.pth.tar",
                                         note="ImageNet 76.94% top-1, 24.4M params"),
    # CIFAR-10 models.
    "convmixer_256_8": Variant(256, 8, 5, 2, **_CIFAR, shipped="cifar10",
                               note="the authors' CIFAR-10 script: ~92.5% in 25 epochs; shipped weights"),
    "convmixer_256_8_ks9_p1": Variant(256, 8, 9, 1, **_CIFAR, note="paper's CIFAR-10 model, 0.707M params, ~96%"),
    "convmixer_256_8_ks9_p2": Variant(256, 8, 9, 2, **_CIFAR, note="paper CIFAR-10 table, p=2"),
    "convmixer_256_8_ks7_p1": Variant(256, 8, 7, 1, **_CIFAR, note="paper CIFAR-10 table, k=7"),
    "convmixer_256_8_ks5_p1": Variant(256, 8, 5, 1, **_CIFAR, note="paper CIFAR-10 table, k=5"),
    "convmixer_256_16_ks9_p1": Variant(256, 16, 9, 1, **_CIFAR, note="paper CIFAR-10 table, depth 16"),
    "convmixer_256_16_ks9_p2": Variant(256, 16, 9, 2, **_CIFAR, note="paper CIFAR-10 table, depth 16, p=2"),
}


def list_models(pattern: str = "*") -> list[str]:
    """Variant names matching a shell pattern; a pattern without wildcards matches substrings (``ks9``)."""
    import fnmatch
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    return sorted(name for name in VARIANTS if fnmatch.fnmatch(name, pattern))


def model_kwargs(name: str) -> dict:
    """The constructor arguments of a named variant."""
    if name not in VARIANTS:
        import difflib
        close = difflib.get_close_matches(name, VARIANTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelError(f"unknown model {name!r}{hint}; `convmixer models` lists them")
    v = VARIANTS[name]
    return dict(dim=v.dim, depth=v.depth, kernel_size=v.kernel_size, patch_size=v.patch_size,
                act_layer=v.act_layer, num_classes=v.num_classes)


def create_model(name: str, pretrained=False, features_only: bool = False, out_indices=None,
                 **overrides) -> ConvMixer:
    """Build a named variant. ``pretrained=True`` loads the official release weights (downloaded
    once into the torch hub cache; for ``convmixer_256_8`` the shipped CIFAR-10 weights),
    ``pretrained="cifar10" | "fashion_mnist"`` the project's shipped weights (their architecture:
    patch size, input channels), ``pretrained="file.pth|.pth.tar|.safetensors"`` a local file (a
    .safetensors file convmixer wrote: built with its own architecture, classes and channels).
    Any constructor argument can be overridden (``num_classes=10``, ``in_chans=1``, ...); with
    pretrained weights an explicit ``num_classes`` other than the file's gets a fresh classifier and an
    explicit ``in_chans`` an adapted patch embedding; a file that differs otherwise is refused. ``features_only=True``
    returns a ConvMixerFeatures whose forward gives the ``out_indices`` feature maps (default: all)."""
    from .weights import load_pretrained, shipped_weights
    variant = VARIANTS.get(name)
    if pretrained is True and variant is not None and variant.url is None and variant.shipped:
        pretrained = variant.shipped
    kwargs = model_kwargs(name)
    shipped = shipped_weights(pretrained)
    described = _described(shipped or pretrained)  # shipped weights, or a file convmixer wrote: their own architecture
    kwargs.update({k: v for k, v in described.get("model_args", {}).items() if k != "fast"})
    unknown = sorted(set(overrides) - set(inspect.signature(ConvMixer).parameters))
    if unknown:
        raise ModelError(f"create_model got {', '.join(unknown)}, which ConvMixer does not take: it takes "
                         f"{', '.join(inspect.signature(ConvMixer).parameters)}")
    kwargs.update(overrides)
    model = ConvMixer(**kwargs)
    model.pretrained_cfg = pretrained_cfg(name, model, described)
    if shipped is not None:
        model.pretrained_cfg["file"] = str(shipped)
    model.model_name = name
    if pretrained:
        load_pretrained(model, True if pretrained in (True, name) else pretrained, variant=variant,
                        adapt={k for k in ("num_classes", "in_chans") if k in overrides})
    return ConvMixerFeatures(model, out_indices) if features_only else model


def _described(pretrained) -> dict:
    """The architecture and preprocessing a .safetensors file written by convmixer records (its model_args:
    classes, channels, patch size...), which the model is built with; {} for anything else."""
    from .weights import decode_metadata, read_metadata
    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, os.PathLike)):
        return {}
    path = Path(pretrained)
    if not (path.name.endswith(".safetensors") and path.is_file()):
        return {}
    meta = read_metadata(path)
    return decode_metadata(meta, path) if "model_args" in meta else {}


def stats_for_channels(mean, std, channels: int) -> tuple[list, list]:
    """Per-channel mean/std for images with ``channels`` channels: statistics of another channel count
    (RGB ones for grayscale images) are averaged."""
    if len(mean) != channels:
        return [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    return list(mean), list(std)


def pretrained_cfg(name: str, model: "ConvMixer", described: dict | None = None) -> dict:
    """timm's description of a model's input (``timm.data.resolve_data_config({}, model=m)`` reads it): the
    variant's, or that of the weights ``described`` (their decoded metadata), which this project trained and
    evaluates with bilinear resizing."""
    v, own = VARIANTS[name], described or {}
    mean, std = stats_for_channels(own.get("mean", v.mean), own.get("std", v.std), model.in_chans)
    size = int(own.get("img_size", v.input_size))
    crop_pct = float(own.get("crop_pct", own.get("config", {}).get("crop_pct", v.crop_pct)))  # older files: config's
    interpolation = own.get("interpolation", "bilinear" if "mean" in own else "bicubic")
    classes = own.get("classes")  # none for a variant's own weights, or with num_classes=0
    labels = classes if classes is not None and len(classes) == model.num_classes else None
    return input_cfg(model, size, interpolation, mean, std, crop_pct, v.url or "", labels)


def input_cfg(model: "ConvMixer", size: int, interpolation: str, mean, std, crop_pct: float, url: str = "",
              label_names=None) -> dict:
    """The pretrained_cfg dict timm's data tools read, for ``model`` and the preprocessing of its weights."""
    cfg = {"input_size": (model.in_chans, size, size), "interpolation": interpolation, "mean": tuple(mean),
           "std": tuple(std), "crop_pct": crop_pct, "crop_mode": "center", "num_classes": model.num_classes,
           "first_conv": "stem.0", "classifier": "head", "url": url}
    if label_names is not None:
        cfg["label_names"] = tuple(label_names)
    return cfg


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: ConvMixer, height: int, width: int) -> int:
    """Multiply-adds x 2 of one forward pass (convolutions and the head; activations not counted)."""
    h, w = height // model.patch_size, width // model.patch_size
    dim, k = model.dim, model.kernel_size
    stem = dim * model.in_chans * model.patch_size ** 2 * h * w
    per_block = dim * k * k * h * w + dim * dim * h * w
    head = dim * model.num_classes
    return 2 * (stem + model.depth * per_block + head)
