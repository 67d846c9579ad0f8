"""Faults and bad input: nothing lost, one clear line each (see RELIABILITY.md)."""
import errno
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from convmixer.cli import main
from convmixer.config import ConfigError, make_config
from convmixer.data import DataError, load_dataset
from convmixer.train import TrainingError, load_checkpoint, train
from convmixer.weights import atomic_write

TINY = dict(dim=16, depth=2, kernel_size=3, patch_size=2, batch_size=32, randaugment_n=0, progress=False,
            dataset="fashion_mnist", val_split=0, lr=0.01, download=False)


def cfg(tmp_path, data_dir, **kw):
    return make_config(None, {**TINY, "data_dir": str(data_dir), "out": str(tmp_path / "run"), **kw})


def test_oserror_mid_write_keeps_previous_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    torch.save({"good": torch.ones(3)}, target)

    def failing(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.EIO, "simulated failure mid-write")
    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert torch.equal(torch.load(target, weights_only=True)["good"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_disk_full_while_checkpointing(tmp_path, fashion_dir, monkeypatch):
    train(cfg(tmp_path, fashion_dir, epochs=1))
    good = (tmp_path / "run" / "last.pt").read_bytes()
    import convmixer.train as train_module

    def no_space(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train_module.torch, "save", no_space)
    with pytest.raises(TrainingError, match=r"last.pt \(No space left on device; .* MiB free, about .* MiB needed\); "
                                            r"the previous file is intact.*--resume"):
        train(cfg(tmp_path, fashion_dir, epochs=2), resume=tmp_path / "run" / "last.pt")
    assert (tmp_path / "run" / "last.pt").read_bytes() == good


def test_truncated_and_garbage_checkpoints_are_named(tmp_path, fashion_dir, capsys):
    train(cfg(tmp_path, fashion_dir, epochs=1))
    data = (tmp_path / "run" / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.pt").write_bytes(os.urandom(1000))
    for name in ("cut.pt", "junk.pt"):
        with pytest.raises(TrainingError, match="truncated or not a"):
            load_checkpoint(tmp_path / name)
        code = main(["train", "--dataset", "fashion_mnist", "--data-dir", str(fashion_dir),
                     "--resume", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and "truncated" in err and "Traceback" not in err


def test_kill_9_leaves_last_complete_checkpoint_loadable(tmp_path, fashion_dir):
    out = tmp_path / "k9"
    args = [sys.executable, "-m", "convmixer", "train", "--dataset", "fashion_mnist", "--data-dir", str(fashion_dir),
            "--val-split", "0", "--epochs", "50", "--batch-size", "32", "--dim", "16", "--depth", "2",
            "--kernel-size", "3", "--patch-size", "2", "--randaugment-n", "0", "--progress", "false",
            "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "last.pt").exists():
        time.sleep(0.01)
    time.sleep(0.3)  # land somewhere in the middle of later epochs / checkpoint writes
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] >= 1
    short = [str(ckpt["epoch"] + 1) if a == "50" else a for a in args]  # one more epoch is enough
    resumed = subprocess.run(short + ["--resume", str(out / "last.pt")], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr


def test_checkpoint_of_another_model_is_refused(tmp_path, fashion_dir, capsys):
    train(cfg(tmp_path, fashion_dir, epochs=1))
    with pytest.raises(ConfigError, match=r"differ from its checkpoint: dim \(16 -> 24\)"):
        train(cfg(tmp_path, fashion_dir, epochs=2, dim=24), resume=tmp_path / "run" / "last.pt")


def test_crafted_pickle_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    with open("evil.pt", "wb") as f:
        pickle.dump({"model": Evil(), "model_args": {}}, f)
    with pytest.raises(TrainingError, match="refused"):
        load_checkpoint("evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_images_smaller_than_patch(tmp_path):
    with pytest.raises(Exception, match="patch_size 8 is larger than the 4 px images"):
        root = tmp_path / "tiny"
        for c in ("a", "b"):
            (root / "train" / c).mkdir(parents=True)
            for i in range(40):
                Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(root / "train" / c / f"{i}.png")
        train(make_config(None, {**TINY, "dataset": "imagefolder", "data_dir": str(root), "val_split": 10,
                                 "patch_size": 8, "batch_size": 8, "epochs": 1, "out": str(tmp_path / "o")}))


def test_wrong_length_cifar_file(cifar_dir):
    path = cifar_dir / "cifar-10-batches-py" / "data_batch_3"
    entry = pickle.load(open(path, "rb"))
    entry["data"] = entry["data"][:, :1000]
    pickle.dump(entry, open(path, "wb"))
    with pytest.raises(DataError, match="data_batch_3 has the wrong shape"):
        load_dataset("cifar10", cifar_dir)


def test_non_image_files_are_ignored_and_fake_images_reported(tmp_path):
    tmp_path = tmp_path / "data"  # beside the test's cache folder, not around it
    for c in ("a", "b"):
        (tmp_path / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / c / "ok.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0\0")
    assert len(load_dataset("imagefolder", tmp_path, img_size=8)) == 2
    (tmp_path / "b" / "fake.png").write_text("text pretending to be a png")
    with pytest.raises(DataError, match="fake.png"):
        load_dataset("imagefolder", tmp_path, img_size=8)
    data = load_dataset("imagefolder", tmp_path, img_size=8, skip_bad_images=True)
    assert len(data) == 2


def test_mixed_sizes_need_img_size(tmp_path):
    tmp_path = tmp_path / "data"
    for c, size in (("a", 8), ("b", 12)):
        (tmp_path / c).mkdir(parents=True)
        Image.new("RGB", (size, size)).save(tmp_path / c / "x.png")
    with pytest.raises(DataError, match="--img-size"):
        from convmixer.data import decode_folder, scan_folder
        decode_folder(scan_folder(tmp_path), None, progress=False)
    streamed = load_dataset("imagefolder", tmp_path, img_size=10)  # resized on the fly, not squashed into a cache
    assert streamed.images is None and len(streamed.files) == 2


@pytest.mark.parametrize("key,value", [("weight_decay", "nan"), ("lr", "inf"), ("clip_grad", "nan"),
                                       ("opt_eps", "nan"), ("mixup", "inf"), ("time_limit", "nan"),
                                       ("val_split", "-inf"), ("ema_decay", "1.0"), ("cutmix", "nan")])
def test_non_finite_and_degenerate_settings(key, value, capsys):
    assert main(["train", f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and len(err.strip().splitlines()) == 2
