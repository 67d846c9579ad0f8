"""The fast-training options: translation, progressive resizing, the whitening stem and the two
initialisations of the depthwise filters (identity, correlated taps)."""
import json
from types import SimpleNamespace

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

import convmixer.train as training
from convmixer.augment import BatchAugment, translate
from convmixer.config import ConfigError, TrainConfig
from convmixer.data import decode_folder, scan_folder, train_transform
from convmixer.model import ConvMixer, correlated_depthwise, depthwise_layers, identity_depthwise, whiten_stem
from convmixer.train import train, train_size
from test_train import tiny_config


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 7, 10)])
def test_translate_is_a_crop_of_the_reflect_padded_image(shape):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (49, *shape), dtype=torch.uint8, generator=g)
    shifts = torch.tensor([(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)])
    out = translate(images, shifts)
    h, w = shape[1:]
    for i, (dy, dx) in enumerate(shifts.tolist()):
        padded = TF.pad(images[i], [3, 3, 3, 3], padding_mode="reflect")
        assert torch.equal(out[i], padded[:, 3 + dy:3 + dy + h, 3 + dx:3 + dx + w]), (dy, dx)


@pytest.mark.parametrize("path, n", [("batch", 9000), ("per image", 2700)])
def test_translation_draws_every_shift_alike(path, n):
    """Both paths: the batched one for decoded sets, torchvision's per image for streamed folders."""
    cfg = TrainConfig(randaugment_n=0, hflip=0, translate=1, scale_min=1.0)
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (1, 1, 6, 6), dtype=torch.uint8, generator=g)
    torch.manual_seed(0)
    if path == "batch":
        out = BatchAugment(cfg, 6, [0.0], [1.0])(image.expand(n, 1, 6, 6).contiguous())
    else:
        per_image = train_transform(cfg, 6, [0.0], [1.0])
        out = torch.stack([per_image(image[0]) for _ in range(n)])
    views = {(dy, dx): translate(image, torch.tensor([[dy, dx]]))[0].float() / 255
             for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    counts = {k: int(((out - v).abs().flatten(1).max(1).values < 1e-6).sum()) for k, v in views.items()}
    assert sum(counts.values()) == n and all(abs(c / n - 1 / 9) < 0.03 for c in counts.values())


def test_progressive_size_schedule():
    cfg = TrainConfig(res_start=16, res_until=0.5)
    sizes = [train_size(cfg, 32, 2, p / 100) for p in range(101)]
    assert sizes[0] == 16 and sizes[49] < 32 and sizes[50:] == [32] * 51
    assert sizes == sorted(sizes) and all(s % 2 == 0 for s in sizes)
    assert train_size(TrainConfig(), 32, 2, 0.0) == 32  # off
    assert train_size(TrainConfig(res_start=9, res_until=0.9), 28, 4, 0.0) == 8  # a multiple of the patch


def test_a_run_trains_at_the_growing_size_and_evaluates_at_the_full_one(tmp_path, fashion_dir, monkeypatch):
    seen = []
    forward = ConvMixer.forward_features
    monkeypatch.setattr(ConvMixer, "forward_features",
                        lambda self, x: seen.append((self.training, x.shape[-1])) or forward(self, x))
    train(tiny_config(tmp_path, fashion_dir, epochs=3, res_start=14, res_until=0.5, patch_size=2))
    trained = [size for training_mode, size in seen if training_mode]
    assert trained[0] == 14 and trained[-1] == 28 and trained == sorted(trained)
    assert len(set(trained)) > 3 and all(size % 2 == 0 for size in trained)
    assert {size for training_mode, size in seen if not training_mode} == {28}


def _brightest_cell(image):
    """make_images' class: the 4x4 cell holding its bright block."""
    cells = image.mean(0).unfold(0, 8, 8).unfold(1, 8, 8).mean((-1, -2))
    return int(cells.flatten().argmax())


def test_whitening_sample_is_random_and_the_same_from_files_or_decoded(folder_dir):
    files = scan_folder(folder_dir / "train")  # sorted by class, as most image sets are
    decoded = decode_folder(files, 32, progress=False)
    info = SimpleNamespace(model_args={"in_chans": 3}, img_size=32, crop_pct=1.0, mean=[0.5] * 3, std=[0.25] * 3)
    cfg = TrainConfig(seed=5)
    sample = training._stem_sample(files, info, cfg, values=3 * 32 * 32 * 24)
    assert sample.shape == (24, 3, 32, 32)
    torch.testing.assert_close(training._stem_sample(decoded, info, cfg, values=3 * 32 * 32 * 24), sample)
    assert len({_brightest_cell(image) for image in sample}) == 4  # every class, not the first class's files
    other = training._stem_sample(decoded, info, TrainConfig(seed=6), values=3 * 32 * 32 * 24)
    assert not torch.equal(other, sample)
    assert training._stem_sample(decoded, info, cfg, values=1).shape[0] == 2  # at least two images
    assert training._stem_sample(decoded, info, cfg).shape[0] == 240  # at most the whole set


def test_a_run_initialises_its_stem_from_the_whitening_sample(tmp_path, fashion_dir, monkeypatch):
    stems = []

    def whiten_and_record(model, images, eps, seed):
        whiten_stem(model, images, eps, seed)
        stems.append((model.stem[0].weight.detach().clone(), images))
    monkeypatch.setattr(training, "whiten_stem", whiten_and_record)
    train(tiny_config(tmp_path, fashion_dir, epochs=1, stem_init="whiten", patch_size=4, whiten_eps=1e-3))
    (weight, images), = stems
    assert images.shape[1:] == (1, 28, 28) and len(images) == 600  # the whole (tiny) training set
    fresh = ConvMixer(weight.shape[0], 1, kernel_size=3, patch_size=4, in_chans=1, num_classes=10)
    whiten_stem(fresh, images, 1e-3, TrainConfig().seed)
    torch.testing.assert_close(fresh.stem[0].weight, weight)
    train(tiny_config(tmp_path / "b", fashion_dir, epochs=1))
    assert len(stems) == 1  # the default initialisation does not whiten


def test_whitened_stem_gives_centred_unit_variance_channels():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 3, 16, 16, generator=g)
    images = base * torch.tensor([2.0, 1.0, 0.1]).view(1, 3, 1, 1) + base.roll(1, dims=1)  # correlated channels
    model = ConvMixer(64, 1, 3, 2, num_classes=10)
    whiten_stem(model, images, eps=1e-6, seed=3)
    out = model.stem[0](images).detach().double()
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (out.var(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    # the first 2 x 12 filters are +- the whitening directions
    w = model.stem[0].weight.flatten(1)
    assert torch.allclose(w[:12], -w[12:24])
    # a narrower stem keeps the strongest directions; the same seed, the same filters
    narrow, again = ConvMixer(8, 1, 3, 2, num_classes=10), ConvMixer(64, 1, 3, 2, num_classes=10)
    whiten_stem(narrow, images, eps=1e-6)
    whiten_stem(again, images, eps=1e-6, seed=3)
    assert torch.equal(narrow.stem[0].weight, model.stem[0].weight[:8])
    assert torch.equal(again.stem[0].weight, model.stem[0].weight)


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("fast", [True, False])
def test_identity_depthwise_filters_pass_each_position_through(kernel_size, fast):
    model = ConvMixer(6, 2, kernel_size, 2, num_classes=3, fast=fast)
    before = [m.weight.detach().clone() for m in depthwise_layers(model)]
    identity_depthwise(model, 0.75)
    layers = depthwise_layers(model)
    assert len(layers) == 2
    x = torch.randn(4, 6, 7, 5, requires_grad=True)
    for layer, weight in zip(layers, before):
        added = layer.weight.detach() - weight
        assert torch.count_nonzero(added) == 6  # one tap of each filter
        with torch.no_grad():
            layer.weight.copy_(added)
            layer.bias.zero_()
        torch.testing.assert_close(layer(x), 0.75 * x)  # the grad path (fast backward) and the plain one
        with torch.no_grad():
            torch.testing.assert_close(layer(x), 0.75 * x)


def test_correlated_depthwise_filters_have_the_stated_covariance():
    model = ConvMixer(20_000, 2, 3, 2, num_classes=3)
    correlated_depthwise(model, 2.0, seed=4)
    taps = torch.cartesian_prod(torch.arange(3), torch.arange(3)).double()
    for i, layer in enumerate(depthwise_layers(model), start=1):
        w = layer.weight.detach().double().flatten(1)  # 20,000 filters x 9 taps
        s = 2.0 * i / 2  # the length scale grows with depth: 1 px, then 2 px
        target = torch.exp(-torch.cdist(taps, taps) ** 2 / (2 * s * s)) / 27  # default per-tap variance 1/(3 k^2)
        torch.testing.assert_close(w.T @ w / len(w), target, atol=1.5e-3, rtol=0)
        assert w.mean().abs() < 2e-3
    again = ConvMixer(20_000, 2, 3, 2, num_classes=3)
    correlated_depthwise(again, 2.0, seed=4)
    assert torch.equal(again.blocks[1][0].fn[0].weight, model.blocks[1][0].fn[0].weight)
    correlated_depthwise(again, 2.0, seed=5)
    assert not torch.equal(again.blocks[1][0].fn[0].weight, model.blocks[1][0].fn[0].weight)
    tiny = ConvMixer(20_000, 1, 5, 2, num_classes=3)
    correlated_depthwise(tiny, 1e-3)  # a vanishing length scale: independent taps
    w = tiny.blocks[0][0].fn[0].weight.detach().double().flatten(1)
    torch.testing.assert_close(w.T @ w / len(w), torch.eye(25, dtype=torch.float64) / 75, atol=1e-3, rtol=0)


def test_a_run_starts_its_depthwise_filters_at_the_identity(tmp_path, fashion_dir, monkeypatch):
    scales = []

    def add_and_record(model, scale):
        plain = [m.weight.detach().clone() for m in depthwise_layers(model)]
        identity_depthwise(model, scale)
        changed = [m.weight.detach() - w for m, w in zip(depthwise_layers(model), plain)]
        scales.append((scale, changed))
    monkeypatch.setattr(training, "identity_depthwise", add_and_record)
    summary = train(tiny_config(tmp_path, fashion_dir, epochs=4, depthwise_identity=0.5))
    (scale, changed), = scales
    assert scale == 0.5 and len(changed) == 2
    for c in changed:  # 0.5 on the centre tap of each filter, nothing elsewhere
        torch.testing.assert_close(c[:, 0, 1, 1], torch.full((c.shape[0],), 0.5))
        assert torch.count_nonzero(c) == c.shape[0]
    assert summary["best_val_top1"] > 0.5
    train(tiny_config(tmp_path / "b", fashion_dir, epochs=1))
    assert len(scales) == 1  # off by default
    weights = tmp_path / "b" / "run" / "model.safetensors"
    for key in ("depthwise_identity", "depthwise_cov"):
        with pytest.raises(ConfigError, match=f"brings trained weights: drop {key} or pretrained"):
            train(tiny_config(tmp_path / "c", fashion_dir, pretrained=str(weights), **{key: 1.0}))


def test_a_run_correlates_its_depthwise_taps_from_its_seed(tmp_path, fashion_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "correlated_depthwise", lambda model, scale, seed: calls.append((scale, seed)))
    train(tiny_config(tmp_path, fashion_dir, epochs=1, depthwise_cov=1.5, seed=7))
    assert calls == [(1.5, 7)]


def test_a_run_with_the_fast_options_learns(tmp_path, fashion_dir):
    summary = train(tiny_config(tmp_path, fashion_dir, epochs=4, translate=2, res_start=14, res_until=0.5,
                                stem_init="whiten"))
    assert summary["best_val_top1"] > 0.5


@pytest.mark.parametrize("values, words", [
    (dict(res_start=1, patch_size=2), "res_start 1 is smaller than the patch size"),
    (dict(stem_init="pca"), "stem_init='pca' is not one of"),
    (dict(res_until=0.0), "res_until=0 is outside"),
    (dict(translate=-1), "translate=-1 is outside"),
    (dict(res_until=1.0), "res_until=1 is outside"),
    (dict(res_until=float("nan")), "res_until"),
    (dict(whiten_eps=0.0), "whiten_eps=0 is outside"),
    (dict(whiten_eps=1e-300), "whiten_eps=1e-300 is outside"),
    (dict(whiten_eps=float("inf")), "whiten_eps"),
    (dict(depthwise_identity=-0.5), "depthwise_identity=-0.5 is outside"),
    (dict(depthwise_identity=11.0), "depthwise_identity=11 is outside"),
    (dict(depthwise_identity=float("nan")), "depthwise_identity must be a finite number"),
    (dict(depthwise_cov=-1.0), "depthwise_cov=-1 is outside"),
    (dict(depthwise_cov=float("inf")), "depthwise_cov must be a finite number"),
    (dict(hflip=0.0, hflip_alternate=True), "hflip is 0"),
    (dict(randaugment_from=1.0), "randaugment_from=1 is outside"),
    (dict(randaugment_n=0, randaugment_from=0.5), "randaugment_n is 0"),
    (dict(randaugment_from=-0.1), "randaugment_from=-0.1 is outside"),
    (dict(randaugment_from=float("nan")), "randaugment_from"),
    (dict(augment_until=0.0), "augment_until=0 is outside"),
    (dict(augment_until=1.5), "augment_until=1.5 is outside"),
    (dict(augment_until=float("nan")), "augment_until must be a finite number"),
    (dict(augment_until=0.8, randaugment_n=0), "recipe has none: drop augment_until"),
    (dict(augment_until=0.5, randaugment_from=0.5), "RandAugment would never run"),
])
def test_bad_fast_options_are_refused(values, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**values).validate()


@pytest.mark.parametrize("values", [dict(translate=28), dict(res_start=40)])
def test_options_larger_than_the_images_are_refused(tmp_path, fashion_dir, values):
    with pytest.raises(ConfigError, match="must stay below the 28 px images"):
        train(tiny_config(tmp_path, fashion_dir, **values))


@pytest.mark.parametrize("key, value", [("hflip_alternate", True), ("randaugment_from", 0.5), ("augment_until", 0.5)])
def test_batch_only_options_on_a_streamed_folder_are_refused(tmp_path, folder_dir, key, value):
    cfg = tiny_config(tmp_path, folder_dir, dataset="imagefolder", img_size=32, cache=False, hflip=0.5,
                      randaugment_n=2, **{key: value})
    with pytest.raises(ConfigError, match=f"{key} needs a decoded data set.*drop {key}"):
        train(cfg)


def test_mixup_stops_at_augment_until(tmp_path, fashion_dir, monkeypatch):
    mixed, make_mixer = [], training.batch_mixer

    def counting_mixer(cfg, num_classes):
        mixer = make_mixer(cfg, num_classes)
        return lambda images, labels: mixed.append(len(labels)) or mixer(images, labels)

    monkeypatch.setattr(training, "batch_mixer", counting_mixer)
    cfg = tiny_config(tmp_path, fashion_dir, mixup=0.8, augment_until=0.5, randaugment_n=0, epochs=4)
    train(cfg)
    steps = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    # mixed while the step about to be taken (counted from 1, as progress does) is in the first half
    assert 0 < len(mixed) == sum((i + 1) / steps < 0.5 for i in range(steps))


def test_whitening_a_stem_it_cannot_whiten_is_refused(tmp_path, fashion_dir):
    with pytest.raises(ConfigError, match="patches of 2 or more values"):  # 1 channel x 1 pixel
        train(tiny_config(tmp_path, fashion_dir, stem_init="whiten", patch_size=1))
    weights = tmp_path / "first" / "run" / "model.safetensors"
    train(tiny_config(tmp_path / "first", fashion_dir, epochs=1))
    with pytest.raises(ConfigError, match="brings trained weights: drop stem_init or pretrained"):
        train(tiny_config(tmp_path, fashion_dir, stem_init="whiten", pretrained=str(weights)))
