"""Tiny generated data sets in the real on-disk formats (nothing downloaded, nothing from ../shared)."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image


def make_images(n, size=32, channels=3, classes=10, seed=0):
    """Learnable images: class c has a bright block at a class-specific place, plus noise."""
    g = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = g.integers(0, 60, size=(n, size, size, channels), dtype=np.uint8)
    cell = size // 4
    for i, c in enumerate(labels):
        r, col = divmod(int(c) % 16, 4)
        images[i, r * cell:(r + 1) * cell, col * cell:(col + 1) * cell, :] = 220
    return images, labels


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVMIXER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.manual_seed(0)


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    root = tmp_path / "fmnist"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", 600, 0), ("t10k", 200, 1)):
        images, labels = make_images(n, size=28, channels=1, seed=seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def cifar_dir(tmp_path):
    root = tmp_path / "cifar"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images, labels = make_images(100, seed=i)
        entry = {"data": images.transpose(0, 3, 1, 2).reshape(100, -1), "labels": labels.tolist(),
                 "batch_label": name}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return root


@pytest.fixture
def folder_dir(tmp_path):
    """ImageFolder tree with train/ and test/, JPEG and PNG files."""
    root = tmp_path / "folder"
    for split, n, seed in (("train", 240, 0), ("test", 80, 1)):
        images, labels = make_images(n, size=32, channels=3, classes=4, seed=seed)
        for i, (img, c) in enumerate(zip(images, labels)):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.{'png' if i % 2 else 'jpg'}")
    return root
