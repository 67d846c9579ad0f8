import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from convmixer.data import DataError, decode, load_dataset, split_train_val



def test_cifar_pickles(cifar_dir):
    train = load_dataset("cifar10", cifar_dir, train=True)
    test = load_dataset("cifar10", cifar_dir, train=False)
    assert train.images.shape == (500, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 100 and train.classes[0] == "airplane"


def test_cifar_pickle_with_code_is_refused(cifar_dir):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(cifar_dir / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(DataError, match="refused"):
        load_dataset("cifar10", cifar_dir, train=False)


def test_idx_files(fashion_dir):
    train = load_dataset("fashion_mnist", fashion_dir, train=True)
    assert train.images.shape == (600, 1, 28, 28) and train.channels == 1 and len(train.classes) == 10


def test_truncated_idx_names_file(fashion_dir):
    path = fashion_dir / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    raw = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(DataError, match="t10k-images.*truncated"):
        load_dataset("fashion_mnist", fashion_dir, train=False)


def test_missing_data_offline_is_clear(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10", tmp_path / "nothing", download=False)


def test_image_folder_decoded_and_cached(folder_dir):
    data = load_dataset("imagefolder", folder_dir, train=True, img_size=32)
    assert data.images.shape == (240, 3, 32, 32) and data.classes == ["class_0", "class_1", "class_2", "class_3"]
    again = load_dataset("imagefolder", folder_dir, train=True, img_size=32)  # from the cache
    assert torch.equal(again.images, data.images)
    test = load_dataset("imagefolder", folder_dir, train=False, img_size=32)
    assert len(test) == 80


def test_image_folder_problems(tmp_path):
    tmp_path = tmp_path / "data"  # beside the test's cache folder, not around it
    (tmp_path / "a").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(DataError, match="no images.*b"):
        load_dataset("imagefolder", tmp_path, img_size=8)
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="broken.jpg"):
        load_dataset("imagefolder", tmp_path, img_size=8)
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "ok.png")
    data = load_dataset("imagefolder", tmp_path, img_size=8, skip_bad_images=True)
    assert len(data) == 2


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "CMYK"])
def test_decode_any_mode(tmp_path, mode):
    img = Image.new(mode, (9, 7))
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    img.save(path)
    assert decode(str(path), 3).shape == (3, 7, 9)
    assert decode(str(path), 1).shape == (1, 7, 9)


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "x.png")
    assert decode(str(tmp_path / "x.png"), 1).max() == 255


def test_val_split_seeded(cifar_dir):
    data = load_dataset("cifar10", cifar_dir)
    train, val = split_train_val(data, 100, seed=3)
    train2, val2 = split_train_val(data, 100, seed=3)
    assert len(val) == 100 and len(train) == 400 and torch.equal(val.labels, val2.labels)
    assert torch.equal(split_train_val(data, 0.2, seed=3)[1].images, val.images)
    with pytest.raises(DataError):
        split_train_val(data, 500)


def test_download_failure_offline_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    monkeypatch.setattr(tvd.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path / "empty", download=True)
    assert "download failed" in str(info.value) and "--data-dir" in str(info.value) and "\n" not in str(info.value)


def test_a_carved_split_is_the_same_decoded_or_streamed_with_unreadable_files(tmp_path, monkeypatch, capsys):
    """Decoding drops an unreadable file, streaming keeps its place: the seeded split must not move (it did, so
    an eval that decoded what training streamed validated on training images)."""
    import numpy as np
    from PIL import Image

    from convmixer.data import decode, load_dataset, split_train_val
    monkeypatch.setenv("CONVMIXER_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data" / "train"
    for k, c in enumerate("ab"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8, 3), 10 * i + 120 * k, np.uint8)).save(root / c / f"{i}.png")
    (root / "a" / "5b.png").write_bytes(b"\x89PNG cut short")  # sorts among the others
    decoded = load_dataset("imagefolder", tmp_path / "data", skip_bad_images=True, cache=True, progress=False)
    streamed = load_dataset("imagefolder", tmp_path / "data", skip_bad_images=True, cache=False, progress=False)
    assert decoded.images is not None and streamed.files is not None and len(decoded) == 20 and len(streamed) == 21
    for seed in range(5):
        (d_train, d_val), (s_train, s_val) = (split_train_val(x, 0.3, seed=seed) for x in (decoded, streamed))
        readable = [f for f in s_val.files if not f.endswith("5b.png")]
        assert torch.equal(d_val.images, torch.stack([decode(f) for f in readable]))
        assert len(d_train) + len(d_val) == 20 and d_val.dropped + d_train.dropped == 1
        assert d_val.dropped == len(s_val) - len(readable)


def test_a_folder_with_test_but_no_train_is_refused(tmp_path):
    """data/cat, data/dog and data/test/...: the test images would be trained on as a class named "test"."""
    from convmixer.data import DataError, load_dataset
    for c in ("cat", "dog", "test/cat", "test/dog"):
        (tmp_path / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / c / "0.png")
    with pytest.raises(DataError, match="move the class folders into"):
        load_dataset("imagefolder", tmp_path, train=True, progress=False)


def test_the_decode_cache_is_rebuilt_when_the_decoder_changes(tmp_path, monkeypatch):
    from convmixer import data as data_module
    monkeypatch.setenv("CONVMIXER_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data" / "train"
    for c in "ab":
        (root / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / c / "0.png")
    load_dataset("imagefolder", tmp_path / "data", progress=False)
    load_dataset("imagefolder", tmp_path / "data", progress=False)
    assert len(list((tmp_path / "cache").glob("images-*.safetensors"))) == 1  # served from the cache
    monkeypatch.setattr(data_module, "DECODE_VERSION", data_module.DECODE_VERSION + 1)
    load_dataset("imagefolder", tmp_path / "data", progress=False)
    assert len(list((tmp_path / "cache").glob("images-*.safetensors"))) == 2  # not the old decoder's images
