"""Bad values, files and settings, by class (RELIABILITY.md): each gives one line naming the key or
file and the fix, exit code 2, before any training or allocation, and nothing written or lost."""
import gzip
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from convmixer.cli import main
from convmixer.config import TrainConfig, make_config, read_config_file
from convmixer.data import TransformedImages, decode, load_dataset
from convmixer.errors import ConfigError, ConvMixerError, DataError, TrainingError, WeightsError
from convmixer.run import RunInfo, load_model
from convmixer.train import train

TINY = dict(dim=16, depth=2, kernel_size=3, patch_size=2, batch_size=32, randaugment_n=0, progress=False,
            dataset="fashion_mnist", val_split=0, lr=0.01, download=False, amp="off")


def one_line(capsys, code, *words):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("(run with --debug"), err  # the message and the hint
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# --- config values --------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("epochs", "1e400"), ("seed", "1e30"), ("epochs", "1.5"), ("batch_size", str(2 ** 30)), ("dim", "200000"),
    ("img_size", "60000"), ("randaugment_m", "31"), ("val_split", "2.5"), ("lr", "11"), ("opt_eps", "0"),
    ("label_smoothing", "1"), ("warmup_epochs", "30"), ("workers", "-1"), ("depth", "100000"),
    ("muon_momentum", "1"), ("muon_lr", "nan"), ("optimizer", "sgd"),
])
def test_absurd_numbers(key, value, capsys):
    one_line(capsys, main(["train", f"{key}={value}"]), key)


def test_flags_then_words_take_precedence_as_documented(capsys):
    assert main(["train", "--epochs", "2", "epochs=3", "--print-config"]) == 0
    assert "epochs: 3" in capsys.readouterr().out


# --- config files -----------------------------------------------------------------------------------
BAD_FILES = {
    "aliases.yaml": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(  # 9^10 items once expanded
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) +
        "model: [*i, *i, *i, *i, *i, *i, *i, *i, *i]\n",
    "list.yaml": "out: [a, b]\n",
    "int_key.yaml": "1: 2\n",
    "dupe.yaml": "epochs: 3\nepochs: 4\n",
    "nested.yaml": "model:\n  dim: 4\n",
    "dupe.toml": "epochs = 3\nepochs = 4\n",
    "binary.yaml": "\x00\x01\x02\xff",
    "scalar.yaml": "just a string\n",
    "tag.yaml": "lr: !!python/object/apply:os.system [echo pwned]\n",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_config_files(tmp_path, name, capsys):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name].encode("latin1"))
    start = time.time()
    one_line(capsys, main(["train", "--config", str(path), "--out", str(tmp_path / "run")]), name)
    assert time.time() - start < 10 and not (tmp_path / "run").exists()


def test_oversized_config_file(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="big.yaml is .* bytes"):
        read_config_file(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([f.name for f in TrainConfig.__dataclass_fields__.values()] + ["epochz", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                       st.integers(), max_size=2)),
                       max_size=6))
def test_property_config_values_give_a_config_or_one_line(values):
    try:
        cfg = make_config(None, values)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert isinstance(cfg, TrainConfig)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_property_yaml_text_gives_a_mapping_or_one_line(text):
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        try:
            data = read_config_file(f.name)
        except ConfigError as e:
            assert "\n" not in str(e)
            return
        assert isinstance(data, dict)
        try:
            make_config(f.name, {})
        except ConfigError as e:
            assert "\n" not in str(e)
    finally:
        os.unlink(f.name)


# --- data files ----------------------------------------------------------------------------------
def _write_idx(path, header: bytes, body: bytes):
    with gzip.open(path, "wb") as f:
        f.write(header + body)


def test_idx_with_impossible_header_or_labels(fashion_dir):
    raw = fashion_dir / "FashionMNIST" / "raw"
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", struct.pack(">BBBB", 0, 0, 8, 1) + struct.pack(">I", 200),
               bytes([0, 1, 200] + [3] * 197))
    with pytest.raises(DataError, match="labels 0..200 but there are 10 classes"):
        load_dataset("fashion_mnist", fashion_dir, train=False)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", *[2 ** 32 - 1] * 3),
               b"\0" * 100)
    with pytest.raises(DataError, match="t10k-images.*promises .* bytes.*corrupt"):  # 8e28 bytes: refused unread
        load_dataset("fashion_mnist", fashion_dir, train=False)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", 2, 2, 2),
               b"\0" * 9)  # longer than its header says
    with pytest.raises(DataError, match="t10k-images.*25\\+ bytes but its header promises 24"):
        load_dataset("fashion_mnist", fashion_dir, train=False)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", struct.pack(">BBBB", 0, 0, 8, 0), b"")
    with pytest.raises(DataError, match="impossible IDX header"):
        load_dataset("fashion_mnist", fashion_dir, train=False)


def test_mnist_is_never_read_from_fashion_mnist_files(fashion_dir, tmp_path):
    import shutil
    shared = tmp_path / "shared"  # ../shared/data's layout: fashion-mnist/<the IDX files>
    shutil.copytree(fashion_dir / "FashionMNIST" / "raw", shared / "fashion-mnist")
    assert len(load_dataset("fashion_mnist", shared, download=False)) == 600
    for root in (shared, shared / "fashion-mnist"):  # the two sets share file names
        with pytest.raises(DataError, match="mnist IDX files not found"):
            load_dataset("mnist", root, download=False)
    assert len(load_dataset("fashion_mnist", shared / "fashion-mnist", download=False)) == 600
    shutil.copytree(shared / "fashion-mnist", tmp_path / "mnist")  # a folder named after MNIST holds MNIST
    with pytest.raises(DataError, match="fashion_mnist IDX files not found"):
        load_dataset("fashion_mnist", tmp_path / "mnist", download=False)
    assert len(load_dataset("mnist", tmp_path / "mnist", download=False)) == 600


def test_cifar100_meta_that_is_damaged(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batch = {"data": np.zeros((4, 3072), dtype=np.uint8), "fine_labels": [0, 1, 2, 3]}
    pickle.dump(batch, open(folder / "train", "wb"))
    for meta in (b"\x80\x04garbage", pickle.dumps({"coarse_label_names": ["x"]}), pickle.dumps(TrainConfig())):
        (folder / "meta").write_bytes(meta)
        with pytest.raises(DataError, match="meta is not CIFAR-100's class list.*download CIFAR-100 again"):
            load_dataset("cifar100", tmp_path, download=False)
    (folder / "meta").unlink()
    with pytest.raises(DataError, match="missing CIFAR file .*meta"):
        load_dataset("cifar100", tmp_path, download=False)


def test_photos_are_read_upright_by_their_exif_orientation(tmp_path):
    img = Image.new("RGB", (6, 2), (200, 0, 0))
    img.putpixel((0, 0), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees clockwise, as a phone writes it
    img.save(tmp_path / "phone.png", exif=exif)
    assert decode(str(tmp_path / "phone.png")).shape == (3, 6, 2)  # it was read as stored: 2 x 6
    pixels = decode(str(tmp_path / "phone.png"))
    assert pixels[2, 0, -1] > 150 and pixels[0, 0, -1] < 100  # the blue corner is now top right
    exif[0x0112] = 77  # not an orientation: the pixels as stored
    img.save(tmp_path / "odd.png", exif=exif)
    assert decode(str(tmp_path / "odd.png")).shape == (3, 2, 6)


def test_cifar_labels_out_of_range(cifar_dir):
    path = cifar_dir / "cifar-10-batches-py" / "test_batch"
    entry = pickle.load(open(path, "rb"))
    entry["labels"][5] = 12
    pickle.dump(entry, open(path, "wb"))
    with pytest.raises(DataError, match="labels 0..12 but there are 10 classes"):
        load_dataset("cifar10", cifar_dir, train=False)


def _folder(root, n=8, size=8):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shade = (37 * i) % 100 + (0 if c == "a" else 155)  # class a dark, class b bright
            Image.fromarray(np.full((size, size, 3), shade, np.uint8)).save(
                root / c / f"{i}.png")
    return root


def test_a_folder_is_decoded_only_when_its_images_share_one_size(tmp_path, monkeypatch, capsys):
    root = _folder(tmp_path / "data", n=4, size=8)
    Image.new("RGB", (12, 10)).save(root / "b" / "9.png")  # sorts last: the first image alone decided
    data = load_dataset("imagefolder", root, img_size=8, progress=False)
    assert data.images is None and len(data.files) == 9  # streamed (it was decoded, with 9.png squashed to 8 x 8)
    assert "streaming the images from disk" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"9.png is \(10, 12\).*pass --img-size"):
        load_dataset("imagefolder", root, progress=False)
    (root / "b" / "9.png").unlink()
    assert load_dataset("imagefolder", root, progress=False).images.shape == (8, 3, 8, 8)
    monkeypatch.setattr("convmixer.data.cache_budget", lambda: 8 * 3 * 8 * 8 - 1)  # one byte short: streamed
    assert load_dataset("imagefolder", root, progress=False).images is None
    monkeypatch.undo()
    from convmixer.train import _native_size
    wide = _folder(tmp_path / "wide", n=2, size=8)
    for f in wide.rglob("*.png"):
        Image.new("RGB", (12, 8)).save(f)  # same-size 12 x 8 images: decoded, or streamed with --cache false
    decoded, streamed = (load_dataset("imagefolder", wide, cache=c, progress=False) for c in (True, False))
    assert decoded.images is not None and streamed.images is None
    assert _native_size(decoded, False) == _native_size(streamed, False) == 224  # was 12 decoded, 224 streamed


def test_the_cache_of_decoded_images_remembers_skip_bad_images(tmp_path):
    root = _folder(tmp_path / "data", n=4, size=8)
    (root / "a" / "bad.png").write_bytes(b"not a png")
    assert len(load_dataset("imagefolder", root, skip_bad_images=True, progress=False)) == 8
    with pytest.raises(DataError, match="bad.png"):  # it was served from that cache, without bad.png
        load_dataset("imagefolder", root, progress=False)


@pytest.mark.parametrize("kind", ["fifo", "dangling", "loop", "directory"])
def test_entries_that_are_not_regular_files(tmp_path, kind):
    root = _folder(tmp_path / "data")
    odd = root / "b" / "zz.jpg"
    if kind == "fifo":
        os.mkfifo(odd)
    elif kind == "dangling":
        odd.symlink_to(tmp_path / "gone.jpg")
    elif kind == "loop":
        odd.symlink_to(odd)
    else:
        odd.mkdir()
    start = time.time()
    if kind == "directory":  # a folder named like an image is just a folder
        assert len(load_dataset("imagefolder", root, cache=False)) == 16
        return
    with pytest.raises(DataError, match="zz.jpg is not a regular file.*--skip-bad-images"):
        load_dataset("imagefolder", root, cache=False)
    assert len(load_dataset("imagefolder", root, cache=False, skip_bad_images=True)) == 16
    assert time.time() - start < 10  # a FIFO is never opened: nothing hangs


def test_skip_bad_images_keeps_each_images_own_label(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "a" / "0.png").write_bytes(b"not a png")  # the first image is corrupt
    data = load_dataset("imagefolder", root, cache=False, skip_bad_images=True)
    dataset = TransformedImages(data, lambda x: x, skip_bad_images=True)
    for i in range(len(data)):
        img, label = dataset[i]
        assert label == (0 if img[0, 0, 0] < 128 else 1)  # class a is dark, class b bright


def test_float_tiff_is_scaled_not_black(tmp_path):
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(a, mode="F").save(tmp_path / "f.tiff")
    img = decode(str(tmp_path / "f.tiff"))
    assert img.dtype == torch.uint8 and img.max() == 255 and img.min() == 0
    b = np.full((8, 8), np.nan, dtype=np.float32)
    Image.fromarray(b, mode="F").save(tmp_path / "nan.tiff")
    with pytest.raises(DataError, match="nan.tiff.*NaN"):
        decode(str(tmp_path / "nan.tiff"))


def test_worker_errors_are_one_line(tmp_path, capsys):
    root = _folder(tmp_path / "data" / "train", n=20)
    _folder(tmp_path / "data" / "val", n=4)
    good = (root / "a" / "3.png").read_bytes()
    (root / "a" / "3.png").write_bytes(good[: len(good) // 2])  # truncated
    code = main(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--cache", "false",
                 "--workers", "1", "--batch-size", "8", "--dim", "8", "--depth", "1", "--patch-size", "2",
                 "--epochs", "1", "--progress", "false", "--out", str(tmp_path / "run"), "--val-split", "0"])
    one_line(capsys, code, "3.png")
    # the workers are gone now, not at some garbage collection: they ignore SIGTERM, so a process
    # exiting with one alive would wait for it forever
    import multiprocessing
    assert multiprocessing.active_children() == []


def test_cache_on_and_off_give_the_same_batches(tmp_path):
    root = _folder(tmp_path / "data", n=6, size=12)
    cached = load_dataset("imagefolder", root, img_size=12)
    streamed = load_dataset("imagefolder", root, img_size=12, cache=False)
    assert cached.images is not None and streamed.images is None
    from convmixer.data import eval_batches, eval_transform
    transform = eval_transform(12, 0.5, [0.5] * 3, [0.25] * 3)  # crop_pct applies on both paths
    a = next(eval_batches(cached, 12, transform))
    b = next(eval_batches(streamed, 12, transform))
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    from convmixer.train import _native_size
    assert _native_size(cached, False) == _native_size(streamed, False) == 12  # not 224 when streamed


# --- archives ----------------------------------------------------------------------------------------
def _jpeg_tarball(path, shade):
    src = path.parent / f"src_{shade}"
    for c in ("airplane", "automobile"):
        d = src / "cifar10-jpg" / "train" / c
        d.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (shade, shade, shade)).save(d / f"{i}.jpg")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / "cifar10-jpg", arcname="cifar10-jpg")


def test_a_replaced_archive_is_unpacked_again(tmp_path):
    a, b = tmp_path / "A" / "cifar10-jpg-train.tar.gz", tmp_path / "B" / "cifar10-jpg-train.tar.gz"
    _jpeg_tarball(a, 10)
    _jpeg_tarball(b, 240)
    assert load_dataset("cifar10", a.parent).images.float().mean() < 50
    assert load_dataset("cifar10", b.parent).images.float().mean() > 200


def test_an_unpacking_interrupted_midway_is_never_taken_for_complete(tmp_path, monkeypatch):
    path = tmp_path / "d" / "cifar10-jpg-train.tar.gz"
    _jpeg_tarball(path, 100)
    real = tarfile.TarFile.extractall

    def interrupted(self, target, *args, **kwargs):
        real(self, target, *args, **kwargs)  # everything written, then Ctrl-C before the rename
        raise KeyboardInterrupt
    monkeypatch.setattr(tarfile.TarFile, "extractall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("cifar10", path.parent)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []  # no folder under its final name
    monkeypatch.undo()
    assert len(load_dataset("cifar10", path.parent)) == 6  # unpacked again, whole


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_archive_names_the_file(tmp_path, damage):
    path = tmp_path / "d" / "cifar10-jpg-train.tar.gz"
    _jpeg_tarball(path, 100)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(2000), "empty": b""}[damage])
    with pytest.raises(DataError, match=r"cifar10-jpg-train.tar.gz cannot be unpacked") as info:
        load_dataset("cifar10", path.parent)
    assert "\n" not in str(info.value)


def test_an_archive_that_would_unpack_beyond_bounds_is_refused_before_writing(tmp_path, monkeypatch):
    import io

    from convmixer import data as data_module
    path = tmp_path / "d" / "cifar10-jpg-train.tar.gz"
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tar:  # 8 MB of zeros in a few KB: a decompression bomb in miniature
        info = tarfile.TarInfo("cifar10-jpg/train/airplane/0.jpg")
        info.size = 8 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    monkeypatch.setattr(data_module, "ARCHIVE_SLACK", 0)
    with pytest.raises(DataError, match="would unpack to over 0.0 GiB or 1 entries"):
        load_dataset("cifar10", path.parent)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing written


def test_cache_folder_that_is_a_file(tmp_path, monkeypatch, folder_dir):
    (tmp_path / "cachefile").write_text("")
    monkeypatch.setenv("CONVMIXER_CACHE", str(tmp_path / "cachefile"))
    with pytest.raises(DataError, match="cache folder .* is a file"):
        load_dataset("imagefolder", folder_dir, img_size=32)


def test_yaml_words_off_on_yes_no_are_read_as_written(tmp_path):
    (tmp_path / "c.yaml").write_text("amp: off\ntta_flip: on\ncache: no\nprogress: yes\npretrained: false\n")
    cfg = make_config(tmp_path / "c.yaml")  # amp: off was refused as amp='False'
    assert (cfg.amp, cfg.tta_flip, cfg.cache, cfg.progress, cfg.pretrained) == ("off", True, False, True, None)
    (tmp_path / "d.yaml").write_text("activation: no\n")
    with pytest.raises(ConfigError, match="activation='no' is not one of"):
        make_config(tmp_path / "d.yaml")


def test_a_home_relative_data_dir_finds_its_val_folder(tmp_path, monkeypatch):
    from convmixer.train import resolve_val_split
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine" / "val" / "a").mkdir(parents=True)
    (tmp_path / "c.yaml").write_text("dataset: imagefolder\ndata_dir: ~/mine\nout: ~/runs/x\n")
    cfg = make_config(tmp_path / "c.yaml")  # the val/ folder was missed and 10% of train/ carved instead
    assert (cfg.data_dir, cfg.out) == (str(tmp_path / "mine"), str(tmp_path / "runs" / "x"))
    assert resolve_val_split(cfg).val_split == 0
    assert resolve_val_split(TrainConfig(dataset="imagefolder", data_dir="~/mine")).val_split == 0


def test_cache_clear_deletes_only_what_the_cache_made(tmp_path, monkeypatch, capsys):
    work = tmp_path / "project"
    (work / ".git").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "photo-0123456789abcdef.jpg").write_text("mine too")  # named like an unpacked archive, but a file
    monkeypatch.chdir(work)
    monkeypatch.setenv("CONVMIXER_CACHE", "")  # an unset variable expanded: it was the current folder
    one_line(capsys, main(["cache", "--clear"]), "CONVMIXER_CACHE is set but empty")
    monkeypatch.setenv("CONVMIXER_CACHE", str(work))  # a folder that is not only the cache
    ours = [work / "images-0123456789abcdef0123.safetensors", work / ".images-0123456789abcdef0123.safetensors.a1_b.tmp",
            work / "cifar10-jpg-train-0123456789abcdef"]
    for path in ours[:2]:
        path.write_bytes(b"x")
    (ours[2] / "train").mkdir(parents=True)
    assert main(["cache", "--clear"]) == 0
    assert not any(p.exists() for p in ours)
    assert sorted(p.name for p in work.iterdir()) == [".git", "notes.txt", "photo-0123456789abcdef.jpg"]


# --- weights and metadata --------------------------------------------------------------------------
def _weights(tmp_path, **meta_changes):
    import convmixer
    from convmixer.run import RunInfo
    model = convmixer.create_model("convmixer_256_8", dim=8, depth=2, num_classes=3)
    info = RunInfo(model_args=dict(model.model_args), classes=["a", "b", "c"], mean=[0.5] * 3, std=[0.2] * 3,
                   img_size=16, crop_pct=1.0)
    meta = info.to_metadata()
    for k, v in meta_changes.items():
        if k.startswith("args_"):
            args = json.loads(meta["model_args"])
            args[k[5:]] = v
            meta["model_args"] = json.dumps(args)
        else:
            meta[k] = v
    path = tmp_path / "w.safetensors"
    convmixer.save_weights(model, path, meta)
    return path


@pytest.mark.parametrize("changes,words", [
    (dict(args_depth=2_000_000), "depth=2000000 is outside"), (dict(args_dim=200_000), "dim=200000 is outside"),
    (dict(img_size="60000"), "img_size=60000 is outside"), (dict(classes='["a"]'), "names 1 classes for a 3-class"),
    (dict(args_depth=3), "depth=3 but the tensors say 2"), (dict(model_args="[1, 2]"), "model_args must be a mapping"),
    (dict(mean="{"), "malformed metadata"), (dict(std="[0, 0, 0]"), "std > 0"), (dict(args_dim="x"), "dim='x'"),
    (dict(args_act_layer=5), "bad values for act_layer"), (dict(args_activation="gelu"), "unknown keys activation"),
])
def test_bad_metadata_is_refused_before_building(tmp_path, changes, words):
    path = _weights(tmp_path, **changes)
    start = time.time()
    with pytest.raises(WeightsError, match=None) as info:
        load_model(path)
    assert words in str(info.value) and time.time() - start < 5


def test_integer_tensors_are_refused(tmp_path):
    import convmixer
    model = convmixer.create_model("convmixer_256_8", dim=8, depth=2, num_classes=3)
    state = {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "int.pth")
    with pytest.raises(WeightsError, match="wrong dtype"):
        convmixer.load_weights(model, tmp_path / "int.pth")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["model_args", "classes", "mean", "std", "img_size", "crop_pct", "config",
                                        "model_name", "dataset"]),
                       st.one_of(st.text(max_size=20), st.integers(-5, 10 ** 7).map(str),
                                 st.lists(st.integers(-3, 10 ** 6), max_size=4).map(json.dumps),
                                 st.dictionaries(st.sampled_from(["dim", "depth", "kernel_size", "patch_size",
                                                                  "num_classes", "in_chans", "act_layer"]),
                                                 st.one_of(st.integers(-2, 10 ** 7), st.text(max_size=4)),
                                                 max_size=7).map(json.dumps)), max_size=9))
def test_property_metadata_gives_a_model_or_one_line(tmp_path, meta):
    import convmixer
    model = convmixer.create_model("convmixer_256_8", dim=8, depth=2, num_classes=3)
    path = tmp_path / "p.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    try:
        loaded, info = load_model(path)
    except WeightsError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(info, RunInfo)


# --- checkpoints ---------------------------------------------------------------------------------------
def test_checkpoint_without_a_section_cannot_resume_but_still_evaluates(tmp_path, fashion_dir, capsys):
    train(make_config(None, {**TINY, "data_dir": str(fashion_dir), "out": str(tmp_path / "run"), "epochs": 1}))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    one_line(capsys, main(["train", "--resume", str(tmp_path / "run" / "last.pt")]), "lacks optimizer", "--pretrained")
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--json"]) == 0


def test_resume_on_data_with_other_classes(tmp_path, fashion_dir, cifar_dir, folder_dir):
    out = tmp_path / "run"
    base = {**TINY, "dataset": "imagefolder", "data_dir": str(folder_dir), "img_size": 32, "out": str(out)}
    train(make_config(None, {**base, "epochs": 1}))
    other = tmp_path / "other"
    _folder(other / "train", n=40, size=32)
    _folder(other / "test", n=4, size=32)
    with pytest.raises(TrainingError, match="has 2 classes .* but this run trained on 4"):
        train(make_config(None, {**base, "epochs": 2, "data_dir": str(other)}), resume=out / "last.pt")


# --- output paths ---------------------------------------------------------------------------------------
def test_unwritable_output_paths(tmp_path, fashion_dir, capsys):
    (tmp_path / "afile").write_text("")
    args = ["--dataset", "fashion_mnist", "--data-dir", str(fashion_dir), "--val-split", "0", "--epochs", "1",
            "--dim", "8", "--depth", "1", "--batch-size", "32", "--progress", "false"]
    one_line(capsys, main(["train", *args, "--out", str(tmp_path / "afile")]), "is a file")
    one_line(capsys, main(["train", *args, "--out", str(tmp_path / "afile" / "sub")]), "afile")
    assert main(["train", *args, "--out", str(tmp_path / "ok")]) == 0
    w = str(tmp_path / "ok" / "model.safetensors")
    one_line(capsys, main(["export", "--checkpoint", w, "--format", "onnx", "--out", str(tmp_path)]), "is a folder")
    one_line(capsys, main(["export", "--checkpoint", w, "--format", "torchscript", "--out",
                           str(tmp_path / "afile" / "m.pt")]), "afile")
    one_line(capsys, main(["viz", "--checkpoint", w, "--out", str(tmp_path / "afile")]), "afile")


# --- command arguments ------------------------------------------------------------------------------
def test_bad_command_arguments(tmp_path, fashion_dir, capsys):
    train(make_config(None, {**TINY, "data_dir": str(fashion_dir), "out": str(tmp_path / "run"), "epochs": 1}))
    w = str(tmp_path / "run" / "model.safetensors")
    Image.new("L", (28, 28)).save(tmp_path / "x.png")
    one_line(capsys, main(["eval", "--checkpoint", w, "--batch-size", "0"]), "--batch-size 0")
    one_line(capsys, main(["predict", "--checkpoint", w, "--top-k", "0", str(tmp_path / "x.png")]), "top-k")
    one_line(capsys, main(["predict", "--checkpoint", w, "--top-k", "-1", str(tmp_path / "x.png")]), "top-k")
    if not torch.cuda.is_available():
        one_line(capsys, main(["eval", "--checkpoint", w, "--device", "cuda"]), "--device cuda")
    one_line(capsys, main(["eval", "--checkpoint", w, "--device", "potato"]), "potato")
    one_line(capsys, main(["bench", "--model", "convmixer_999"]), "unknown model")
    one_line(capsys, main(["viz", "--checkpoint", w, "--out", str(tmp_path / "v"), "--layers", "9"]), "--layers")
    one_line(capsys, main(["summary", "--img-size", "100000"]), "--img-size 100000")
    one_line(capsys, main(["summary", "--img-size", "4096", "--batch-size", "4096"]), "GiB")
    one_line(capsys, main(["bench", "--img-size", "2048", "--batch-size", "4096"]), "GiB")
    one_line(capsys, main(["bench", "--batch-size", "0"]), "--batch-size 0")
    one_line(capsys, main(["bench", "--batch-size", "65536"]), "GiB of activations", "lower --batch-size")
    one_line(capsys, main(["bench", "--device", "potato"]), "potato")
    if not torch.cuda.is_available():
        one_line(capsys, main(["bench", "--device", "cuda"]), "--device cuda")
    one_line(capsys, main(["export", "--checkpoint", w, "--out", str(tmp_path / "m.onnx"), "--img-size", "1"]), "--img-size 1")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "dir.png").mkdir()
    for name in ("pipe.png", "dir.png", "missing.png"):  # never opened, so nothing hangs
        one_line(capsys, main(["predict", "--checkpoint", w, str(tmp_path / name)]), name)


def test_ablate_reruns_a_half_written_cell(tmp_path, fashion_dir, capsys):
    from convmixer.ablate import parse_grid, run_grid
    fixed = {k: str(v) for k, v in {**TINY, "data_dir": str(fashion_dir), "epochs": 1, "subset": 200,
                                    "val_split": 50}.items()}
    grid = parse_grid(["kernel_size=3"])
    run_grid(None, grid, tmp_path / "abl", fixed, full=True)
    cell = next((tmp_path / "abl" / "cells").iterdir()) / "cell.json"
    cell.write_text('{"val_top1": 0.')  # cut short
    capsys.readouterr()
    results = run_grid(None, grid, tmp_path / "abl", fixed, full=True)
    assert len(results) == 1 and json.loads(cell.read_text())["val_top1"] == results[0]["val_top1"]


# --- signals ----------------------------------------------------------------------------------------------
STUCK_IN_EVALUATION = """
import sys, time, pathlib
import convmixer.train as t
real = t.evaluate
def slow(*a, **k):
    pathlib.Path(sys.argv[1]).write_text("evaluating")
    time.sleep(120)  # stands for anything slow that cannot notice a flag
    return real(*a, **k)
t.evaluate = slow
from convmixer.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_second_signal_stops_at_once(tmp_path, fashion_dir):
    marker = tmp_path / "marker"
    args = ["train", "--dataset", "fashion_mnist", "--data-dir", str(fashion_dir), "--val-split", "0", "--epochs",
            "3", "--batch-size", "32", "--dim", "16", "--depth", "2", "--progress", "false", "--out",
            str(tmp_path / "run")]
    proc = subprocess.Popen([sys.executable, "-c", STUCK_IN_EVALUATION, str(marker), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # noted: it would stop after the evaluation
    time.sleep(0.5)
    start = time.time()
    proc.send_signal(signal.SIGINT)  # the second one stops it now
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - start < 10, err
    assert "send it again to stop at once" in err


def test_user_errors_share_one_base():
    for cls in (ConfigError, DataError, WeightsError, TrainingError):
        assert issubclass(cls, ConvMixerError)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000), suffix=st.sampled_from([".pth", ".pth.tar", ".safetensors", ".pt"]),
       prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x08\x00\x00\x00\x00\x00\x00\x00{"]))
def test_property_weights_reader_gives_tensors_or_one_line(tmp_path, data, suffix, prefix):
    """Random bytes (with the magic numbers of zip, pickle and safetensors in front) as a weights file."""
    from convmixer.weights import read_state_dict
    path = tmp_path / f"w{suffix}"
    path.write_bytes(prefix + data)
    try:
        state = read_state_dict(path)
    except WeightsError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(state, dict)


# --- evaluation inputs and output files ------------------------------------------------------------------
def _run_on_folder(tmp_path, capsys):
    """A tiny model trained on 8x8 images of classes a and b, and a folder of the same classes at other sizes
    (so it is read from files, not decoded once) with one corrupt image."""
    _folder(tmp_path / "data" / "train")
    _folder(tmp_path / "data" / "test", n=4)
    train(make_config(None, {**TINY, "dataset": "imagefolder", "data_dir": str(tmp_path / "data"), "img_size": 8,
                             "epochs": 1, "batch_size": 8, "out": str(tmp_path / "run")}))
    other = tmp_path / "other" / "test"
    for c in ("a", "b"):
        (other / c).mkdir(parents=True)
        for i, size in enumerate(((12, 9), (5, 16), (30, 30))):
            Image.fromarray(np.full((size[1], size[0], 3), 20 if c == "a" else 230, np.uint8)).save(other / c / f"{i}.png")
    (other / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    capsys.readouterr()
    return str(tmp_path / "run" / "model.safetensors"), str(tmp_path / "other")


def test_eval_leaves_out_unreadable_files_and_keeps_stdout_json(tmp_path, capsys):
    w, other = _run_on_folder(tmp_path, capsys)
    args = ["eval", "--checkpoint", w, "--dataset", "imagefolder", "--data-dir", other, "--split", "test", "--json"]
    one_line(capsys, main(args), "bad.png")  # stops at the corrupt file without the flag
    assert main(args + ["--skip-bad-images", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is the JSON alone; the notice goes to stderr
    assert result["n"] == 6 and result["skipped"] == 1 and "left out 1" in captured.err
    same = tmp_path / "same" / "test"  # one size: decoded into memory (and cached), the bad file dropped there
    for c in ("a", "b"):
        (same / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 20 if c == "a" else 230, np.uint8)).save(same / c / f"{i}.png")
    (same / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    args = ["eval", "--checkpoint", w, "--dataset", "imagefolder", "--data-dir", str(same.parent), "--split", "test",
            "--json", "--skip-bad-images"]
    for _ in range(2):  # decoded, then served from the cache
        assert main(args) == 0
        captured = capsys.readouterr()
        result = json.loads(captured.out)
        assert result["n"] == 6 and result["skipped"] == 1 and "bad.png" in captured.err


def test_eval_and_viz_arguments_checked_before_any_work(tmp_path, capsys):
    w, other = _run_on_folder(tmp_path, capsys)
    for value in ("nan", "inf", "-1", "1.5", "1e9"):
        one_line(capsys, main(["eval", "--checkpoint", w, "--split", "val", "--val-split", value]), "--val-split")
    one_line(capsys, main(["eval", "--checkpoint", w, "--batch-size", "100000"]), "--batch-size")
    one_line(capsys, main(["eval", "--checkpoint", w, "--workers", "-1"]), "--workers")
    one_line(capsys, main(["eval", "--checkpoint", w, "--confusion-png", str(tmp_path / "m.txt")]), "m.txt", ".png")
    (tmp_path / "c.png").mkdir()
    one_line(capsys, main(["eval", "--checkpoint", w, "--confusion-png", str(tmp_path / "c.png")]), "is a folder")
    for layers in ("1,x", "1,,2", "one"):
        one_line(capsys, main(["viz", "--checkpoint", w, "--out", str(tmp_path / "v"), "--layers", layers]), "--layers")
    assert not (tmp_path / "v" / "patch_filters.png").exists()  # refused before anything was drawn


def test_many_classes_confusion_png(tmp_path):
    from convmixer.viz import plot_confusion
    n = 1000  # ImageNet: a bounded picture, cells without names
    plot_confusion(np.eye(n, dtype=int).tolist(), [f"c{i}" for i in range(n)], tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size[0] < 4000


def test_long_thin_images_are_bounded_at_evaluation():
    from convmixer.data import eval_transform
    transform = eval_transform(32, 1.0, (0.5,) * 3, (0.5,) * 3)
    start = time.time()
    for shape in ((3, 1, 200_000), (3, 200_000, 1), (3, 3, 5000)):  # would become 32 x 6.4M pixels unbounded
        assert transform(torch.zeros(shape, dtype=torch.uint8)).shape == (3, 32, 32)
    assert time.time() - start < 10
    from torchvision.transforms import v2
    unbounded = v2.Compose(transform.transforms[1:])  # the same steps without crop_long_side
    wide = torch.randint(0, 256, (3, 20, 400), dtype=torch.uint8)  # 20:1: the bound changes nothing visible
    assert (transform(wide) - unbounded(wide)).abs().max() < 0.05


def test_outputs_are_never_replaced_by_accident(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    w, other = _run_on_folder(tmp_path, capsys)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    one_line(capsys, main(["export", "--checkpoint", w, "--format", "onnx", "--out", w]), ".onnx")  # wrong suffix
    one_line(capsys, main(["export", "--checkpoint", w, "--format", "safetensors", "--out", w]), "exists", "--overwrite")
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    target = str(tmp_path / "m.onnx")
    assert main(["export", "--checkpoint", w, "--out", target]) == 0
    one_line(capsys, main(["export", "--checkpoint", w, "--out", target]), "exists")
    assert main(["export", "--checkpoint", w, "--out", target, "--overwrite"]) == 0
    image = str(tmp_path / "other" / "test" / "a" / "0.png")
    assert main(["embed", "--checkpoint", w, image, "--out", str(tmp_path / "e.NPZ")]) == 0
    assert np.load(tmp_path / "e.NPZ")["embeddings"].shape == (1, 16)
    one_line(capsys, main(["embed", "--checkpoint", w, image, "--out", str(tmp_path / "e.NPZ")]), "exists")
    (tmp_path / "d.npz").mkdir()
    one_line(capsys, main(["embed", "--checkpoint", w, image, "--out", str(tmp_path / "d.npz")]), "is a folder")
    one_line(capsys, main(["embed", "--checkpoint", w, image, "--out", str(tmp_path / "e.txt")]), ".npz")


def test_pictures_and_unwritable_places_are_checked_before_any_work(tmp_path, capsys):
    w, other = _run_on_folder(tmp_path, capsys)
    png = tmp_path / "c.png"
    png.write_bytes(b"the user's picture")
    base = ["eval", "--checkpoint", w, "--dataset", "imagefolder", "--data-dir", other, "--split", "test",
            "--skip-bad-images"]
    one_line(capsys, main(base + ["--confusion-png", str(png)]), "exists", "--overwrite")
    assert png.read_bytes() == b"the user's picture"
    assert main(base + ["--confusion-png", str(png), "--overwrite"]) == 0 and Image.open(png).size
    figs = tmp_path / "figs"
    assert main(["viz", "--checkpoint", str(tmp_path / "run"), "--out", str(figs)]) == 0
    capsys.readouterr()
    assert (figs / "curves.png").is_file()  # the run folder's own curves (it looked one folder too high)
    one_line(capsys, main(["viz", "--checkpoint", w, "--out", str(figs)]), "exists", "--overwrite")
    one_line(capsys, main(["viz", "--runs", str(tmp_path / "run"), "--confusion", "--out", str(figs)]), "--checkpoint")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # (root may write anywhere)
            one_line(capsys, main(["embed", "--checkpoint", w, other, "--out", str(locked / "sub" / "e.npz")]),
                     "cannot write in", str(locked))
    finally:
        locked.chmod(0o700)


def test_predict_takes_folders_skips_bad_files_and_refuses_models_it_cannot_feed(tmp_path, capsys):
    from convmixer import ConvMixer, save_weights
    w, other = _run_on_folder(tmp_path, capsys)
    one_line(capsys, main(["predict", "--checkpoint", w, other]), "bad.png", "--skip-bad-images")
    assert main(["predict", "--checkpoint", w, other, "--skip-bad-images", "--json"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert len(results) == 7 and sum("error" in r for r in results) == 1 and "skipped 1" in captured.err
    assert all(len(r["top"]) == 2 for r in results if "error" not in r)
    image = str(tmp_path / "other" / "test" / "a" / "0.png")
    for kwargs, words in ((dict(num_classes=0), ("no classifier", "embed")), (dict(in_chans=4), ("4-channel",))):
        save_weights(ConvMixer(8, 1, kernel_size=3, patch_size=2, **kwargs), tmp_path / "odd.safetensors")
        one_line(capsys, main(["predict", "--checkpoint", str(tmp_path / "odd.safetensors"), image]), *words)
    # bare weights and TorchScript programs: one line that says what to give instead
    torch.save(ConvMixer(8, 1, kernel_size=3, patch_size=2).state_dict(), tmp_path / "bare.pth")
    one_line(capsys, main(["predict", "--checkpoint", str(tmp_path / "bare.pth"), image]), "without their architecture")
    assert main(["export", "--checkpoint", w, "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    capsys.readouterr()
    one_line(capsys, main(["predict", "--checkpoint", str(tmp_path / "m.pt"), image]), "TorchScript")


def test_a_grayscale_model_evaluates_a_folder_of_rgb_images(tmp_path, fashion_dir, capsys):
    import shutil
    mnist = tmp_path / "mnist"
    shutil.copytree(fashion_dir / "FashionMNIST" / "raw", mnist / "MNIST" / "raw")  # the same files, MNIST's names
    train(make_config(None, {**TINY, "dataset": "mnist", "data_dir": str(mnist), "epochs": 1, "subset": 64,
                             "out": str(tmp_path / "run")}))
    capsys.readouterr()
    folder = tmp_path / "digits" / "test"
    for c in map(str, range(10)):  # the run's class names, two RGB images each
        (folder / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((28, 28, 3), 40 * i, np.uint8)).save(folder / c / f"{i}.png")
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--dataset", "imagefolder", "--data-dir",
                 str(folder.parent), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 20
    # a run that carved no validation split has none to evaluate: said, not the test split under its name
    one_line(capsys, main(["eval", "--checkpoint", str(tmp_path / "run"), "--split", "val"]), "--split test")


def test_predict_prints_file_names_that_are_not_utf8(tmp_path, capsys):
    w, other = _run_on_folder(tmp_path, capsys)
    odd = os.path.join(os.fsencode(tmp_path), b"\xff\xfe.png")
    Image.new("RGB", (8, 8)).save(odd)
    assert main(["predict", "--checkpoint", w, os.fsdecode(odd)]) == 0
    assert "\\xff\\xfe.png" in capsys.readouterr().out


def test_ablate_refuses_a_grid_folder_with_other_settings(tmp_path, fashion_dir, capsys):
    from convmixer.ablate import parse_grid, run_grid
    fixed = {k: str(v) for k, v in {**TINY, "data_dir": str(fashion_dir), "epochs": 1, "subset": 200,
                                    "val_split": 50}.items()}
    grid = parse_grid(["kernel_size=3"])
    first = run_grid(None, grid, tmp_path / "abl", fixed, full=True)
    with pytest.raises(ConfigError, match="epochs=1 \\(now 2\\).*another --out"):
        run_grid(None, grid, tmp_path / "abl", {**fixed, "epochs": "2"}, full=True)
    with pytest.raises(ConfigError, match="eval_every=1 \\(now 100\\)"):
        run_grid(None, grid, tmp_path / "abl", fixed)  # the reduced budget is another setting too
    assert run_grid(None, grid, tmp_path / "abl", fixed, full=True) == first  # the same settings: done before
    spelled = {**fixed, "lr": "." + fixed["lr"].split(".", 1)[1]} if fixed["lr"].startswith("0.") else fixed
    assert run_grid(None, grid, tmp_path / "abl", spelled, full=True) == first  # values compared, not strings


def test_ablate_checks_every_cell_before_training_any(tmp_path, fashion_dir, capsys):
    from convmixer.ablate import parse_grid, run_grid
    fixed = {k: str(v) for k, v in {**TINY, "data_dir": str(fashion_dir), "epochs": 1, "subset": 200,
                                    "val_split": 50}.items()}
    with pytest.raises(ConfigError, match="patch_size"):  # the last cell's value is out of range
        run_grid(None, parse_grid(["patch_size=2,100000"]), tmp_path / "abl", fixed, full=True)
    assert not (tmp_path / "abl").exists()  # nothing trained, nothing claimed
    with pytest.raises(ConfigError, match="no_such_config"):  # a typo in --config claims nothing either
        run_grid("no_such_config", parse_grid(["kernel_size=3"]), tmp_path / "abl", fixed, full=True)
    assert run_grid(None, parse_grid(["kernel_size=3"]), tmp_path / "abl", fixed, full=True)  # then it runs


def test_ablate_reports_the_finished_cells_when_a_later_one_fails(tmp_path, fashion_dir, monkeypatch):
    from convmixer import train as train_module
    from convmixer.ablate import parse_grid, run_grid
    fixed = {k: str(v) for k, v in {**TINY, "data_dir": str(fashion_dir), "epochs": 1, "subset": 200,
                                    "val_split": 50}.items()}
    real, calls = train_module.train, []

    def fails_second(cfg, **kw):
        calls.append(cfg)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(cfg, **kw)
    monkeypatch.setattr(train_module, "train", fails_second)
    with pytest.raises(OSError, match="disk full"):
        run_grid(None, parse_grid(["kernel_size=3,5"]), tmp_path / "abl", fixed, full=True)
    assert "kernel_size=3" in (tmp_path / "abl" / "results.md").read_text()


def test_foreign_state_dict_keys_give_one_line():
    from convmixer.weights import checkpoint_filter_fn
    t = torch.zeros(1)
    assert checkpoint_filter_fn({"0.weight": t, "epoch": t})["epoch"] is t  # kept, reported as unexpected later
    with pytest.raises(WeightsError, match="not a parameter name"):
        checkpoint_filter_fn({1: t})


def test_metadata_whose_values_multiply_to_a_huge_model_is_refused_without_building(tmp_path):
    from safetensors.torch import save_file
    from convmixer.run import RunInfo
    args = dict(dim=8192, depth=256, kernel_size=63, patch_size=1, in_chans=1, num_classes=3)  # each in range
    tensors = {"stem.0.weight": torch.zeros(8192, 1, 1, 1), "blocks.0.0.fn.0.weight": torch.zeros(0, 1, 63, 63)}
    tensors.update({f"blocks.{i}.1.weight": torch.zeros(1) for i in range(1, 256)})  # 256 blocks, 33 KB in all
    info = RunInfo(model_args=args, classes=["a", "b", "c"], mean=[0.5], std=[0.2], img_size=16, crop_pct=1.0)
    save_file(tensors, str(tmp_path / "big.safetensors"), metadata=info.to_metadata())
    start = time.time()
    with pytest.raises(WeightsError, match="does not match its tensors"):  # 100 GB of parameters otherwise
        load_model(tmp_path / "big.safetensors")
    with pytest.raises(WeightsError, match="does not match its tensors"):
        train(make_config(None, {**TINY, "data_dir": "unused", "pretrained": str(tmp_path / "big.safetensors"),
                                 "out": str(tmp_path / "run")}))
    assert time.time() - start < 10 and not (tmp_path / "run").exists()


def test_resuming_an_earlier_epoch_checkpoint_never_cuts_the_run(tmp_path, fashion_dir, capsys):
    run = tmp_path / "run"
    train(make_config(None, {**TINY, "data_dir": str(fashion_dir), "out": str(run), "epochs": 3, "save_every": 1}))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="epoch 1 but its run went on to epoch 3.*mkdir") as refused:
        train(resume=run / "epoch_0001.pt", changes={"epochs": 4})
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name in before} == before
    branch = tmp_path / "run_from_epoch_0001"  # what the message says to do
    assert str(branch) in str(refused.value)
    branch.mkdir()
    (branch / "epoch_0001.pt").write_bytes(before["epoch_0001.pt"])
    train(resume=branch / "epoch_0001.pt")
    assert [json.loads(line)["epoch"] for line in (branch / "metrics.jsonl").read_text().splitlines()][-2:] == [2, 3]


def test_train_leaves_the_callers_process_settings(tmp_path, fashion_dir):
    assert not torch.are_deterministic_algorithms_enabled()
    train(make_config(None, {**TINY, "data_dir": str(fashion_dir), "out": str(tmp_path / "run"), "epochs": 1,
                             "deterministic": True}))
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_run_that_fails_to_start_destroys_the_process_group_it_made(tmp_path, fashion_dir, monkeypatch):
    import socket

    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", CONVMIXER_DDP="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="larger than the 600"):  # fails after the group is made
        train(make_config(None, {**TINY, "data_dir": str(fashion_dir), "out": str(tmp_path / "run"),
                                 "batch_size": 1024}))
    assert not dist.is_initialized()  # it was left, and later train() calls took it for the caller's


def test_pretrained_weights_for_another_channel_count_are_adapted_not_dropped():
    import convmixer
    rgb = convmixer.create_model("convmixer_256_8", pretrained="cifar10")
    grey = convmixer.create_model("convmixer_256_8", pretrained="cifar10", in_chans=1)  # refused before
    assert torch.allclose(grey.stem[0].weight, rgb.stem[0].weight.sum(1, keepdim=True))
    grey10 = convmixer.create_model("convmixer_256_8", pretrained="cifar10", in_chans=1, num_classes=4)
    assert torch.allclose(grey10.stem[0].weight, grey.stem[0].weight)  # left random before
    fm = convmixer.create_model("convmixer_256_8", pretrained="fashion_mnist")
    four = convmixer.create_model("convmixer_256_8", pretrained="fashion_mnist", in_chans=4)
    assert torch.allclose(four.stem[0].weight, fm.stem[0].weight.repeat(1, 4, 1, 1) / 4)
    x = torch.rand(2, 1, 28, 28)  # a grey image as 4 equal channels gives the same patch embedding
    assert torch.allclose(four.stem[0](x.repeat(1, 4, 1, 1)), fm.stem[0](x), atol=1e-5)


def test_viz_keeps_runs_of_the_same_name_apart(tmp_path, monkeypatch, capsys):
    import convmixer.viz as viz
    line = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "lr": 0.01}
    for parent in ("a", "b"):
        (tmp_path / parent / "x").mkdir(parents=True)
        (tmp_path / parent / "x" / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    drawn = {}
    monkeypatch.setattr(viz, "plot_curves", lambda runs, path: drawn.update(runs))
    runs = [str(tmp_path / "a" / "x"), str(tmp_path / "b" / "x")]
    assert main(["viz", "--out", str(tmp_path / "v"), "--runs", *runs]) == 0
    assert sorted(drawn) == runs  # both drawn (one replaced the other before), named by their paths


def test_an_image_over_pillows_pixel_guard_is_one_line(tmp_path, monkeypatch):
    from PIL import Image as PILImage
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 4,096 pixels: over twice the guard, an error
    with pytest.raises(DataError, match="big.png.*downscale it first"):
        decode(str(tmp_path / "big.png"))


def test_config_file_keys_spelled_twice_and_syntax_errors_say_where(tmp_path, capsys):
    for name, text in (("c.yaml", "batch-size: 64\nbatch_size: 128\n"), ("c.toml", "batch-size = 64\nbatch_size = 128\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match="sets batch_size more than once"):
            read_config_file(tmp_path / name)
    (tmp_path / "tab.yaml").write_text("epochs: 3\nlr 0.05\nmodel: x\n")  # a missing colon
    with pytest.raises(ConfigError, match="line [23], column"):
        read_config_file(tmp_path / "tab.yaml")
    (tmp_path / "many.yaml").write_text("".join(f"k{i}: {i}\n" for i in range(60_000)))  # one pass, not n^2
    start = time.time()
    with pytest.raises(ConfigError):
        make_config(tmp_path / "many.yaml")
    assert time.time() - start < 30
