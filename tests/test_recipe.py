"""The fast-training options: translation, progressive resizing and the whitening stem."""
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from convmixer.augment import BatchAugment, translate
from convmixer.config import ConfigError, TrainConfig
from convmixer.model import ConvMixer, whiten_stem
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


def test_batch_translation_draws_every_shift_alike():
    aug = BatchAugment(TrainConfig(randaugment_n=0, hflip=0, translate=1), 6, [0.0], [1.0])
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (1, 1, 6, 6), dtype=torch.uint8, generator=g)
    torch.manual_seed(0)
    out = aug(image.expand(9000, 1, 6, 6).contiguous())
    views = {(dy, dx): translate(image, torch.tensor([[dy, dx]]))[0].float() / 255
             for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    counts = {k: int(((out - v).abs().flatten(1).max(1).values < 1e-6).sum()) for k, v in views.items()}
    assert sum(counts.values()) == 9000 and all(abs(c / 9000 - 1 / 9) < 0.02 for c in counts.values())


def test_progressive_size_schedule():
    cfg = TrainConfig(res_start=16, res_until=0.5)
    sizes = [train_size(cfg, 32, 2, p / 100) for p in range(101)]
    assert sizes[0] == 16 and sizes[49] < 32 and sizes[50:] == [32] * 51
    assert sizes == sorted(sizes) and all(s % 2 == 0 for s in sizes)
    assert train_size(TrainConfig(), 32, 2, 0.0) == 32  # off
    assert train_size(TrainConfig(res_start=9, res_until=1.0), 28, 4, 0.0) == 8  # a multiple of the patch


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


def test_a_run_with_the_fast_options_learns(tmp_path, fashion_dir):
    summary = train(tiny_config(tmp_path, fashion_dir, epochs=4, translate=2, res_start=14, res_until=0.5,
                                stem_init="whiten"))
    assert summary["best_val_top1"] > 0.5


@pytest.mark.parametrize("values, words", [
    (dict(res_start=1, patch_size=2), "res_start 1 is smaller than the patch size"),
    (dict(stem_init="pca"), "stem_init='pca' is not one of"),
    (dict(res_until=0.0), "res_until=0 is outside"),
    (dict(translate=-1), "translate=-1 is outside"),
])
def test_bad_fast_options_are_refused(values, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**values).validate()


@pytest.mark.parametrize("values", [dict(translate=28), dict(res_start=40)])
def test_options_larger_than_the_images_are_refused(tmp_path, fashion_dir, values):
    with pytest.raises(ConfigError, match="must stay below the 28 px images"):
        train(tiny_config(tmp_path, fashion_dir, **values))
