
import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import convmixer
from convmixer import ConvMixer, create_model
from convmixer.fastops import _DepthwiseConv2d, depthwise_conv2d, pointwise_conv2d
from convmixer.model import flops_per_image


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g) * 0.2 + 1)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("size", [32, 33, 47, 64])
def test_output_shapes(size):
    model = ConvMixer(dim=32, depth=2, kernel_size=5, patch_size=4, num_classes=7).eval()
    x = torch.randn(2, 3, size, size)
    assert model(x).shape == (2, 7)
    assert model.forward_features(x).shape == (2, 32, size // 4, size // 4)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)


def test_rectangular_input_and_channels():
    model = ConvMixer(dim=16, depth=1, kernel_size=3, patch_size=2, in_chans=1, num_classes=3).eval()
    assert model(torch.randn(1, 1, 20, 37)).shape == (1, 3)


def test_feature_extractor_and_reset_classifier():
    model = ConvMixer(dim=24, depth=2, kernel_size=3, patch_size=2, num_classes=0).eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 24)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    # as timm's: reset_classifier(0, "") keeps the feature maps (it raised TypeError); the new head takes the
    # model's dtype (a bf16 model failed at its head); a negative count is refused
    model.reset_classifier(0, "")
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 24, 8, 8)
    model.reset_classifier(3, "avg")
    half = model.to(torch.bfloat16)
    half.reset_classifier(4)
    assert half(torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)).shape == (2, 4)
    for bad in ((-1,), (2, ""), (2, "max")):
        with pytest.raises(ValueError):
            model.reset_classifier(*bad)


def test_forward_intermediates():
    model = ConvMixer(dim=16, depth=3, kernel_size=3, patch_size=2, num_classes=4).eval()
    x = torch.randn(1, 3, 16, 16)
    final, maps = model.forward_intermediates(x)
    assert len(maps) == 4 and all(m.shape == (1, 16, 8, 8) for m in maps)
    torch.testing.assert_close(final, model.forward_features(x))
    _, some = model.forward_intermediates(x, indices=[0, 3])
    torch.testing.assert_close(some[1], maps[3])


def test_bad_input_messages():
    model = ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=7, num_classes=2)
    with pytest.raises(ValueError, match="smaller than the patch size"):
        model(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="depth"):
        ConvMixer(dim=8, depth=0)
    with pytest.raises(ValueError, match="did you mean 'convmixer_1536_20'"):
        create_model("convmixer_1536_2")
    with pytest.raises(ValueError, match="expected float images, got torch.uint8"):  # a raw conv error before
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="drop_path_rate, which ConvMixer does not take"):  # a TypeError before
        create_model("convmixer_256_8", drop_path_rate=0.1)


def test_cpu_inference_path_leaves_batchnorm_in_train_mode_to_the_plain_path(monkeypatch):
    from convmixer import fastops
    monkeypatch.setattr(fastops, "INFERENCE_TILE_BYTES", 1)  # tiles of 4 images: 4 + 2 had their own statistics
    torch.manual_seed(0)
    model = ConvMixer(dim=8, depth=2, kernel_size=3, patch_size=2, num_classes=3).eval()
    for m in model.modules():  # AdaBN-style recalibration: BatchNorm in train mode, no gradients
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
    x = torch.randn(6, 3, 8, 8)
    plain = ConvMixer(dim=8, depth=2, kernel_size=3, patch_size=2, num_classes=3)
    plain.load_state_dict(model.state_dict())
    plain.eval().set_fast(False)
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))


@pytest.mark.parametrize("name,count", [
    ("convmixer_1536_20", 51_625_960), ("convmixer_768_32", 21_110_248),
    ("convmixer_1024_20_ks9_p14", 24_383_464), ("convmixer_256_8_ks9_p1", 706_570)])
def test_published_parameter_counts(name, count):
    assert convmixer.count_parameters(create_model(name)) == count


def test_variant_hyperparameters():
    m = create_model("convmixer_768_32")
    assert isinstance(m.stem[1], torch.nn.ReLU) and m.kernel_size == 7 and m.patch_size == 7
    m = create_model("convmixer_256_8")
    assert (m.dim, m.depth, m.kernel_size, m.patch_size, m.num_classes) == (256, 8, 5, 2, 10)
    assert create_model("convmixer_256_8", num_classes=100).num_classes == 100
    assert "convmixer_1536_20" in convmixer.list_models()


@pytest.mark.parametrize("act,timm_act", [("gelu", torch.nn.GELU), ("relu", torch.nn.ReLU)])
def test_timm_parity(act, timm_act):
    timm_convmixer = pytest.importorskip("timm.models.convmixer")
    torch.manual_seed(0)
    reference = randomize_bn(timm_convmixer.ConvMixer(dim=48, depth=3, kernel_size=7, patch_size=3, num_classes=11,
                                                      act_layer=timm_act)).eval()
    ours = ConvMixer(dim=48, depth=3, kernel_size=7, patch_size=3, num_classes=11, act_layer=act).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(4, 3, 50, 50)
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    assert diff < 1e-5


def test_timm_parity_named_variant():
    timm = pytest.importorskip("timm")
    reference = randomize_bn(timm.create_model("convmixer_768_32", pretrained=False)).eval()
    ours = create_model("convmixer_768_32").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max().item() < 1e-5


def test_fast_depthwise_matches_plain_autograd():
    torch.manual_seed(0)
    fast = randomize_bn(ConvMixer(dim=32, depth=2, kernel_size=5, patch_size=2, num_classes=5))
    plain = ConvMixer(dim=32, depth=2, kernel_size=5, patch_size=2, num_classes=5, fast=False)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    for model in (fast, plain):
        model(x).square().sum().backward()
    assert (fast(x) - plain(x)).abs().max() < 1e-5
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fast_depthwise_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = ConvMixer(dim=32, depth=2, kernel_size=5, patch_size=2, num_classes=5)
    x = torch.randn(8, 3, 16, 16)
    model(x).square().sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16):
        model(x).float().square().sum().backward()
    for r, p in zip(reference, model.parameters()):
        assert p.grad.dtype == torch.float32
        assert (p.grad - r).norm() / r.norm() < 0.1


@pytest.mark.parametrize("kernel_size, bf16, per_plane", [(1, False, False), (3, False, False), (5, False, True),
                                                           (9, False, True), (3, True, False), (5, True, True)])
def test_depthwise_backward_routing(kernel_size, bf16, per_plane):
    """Kernels of 1 and 3, fp32 or bf16, take PyTorch's own backward (oneDNN's is faster there); larger kernels take
    the per-plane form; both give PyTorch's gradients."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 7, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.randn(6, 1, kernel_size, kernel_size, requires_grad=True), torch.randn(6, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        y = depthwise_conv2d(x, weight, bias)
        reference = F.conv2d(x, weight, bias, padding="same", groups=6)
    assert ("_DepthwiseConv2d" in type(y.grad_fn).__name__) == per_plane
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, weight, bias), grad)
    expected = torch.autograd.grad(reference, (x, weight, bias), grad)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=2e-2 if bf16 else 1e-4, atol=5e-2 if bf16 else 1e-5)


def test_per_plane_backward_exact_at_small_kernels():
    """The per-plane form stays correct at the kernels the routing sends around it (`_DepthwiseConv2d` takes any)."""
    torch.manual_seed(0)
    for k in (1, 3):
        x = torch.randn(3, 5, 6, 6, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(5, 1, k, k, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(_DepthwiseConv2d.apply, (x, weight, bias))


@pytest.mark.parametrize("layout, bf16, as_linear", [("channels_last", False, True), ("contiguous", False, False),
                                                     ("channels_last", True, False)])
def test_pointwise_routing(layout, bf16, as_linear):
    """fp32 channels_last CPU activations take the matrix product, channels-first and autocast the convolution;
    outputs (in channels_last layout) and all three gradients are the convolution's."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 5, 4)
    x = (x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x).requires_grad_()
    weight, bias = torch.randn(7, 6, 1, 1, requires_grad=True), torch.randn(7, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        y = pointwise_conv2d(x, weight, bias)
        reference = F.conv2d(x, weight, bias)
    assert ("Convolution" not in type(y.grad_fn).__name__) == as_linear
    assert y.shape == reference.shape == (3, 7, 5, 4)
    if as_linear:
        assert y.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, weight, bias), grad)
    expected = torch.autograd.grad(reference, (x, weight, bias), grad)
    torch.testing.assert_close(y, reference, rtol=2e-2 if bf16 else 1e-4, atol=5e-2 if bf16 else 1e-5)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=2e-2 if bf16 else 1e-4, atol=5e-2 if bf16 else 1e-5)


def test_pointwise_module_keeps_conv_parameters():
    """The pointwise layer is an nn.Conv2d(dim, dim, 1) to state dicts, Muon's grouping and export."""
    model = ConvMixer(dim=8, depth=2, kernel_size=3, patch_size=2, num_classes=3)
    layer = model.blocks[0][1]
    assert isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (1, 1) and layer.weight.shape == (8, 8, 1, 1)
    assert "blocks.0.1.weight" in model.state_dict()
    assert layer.fast and not model.set_fast(False).blocks[0][1].fast


def test_grad_checkpointing_identical():
    torch.manual_seed(0)
    a = ConvMixer(dim=16, depth=3, kernel_size=3, patch_size=2, num_classes=4)
    b = ConvMixer(dim=16, depth=3, kernel_size=3, patch_size=2, num_classes=4)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 16, 16)
    a(x).sum().backward()
    b(x).sum().backward()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    for (name, s), t in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(s, t, rtol=0, atol=0, msg=name)  # BN statistics updated once



@pytest.mark.parametrize("kw", [dict(act_layer="gelu"), dict(act_layer="relu", kernel_size=4), dict(act_layer="silu"),
                                dict(residual=False, patch_size=3), dict(norm_layer="layernorm")])
def test_cpu_inference_tiles_and_fusion_match_plain(monkeypatch, kw):
    from convmixer import fastops
    args = dict(dim=24, depth=2, kernel_size=5, patch_size=2, num_classes=7) | kw
    torch.manual_seed(0)
    model = randomize_bn(ConvMixer(**args)).eval()
    plain = ConvMixer(**args, fast=False).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(7, 3, 17, 16).contiguous(memory_format=torch.channels_last) * 3
    per_image = 24 * (17 // args["patch_size"]) * (16 // args["patch_size"]) * 4
    assert fastops.inference_tile(10 ** 9) == 4 and fastops.inference_tile(1 << 18) == 16  # large models: fours
    monkeypatch.setattr(fastops, "INFERENCE_TILE_BYTES", 5 * per_image)  # tiles of 5 and 2 images
    tiles = []
    run_tile = model._inference_features
    monkeypatch.setattr(model, "_inference_features", lambda t: tiles.append(len(t)) or run_tile(t))
    with torch.no_grad():
        expected = plain(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert tiles == [5, 2]
        with torch.autocast("cpu", torch.bfloat16):  # autocast: tiles, and no fp32 fusion
            torch.testing.assert_close(model(x).float(), plain(x).float(), rtol=0.05, atol=0.05)
        model.train(), plain.train()  # training-mode BatchNorm uses batch statistics: never tiled
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    assert tiles == [5, 2, 7]  # one tile of 10 under autocast: 2-byte activations
    with torch.enable_grad():
        model.eval()(x).sum()
    assert len(tiles) == 3
    if kw.get("act_layer") == "gelu" and hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        assert fastops._FUSED_WORKS  # this build runs conv+GELU as one oneDNN op

def test_channels_last_same_output():
    model = randomize_bn(ConvMixer(dim=32, depth=2, kernel_size=5, patch_size=2, num_classes=5)).eval()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        y1 = model(x)
        y2 = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)


def test_torch_compile_runs():
    model = ConvMixer(dim=16, depth=1, kernel_size=3, patch_size=2, num_classes=3)
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 8, 8)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


def test_torchscript_and_export():
    model = randomize_bn(ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=2, num_classes=3)).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), expected)
    exported = torch.export.export(model.set_fast(False), (x,))
    torch.testing.assert_close(exported.module()(x), expected)


def test_flops_count():
    model = create_model("convmixer_256_8")
    assert abs(flops_per_image(model, 32, 32) / 1e9 - 0.296) < 0.01


@settings(max_examples=15, deadline=None)
@given(dim=st.integers(1, 12), depth=st.integers(1, 3), k=st.sampled_from([1, 2, 3, 4, 5, 7]),
       p=st.integers(1, 5), h=st.integers(5, 24), w=st.integers(5, 24), classes=st.integers(0, 4))
def test_property_shapes_and_fast_equals_plain(dim, depth, k, p, h, w, classes):
    model = ConvMixer(dim=dim, depth=depth, kernel_size=k, patch_size=p, num_classes=classes)
    plain = ConvMixer(dim=dim, depth=depth, kernel_size=k, patch_size=p, num_classes=classes, fast=False)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, h, w)
    y = model(x)
    assert y.shape == ((2, classes) if classes else (2, dim))
    assert model.forward_features(x).shape == (2, dim, h // p, w // p)
    torch.testing.assert_close(y, plain(x), rtol=1e-4, atol=1e-5)


def test_per_sample_gradients_with_torch_func():
    """vmap(grad(...)) over the fast CPU depthwise path (k5): it refused the custom autograd Function."""
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    model = ConvMixer(dim=8, depth=1, kernel_size=5, patch_size=2, num_classes=3).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        one = grad(loss)(params, x[i], y[i])
        for name in params:
            torch.testing.assert_close(per_sample[name][i], one[name])


def test_module_hooks_fire_on_the_fast_inference_path():
    """The fused CPU inference calls the layers' functions; a hook on any layer must send it the module way."""
    model = randomize_bn(ConvMixer(dim=16, depth=3, kernel_size=5, patch_size=2, num_classes=4)).eval()
    x = torch.randn(3, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    seen = []
    handle = model.blocks[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        out = model(x)
    assert seen == [(3, 16, 8, 8)]
    handle.remove()
    handle = model.stem[0].register_forward_pre_hook(lambda m, i: (i[0] * 0,))  # e.g. pruning's weight pre-hook
    with torch.no_grad():
        zeroed = model(x)
    handle.remove()
    with torch.no_grad():
        assert torch.allclose(model(x), out, atol=1e-5) and not torch.allclose(zeroed, out, atol=1e-3)


def test_vmap_forward_model_ensembling():
    """torch.func.vmap over stacked parameters (PyTorch's model-ensembling recipe), without grad: the pointwise
    fast path asked for a memory layout that vmap refuses."""
    from torch.func import functional_call, stack_module_state, vmap
    models = [ConvMixer(dim=8, depth=1, kernel_size=5, patch_size=2, num_classes=3).eval() for _ in range(2)]
    params, buffers = stack_module_state(models)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    out = vmap(lambda p, b, xi: functional_call(models[0], (p, b), (xi,)), in_dims=(0, 0, None))(params, buffers, x)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in models])
    assert torch.allclose(out, expected, atol=1e-5)


def test_timm_global_pool_argument():
    model = create_model("convmixer_256_8", num_classes=0, global_pool="")
    assert model.forward_head(model.forward_features(torch.randn(1, 3, 32, 32))).shape == (1, 256, 16, 16)
    assert ConvMixer(16, 1, global_pool="avg", num_classes=0)(torch.randn(1, 3, 14, 14)).shape == (1, 16)
    for bad in (dict(global_pool="max"), dict(global_pool="", num_classes=10)):
        with pytest.raises(convmixer.ConvMixerError, match="global_pool"):
            ConvMixer(16, 1, **bad)
    assert model.model_args["global_pool"] == "" and ConvMixer(**model.model_args).global_pool == ""


def test_fast_depthwise_edge_cases_match_pytorch():
    torch.manual_seed(0)
    # float64 gradients in float64 (they were summed in float32)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fast = torch.autograd.grad(depthwise_conv2d(x, w, b).square().sum(), (x, w, b))
    ref = torch.autograd.grad(F.conv2d(x, w, b, padding=2, groups=4).square().sum(), (x, w, b))
    for f, r in zip(fast, ref):
        assert f.dtype == torch.float64 and torch.allclose(f, r, rtol=1e-12, atol=1e-12)
    # forward-mode AD (dual tensors) falls back to PyTorch's op, which propagates the tangent
    import torch.autograd.forward_ad as fwAD
    t = torch.randn_like(x)
    with fwAD.dual_level():
        out = depthwise_conv2d(fwAD.make_dual(x.detach(), t), w, b)
        tangent = fwAD.unpack_dual(out).tangent
    assert torch.allclose(tangent, F.conv2d(t, w, None, padding=2, groups=4), atol=1e-10)
    # a non-square kernel keeps the "same" size; an empty batch gives an empty output, forward and backward
    w35 = torch.randn(4, 1, 3, 5, requires_grad=True)
    x32 = torch.randn(1, 4, 6, 7)
    assert torch.allclose(depthwise_conv2d(x32, w35, None), F.conv2d(x32, w35, padding="same", groups=4), atol=1e-6)
    empty = torch.zeros(0, 4, 9, 9, requires_grad=True)
    depthwise_conv2d(empty, w.float(), None).sum().backward()
    assert empty.grad.shape == empty.shape
    model = ConvMixer(dim=8, depth=1, kernel_size=5, patch_size=2, num_classes=3).eval()
    assert model(torch.zeros(0, 3, 8, 8).contiguous(memory_format=torch.channels_last)).shape == (0, 3)


def test_an_export_that_disagrees_with_pytorch_is_not_written(tmp_path, monkeypatch):
    from convmixer.export import export
    model = randomize_bn(ConvMixer(16, 1, kernel_size=3, patch_size=2, num_classes=3))
    target = tmp_path / "m.pt"
    target.write_bytes(b"the user's earlier file")
    assert export(model, target, "torchscript", 8)["max_abs_diff"] < 1e-4  # batches 1-3, 8 and 10 px
    target.write_bytes(b"the user's earlier file")
    real = torch.jit.trace
    other = ConvMixer(16, 1, kernel_size=3, patch_size=2, num_classes=3).eval()  # a trace gone wrong
    monkeypatch.setattr(torch.jit, "trace", lambda m, x: real(other, x))
    with pytest.raises(convmixer.ConvMixerError, match="differing from PyTorch"):
        export(model, target, "torchscript", 8)
    assert target.read_bytes() == b"the user's earlier file" and len(list(tmp_path.iterdir())) == 1
