"""The batched augmentation gives each image what torchvision's per-image transforms give it for the
same draw, and draws with the same distribution."""
import pytest
import torch
from torchvision.transforms import v2

from convmixer.augment import BatchAugment, plain_images
from convmixer.config import TrainConfig


def _images(n=64, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("magnitude", [0, 9, 12, 30])
def test_each_operation_on_a_batch_equals_it_per_image(magnitude):
    aug = BatchAugment(TrainConfig(randaugment_n=1, randaugment_m=magnitude), 16, [0.5] * 3, [0.5] * 3)
    images = _images()
    per_image = v2.RandAugment(num_ops=1, magnitude=magnitude)
    for k, (name, (magnitudes_fn, signed)) in enumerate(aug.ops):
        for negative in (False, True):
            draws = torch.full((len(images),), k), torch.full((len(images),), negative)
            batched = aug.randaugment_round(images, draws)
            values = magnitudes_fn(31, 16, 16)
            m = 0.0 if values is None else float(values[magnitude])
            m = -m if (signed and negative and m) else m
            for i in range(0, len(images), 7):
                one = per_image._apply_image_or_video_transform(images[i], name, m, interpolation=per_image.interpolation,
                                                                fill=per_image._fill)
                assert torch.equal(batched[i], one), (name, negative, i)


def test_a_mixed_batch_gives_each_image_its_own_draw():
    aug = BatchAugment(TrainConfig(randaugment_n=1, randaugment_m=12), 16, [0.5] * 3, [0.5] * 3)
    images = _images(128)
    torch.manual_seed(3)
    op_index, negative = aug.draw(len(images))
    batched = aug.randaugment_round(images, (op_index, negative))
    per_image = v2.RandAugment(num_ops=1, magnitude=12)
    for i in range(len(images)):
        name, (magnitudes_fn, signed) = aug.ops[int(op_index[i])]
        values = magnitudes_fn(31, 16, 16)
        m = 0.0 if values is None else float(values[12])
        m = -m if (signed and bool(negative[i])) else m
        one = per_image._apply_image_or_video_transform(images[i], name, m, interpolation=per_image.interpolation,
                                                        fill=per_image._fill)
        assert torch.equal(batched[i], one), (i, name)


def test_draws_have_torchvisions_distribution():
    aug = BatchAugment(TrainConfig(randaugment_n=2, randaugment_m=12), 16, [0.5] * 3, [0.5] * 3)
    torch.manual_seed(0)
    op_index, negative = aug.draw(140_000)
    freq = torch.bincount(op_index, minlength=14).float() / len(op_index)
    assert len(aug.ops) == 14 and (freq - 1 / 14).abs().max() < 0.005  # uniform over the 14 operations
    assert abs(negative.float().mean().item() - 0.5) < 0.005          # each sign half the time
    # torchvision's own per-image choice, for comparison: also uniform
    per_image = v2.RandAugment(num_ops=1, magnitude=12)
    counts = {}
    for _ in range(14_000):
        key, _ = per_image._get_random_item(per_image._AUGMENTATION_SPACE)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == {name for name, _ in aug.ops} and max(abs(c / 14_000 - 1 / 14) for c in counts.values()) < 0.015


def test_flip_rate_normalisation_and_output():
    cfg = TrainConfig(randaugment_n=0, hflip=0.5)
    aug = BatchAugment(cfg, 16, [0.25] * 3, [0.5] * 3)
    images = _images(4000)
    torch.manual_seed(1)
    out = aug(images)
    unflipped = ((images.float() / 255 - 0.25) / 0.5)
    same = (out - unflipped).abs().flatten(1).max(1).values < 1e-6
    mirrored = (out - unflipped.flip(-1)).abs().flatten(1).max(1).values < 1e-6
    assert out.dtype == torch.float32 and bool((same | mirrored).all())
    assert abs(mirrored.float().mean().item() - 0.5) < 0.03


def test_crops_jitter_and_erasing_keep_shape_and_range():
    cfg = TrainConfig(randaugment_n=2, randaugment_m=9, scale_min=0.5, color_jitter=0.4, random_erasing=0.5)
    aug = BatchAugment(cfg, 12, [0.5] * 3, [0.5] * 3)
    out = aug(_images(32, size=16))
    assert out.shape == (32, 3, 12, 12) and torch.isfinite(out).all()


def test_alternating_flips_mirror_each_image_every_other_epoch():
    cfg = TrainConfig(randaugment_n=0, hflip=0.5, hflip_alternate=True, seed=4)
    aug = BatchAugment(cfg, 16, [0.0] * 3, [1.0] * 3, num_images=1000)
    images = _images(1000)
    index = torch.arange(1000).flip(0)  # any order: the flips follow the images, not their place in the batch
    flipped = []
    for epoch in range(3):
        out = aug(images[index], index, epoch)
        mirrored = (out == images[index].flip(-1).float() / 255).flatten(1).all(1)
        assert (mirrored | (out == images[index].float() / 255).flatten(1).all(1)).all()
        flipped.append(mirrored)
    assert (flipped[0] ^ flipped[1]).all() and torch.equal(flipped[0], flipped[2])
    assert 400 < int(flipped[0].sum()) < 600
    again = BatchAugment(cfg, 16, [0.0] * 3, [1.0] * 3, num_images=1000)(images[index], index, 0)
    assert torch.equal(again, aug(images[index], index, 0))  # seeded: a resumed run flips the same images


def test_randaugment_from_applies_it_only_late_in_training():
    cfg = TrainConfig(randaugment_n=2, randaugment_m=12, randaugment_from=0.5, hflip=0.0)
    aug = BatchAugment(cfg, 16, [0.0] * 3, [1.0] * 3)
    images = _images()
    plain = images.float() / 255
    assert torch.equal(aug(images, progress=0.0), plain) and torch.equal(aug(images, progress=0.49), plain)
    late = aug(images, progress=0.5)
    changed = ~(late == plain).flatten(1).all(1)
    assert int(changed.sum()) > len(images) // 2  # two rounds of 14 operations rarely leave an image as it was


def test_augment_until_leaves_only_flips_and_the_resize_late_in_training():
    cfg = TrainConfig(randaugment_n=2, translate=2, random_erasing=1.0, scale_min=0.5, augment_until=0.8, hflip=1.0)
    aug = BatchAugment(cfg, 16, [0.0] * 3, [1.0] * 3)
    images = _images()
    mirrored = images.flip(-1).float() / 255
    assert torch.equal(aug(images, progress=0.8), mirrored) and torch.equal(aug(images, progress=1.0), mirrored)
    early = aug(images, progress=0.79)
    assert (~(early == mirrored).flatten(1).all(1)).all()  # erasing every image, at the least
    assert not plain_images(TrainConfig(translate=2), 1.0)  # the default, 1: augmented to the last step
    larger = torch.nn.functional.interpolate(images.float(), size=24, mode="nearest").round().to(torch.uint8)
    late = aug(larger, progress=0.9)  # images of another size: resized whole, not cropped at random
    assert late.shape == (64, 3, 16, 16)
    assert torch.equal(late, v2.functional.resize(larger, [16], antialias=True).flip(-1).float() / 255)


def test_timm_randaugment_is_seeded_per_image_and_leaves_the_global_generators_alone(tmp_path, fashion_dir):
    """randaugment_impl timm: timm's rand-m9-mstd0.5-inc1 (the paper's ImageNet recipe), drawn from each image's
    own seed like the rest of the per-image pipeline, so a resumed or multi-worker run sees the same images."""
    pytest.importorskip("timm")
    import random

    import numpy as np

    from convmixer.config import ConfigError, make_config
    from convmixer.data import ImageData, TransformedImages, train_transform
    from convmixer.train import train
    cfg = make_config(None, {"randaugment_impl": "timm", "randaugment_n": 2, "randaugment_m": 9, "hflip": 0})
    transform = train_transform(cfg, 16, [0.5] * 3, [0.5] * 3)
    assert "rand-m9-n2-mstd0.5-inc1" in repr(transform)
    data = TransformedImages(ImageData(torch.zeros(8, dtype=torch.long), ["a"], images=_images(8)), transform)
    python, numpy = random.getstate(), np.random.get_state()[1].copy()
    a, b, c = data[(3, 7)][0], data[(3, 7)][0], data[(3, 8)][0]
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (3, 16, 16)
    assert random.getstate() == python and (np.random.get_state()[1] == numpy).all()
    with pytest.raises(ConfigError, match="timm's scale"):
        make_config(None, {"randaugment_impl": "timm", "randaugment_m": 12})
    summary = train(make_config(None, dict(dim=8, depth=1, kernel_size=3, patch_size=2, batch_size=32, epochs=1,
                                           dataset="fashion_mnist", data_dir=str(fashion_dir), val_split=0,
                                           subset=64, download=False, amp="off", progress=False,
                                           randaugment_impl="timm", randaugment_m=9, out=str(tmp_path / "run"))))
    assert summary["epochs_run"] == 1


def test_timm_randaugment_survives_posterize_at_full_magnitude():
    """The magnitude noise reaches 10, where timm's increasing posterize keeps 0 bits, which Pillow 11 refuses."""
    pytest.importorskip("timm")
    from convmixer.data import TimmRandAugment
    aug = TimmRandAugment(1, 10, 16, [0.5] * 3)
    posterize = next(op for op in aug.transform.ops if op.name == "PosterizeIncreasing")
    from PIL import Image
    assert posterize.aug_fn(Image.new("RGB", (4, 4), (200, 100, 50)), 0).getextrema() == ((0, 0),) * 3
    for _ in range(50):
        assert aug(_images(1)[0]).shape == (3, 16, 16)
