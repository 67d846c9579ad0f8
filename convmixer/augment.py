"""Training augmentation of whole batches of uint8 images, on whatever device the batch is on.

The decoded data sets (CIFAR, (Fashion-)MNIST, small image folders) are one uint8 tensor; this applies
the recipe's augmentation to a micro-batch at a time instead of image by image in a DataLoader:

- RandAugment draws, for every image and round, one of torchvision's 14 operations and a sign, exactly
  as ``v2.RandAugment`` does per image; the images that drew the same (operation, sign) go through
  torchvision's own implementation of it as one sub-batch. Every operation works per image on a batch
  (AutoContrast, Equalize and Contrast use each image's own statistics), so each image gets what the
  per-image transform would give it for the same draw (tests/test_augment.py). The draws stay on
  the CPU: on a GPU, a round is one gather, the operations on contiguous sub-batches, one gather back.
- horizontal flips are one masked flip, translations one gather (reflecting at the border, as
  ``v2.RandomCrop(padding=N, padding_mode="reflect")``); random-resized crops, colour jitter and random erasing, off in
  most recipes, run torchvision's per-image transforms on the images that need them.
- From augment_until on (a fraction of training), only the flips apply, and images of another size are resized
  whole (shorter side to img_size, centre crop) instead of cropped at random.

Streamed folders keep the per-image pipeline (data.train_transform) in DataLoader workers.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2


class BatchAugment:
    """``cfg``'s augmentation (a TrainConfig) for uint8 batches N x C x H x W, returning normalised
    float batches of ``img_size``."""

    def __init__(self, cfg, img_size: int, mean, std, num_images: int = 0):
        self.cfg, self.img_size = cfg, img_size
        # hflip_alternate: image i is mirrored in the epochs whose parity differs from its seeded bit
        self.flip_parity = (torch.rand(num_images, generator=torch.Generator().manual_seed(cfg.seed)) < 0.5
                            if cfg.hflip_alternate else None)
        self._magnitude_tables = {}  # (height, width) -> RandAugment's magnitude and signedness per operation
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.randaugment = v2.RandAugment(num_ops=cfg.randaugment_n, magnitude=cfg.randaugment_m)
        self.ops = list(self.randaugment._AUGMENTATION_SPACE.items())
        self.crop = v2.RandomResizedCrop(img_size, scale=(cfg.scale_min, 1.0), antialias=True)
        self.resize = v2.Compose([v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)])
        self.jitter = v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter) if cfg.color_jitter else None
        self.erasing = v2.RandomErasing(1.0, value="random") if cfg.random_erasing else None

    def __call__(self, images: torch.Tensor, index: torch.Tensor | None = None, epoch: int = 0,
                 progress: float = 1.0) -> torch.Tensor:
        """``index``: the images' positions in the data set (CPU), which hflip_alternate needs with ``epoch``;
        ``progress``: the fraction of training done, which randaugment_from and augment_until compare with."""
        cfg = self.cfg
        plain = plain_images(cfg, progress)
        resize = images.shape[-2:] != (self.img_size, self.img_size)
        if plain and resize:
            images = self.resize(images)  # the whole image, not a random crop of it
        elif not plain and (cfg.scale_min < 1 or resize):
            images = torch.stack([self.crop(img) for img in images])
        if cfg.hflip > 0:
            if self.flip_parity is not None and index is not None:
                flip = to_device(self.flip_parity[index] ^ bool(epoch % 2), images.device)
            else:
                flip = (torch.rand(len(images)) < cfg.hflip).to(images.device)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        if plain:
            return self.normalise(images)
        if cfg.translate:
            images = translate(images, torch.randint(-cfg.translate, cfg.translate + 1, (len(images), 2)))
        for _ in range(cfg.randaugment_n if progress >= cfg.randaugment_from else 0):
            images = self.randaugment_round(images)
        if self.jitter is not None:
            images = torch.stack([self.jitter(img) for img in images])
        x = self.normalise(images)
        if self.erasing is not None:
            chosen = (torch.rand(len(x)) < cfg.random_erasing).nonzero().flatten().tolist()
            for i in chosen:
                x[i] = self.erasing(x[i])
        return x

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().div_(255) - self.mean.to(images.device)) / self.std.to(images.device)

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One RandAugment round's draws for n images: an operation index and a sign per image."""
        return torch.randint(len(self.ops), (n,)), torch.rand(n) <= 0.5

    def randaugment_round(self, images: torch.Tensor, draws=None) -> torch.Tensor:
        """One round: the images are sorted by their (operation, sign) draw, each run of equal draws goes
        through torchvision's operation as one sub-batch, and the results are put back in order. The
        draws and the sort stay on the CPU and reach the batch's device in one copy, so a GPU batch
        waits for the host once per round, not twice per operation (boolean masks on the device would)."""
        op_index, negative = draws if draws is not None else self.draw(len(images))
        if len(images) == 0:
            return images.clone()
        magnitudes, signed = self._magnitude_table(*images.shape[-2:])
        key = op_index.long() * 2 + (negative.bool() & signed[op_index]).long()
        order = torch.argsort(key, stable=True)
        moves = to_device(torch.stack([order, torch.argsort(order)]), images.device)  # gather, then undo it
        sorted_images, parts, start = images[moves[0]], [], 0
        for k, count in enumerate(torch.bincount(key, minlength=2 * len(self.ops)).tolist()):
            if count:
                name, magnitude = self.ops[k // 2][0], magnitudes[k // 2]
                parts.append(self.randaugment._apply_image_or_video_transform(
                    sorted_images[start:start + count], name, -magnitude if k % 2 else magnitude,
                    interpolation=self.randaugment.interpolation, fill=self.randaugment._fill))
                start += count
        return torch.cat(parts)[moves[1]]

    def _magnitude_table(self, height: int, width: int) -> tuple[list[float], torch.Tensor]:
        """Each operation's magnitude at the configured level, and whether its sign is drawn (signed and
        not zero), for images of this size: computed once per size, not every round."""
        if (height, width) not in self._magnitude_tables:
            magnitudes, signed = [], []
            for name, (magnitudes_fn, is_signed) in self.ops:
                values = magnitudes_fn(self.randaugment.num_magnitude_bins, height, width)
                magnitudes.append(0.0 if values is None else float(values[self.randaugment.magnitude]))
                signed.append(bool(is_signed and magnitudes[-1]))
            self._magnitude_tables[(height, width)] = magnitudes, torch.tensor(signed)
        return self._magnitude_tables[(height, width)]


def plain_images(cfg, progress: float) -> bool:
    """Whether training at ``progress`` is past augment_until: flips only (1 = never, the last step included)."""
    return cfg.augment_until < 1 and progress >= cfg.augment_until


def to_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device`` without making the host wait for the device's queue."""
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Positions outside 0..size-1 mirrored back in, without repeating the edge (numpy's 'reflect')."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def translate(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each image moved by its (dy, dx) in ``shifts`` (N x 2, each at most the image's size - 1), the
    uncovered border filled by reflection: what a random crop of a reflect-padded image gives."""
    n, c, h, w = images.shape
    shifts = shifts.to(images.device)
    rows = _reflect(torch.arange(h, device=images.device) + shifts[:, :1], h)  # N x H
    cols = _reflect(torch.arange(w, device=images.device) + shifts[:, 1:], w)  # N x W
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return images[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
