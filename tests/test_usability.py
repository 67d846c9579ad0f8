"""How users arrive: fine-tuning on their own folder, weights by name, help that explains, and the
timm interface (features, intermediates, pretrained_cfg), embeddings and ONNX with metadata."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import convmixer
from convmixer.cli import main


def _my_images(root, classes=("cat", "dog", "ship"), n_train=12, n_val=4, sizes=((40, 30), (64, 64), (32, 48))):
    """A user's folder: train/ and val/, photos of varied sizes, JPEG and PNG."""
    g = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                a = g.integers(0, 60, (h, w, 3), dtype=np.uint8)
                a[:, :, ci] += 150  # each class has its own dominant colour
                Image.fromarray(a).save(root / split / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_the_documented_fine_tuning_command(tmp_path, capsys):
    """README "Train on your own images": one command, no flags about splits or sizes."""
    data = _my_images(tmp_path / "mydata")
    out = tmp_path / "runs" / "mine"
    assert main(["train", "--config", "finetune", "--data-dir", str(data), "--out", str(out), "--epochs", "2",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "fine-tuning from" in text and "new (not loaded): head.weight, head.bias" in text
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    assert cfg["val_split"] == 0  # mydata/val was used as it is
    model, info = convmixer.load_model(out)  # a run folder is a checkpoint
    shipped, shipped_info = convmixer.load_model("cifar10")
    assert info.classes == ["cat", "dog", "ship"] and info.img_size == 32 and info.mean == shipped_info.mean
    # it started from the shipped weights: two epochs at lr 0.002 move them a little, not to a fresh init
    moved = (model.blocks[0][1].weight - shipped.blocks[0][1].weight).norm() / shipped.blocks[0][1].weight.norm()
    assert 0 < moved < 0.5
    assert main(["eval", "--checkpoint", str(out), "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12
    assert main(["eval", "--checkpoint", str(out)]) == 0
    assert capsys.readouterr().out.startswith("imagefolder val:")


def test_library_calls_leave_the_callers_model_as_it_was(tmp_path):
    from convmixer.evaluate import embed, predict
    from convmixer.export import export
    from convmixer.run import RunInfo
    model = convmixer.ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3).train()
    info = RunInfo(model_args=model.model_args, classes=["a", "b", "c"], mean=[0.5] * 3, std=[0.5] * 3, img_size=8,
                   crop_pct=1.0)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    export(model, tmp_path / "m.safetensors", "safetensors", 8)  # left it in eval mode with its fast paths off
    predict(model, info, [str(tmp_path / "x.png")])  # left it in eval mode
    embed(model, info, [str(tmp_path / "x.png")])
    assert model.training and model.fast and model.blocks[0][1].fast
    from convmixer.data import ImageData
    from convmixer.evaluate import evaluate
    grad_enabled = []
    model.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    data = ImageData(torch.tensor([0, 1]), info.classes, images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert evaluate(model, data, info)["n"] == 2 and model.training
    assert grad_enabled == [False]  # evaluation builds no autograd graph (and keeps the CPU inference path)


def test_shipped_weights_by_name(tmp_path, capsys):
    model = convmixer.create_model("convmixer_256_8", pretrained="cifar10")
    same = convmixer.create_model("convmixer_256_8", pretrained=True)  # this variant's weights are shipped
    assert torch.equal(model.head.weight, same.head.weight)
    fm = convmixer.create_model("convmixer_256_8", pretrained="fashion_mnist")  # brings its own architecture
    assert (fm.patch_size, fm.in_chans) == (4, 1)
    # their preprocessing is theirs too (it was the CIFAR-10 variant's: 32 px and RGB statistics averaged)
    info = convmixer.load_model("fashion_mnist")[1]
    cfg = fm.pretrained_cfg
    assert cfg["input_size"] == (1, 28, 28) and list(cfg["mean"]) == info.mean and list(cfg["std"]) == info.std
    assert cfg["label_names"] == tuple(info.classes) and cfg["file"].endswith("fashion_mnist.safetensors")
    assert model.pretrained_cfg["mean"] == tuple(convmixer.load_model("cifar10")[1].mean)
    fresh = convmixer.create_model("convmixer_256_8")
    assert fresh.pretrained_cfg["input_size"] == (3, 32, 32) and "label_names" not in fresh.pretrained_cfg
    new_head = convmixer.create_model("convmixer_256_8", pretrained="cifar10", num_classes=3)
    assert new_head.head.weight.shape == (3, 256) and torch.equal(new_head.stem[0].weight, model.stem[0].weight)
    Image.new("RGB", (32, 32), (250, 250, 250)).save(tmp_path / "x.png")
    assert main(["predict", "--checkpoint", "cifar10", "--json", "--top-k", "3", str(tmp_path / "x.png")]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert {t["class"] for t in top} <= set(convmixer.load_model("cifar10")[1].classes) and len(top) == 3


def test_help_explains_every_option(capsys):
    from convmixer.config import CONFIG_DIR, TrainConfig
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in TrainConfig.__dataclass_fields__.values():
        assert f.metadata.get("help"), f.name
        assert "--" + f.name.replace("_", "-") in text
    for path in CONFIG_DIR.glob("*.yaml"):
        assert path.stem in text
    for choices in ("auto | bf16 | fp16 | off", "onecycle (piecewise linear) | cosine | constant", "gelu | relu | silu",
                    "cifar10 | cifar100 | fashion_mnist | mnist | imagefolder", "batchnorm | layernorm"):
        assert choices in text


def test_every_subcommand_option_has_help():
    import argparse

    from convmixer.cli import build_parser
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "eval", "predict", "bench", "export", "viz", "ablate"} <= set(subparsers.choices)
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in subparsers.choices.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert missing == [], f"arguments without a help text: {missing}"
    assert [name for name, p in subparsers.choices.items() if not p.description] == []  # `predict --help` says what


def test_true_false_options_and_unknown_flags(capsys):
    assert main(["train", "--tta-flip", "epochs=3", "--no-cache", "--progress", "false", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "tta_flip: true" in out and "cache: false" in out and "progress: false" in out and "epochs: 3" in out
    with pytest.raises(SystemExit):
        main(["train", "--epochz", "3"])
    assert "did you mean --epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the subcommand's own flags only, never the flag itself back
        main(["predict", "--checkpoint", "cifar10", "--batch-size", "8", "x.jpg"])
    err = capsys.readouterr().err
    assert "--batch-size is not a flag of `convmixer predict` (`convmixer predict --help`" in err
    assert "did you mean --batch-size" not in err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", "cifar10", "--tta-flip", "false"])  # not rewritten to a --no-tta-flip
    assert "--no-tta-flip" not in capsys.readouterr().err


def test_quick_runs_cap_evaluation_and_warn(tmp_path, fashion_dir, capsys):
    code = main(["train", "--dataset", "fashion_mnist", "--data-dir", str(fashion_dir), "--val-split", "0",
                 "--subset", "64", "--val-max", "50", "--epochs", "1", "--batch-size", "32", "--dim", "8", "--depth",
                 "1", "--no-progress", "--out", str(tmp_path / "q")])
    assert code == 0
    captured = capsys.readouterr()
    assert "64 train / 50 val images" in captured.out and "warning: only 2 optimizer steps" in captured.out
    assert "(h=8, d=1, k=5, p=2;" in captured.out  # the model actually built, not the variant's name alone


@pytest.mark.parametrize("progress", ["--progress", "--no-progress"])
def test_no_progress_silences_every_bar(tmp_path, folder_dir, capsys, progress):
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(folder_dir), "--epochs", "1", "--batch-size",
                 "64", "--dim", "8", "--depth", "1", progress, "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert ("decoding images" in err) == (progress == "--progress")  # the first decoding, then the cache


def test_small_conveniences(tmp_path, monkeypatch, capsys):
    assert main(["models", "ks9"]) == 0
    listed = capsys.readouterr().out
    assert "convmixer_256_8_ks9_p1" in listed and "convmixer_768_32" not in listed
    monkeypatch.setenv("CONVMIXER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "images-0123456789abcdef0123.safetensors").write_bytes(b"x" * 2048)
    assert main(["cache"]) == 0 and "images-0123456789abcdef0123.safetensors" in capsys.readouterr().out
    assert main(["cache", "--clear"]) == 0 and not list((tmp_path / "cache").iterdir())
    # a failed download leaves no empty folder behind
    import torchvision.datasets as tvd

    def offline(*a, **k):
        raise RuntimeError("no network")
    monkeypatch.setattr(tvd.MNIST, "download", offline)
    from convmixer.data import DataError, load_dataset
    with pytest.raises(DataError, match="download failed"):
        load_dataset("mnist", tmp_path / "data" / "mnist")
    assert not (tmp_path / "data").exists()


def test_data_dir_may_name_the_archive(tmp_path):
    import tarfile
    src = tmp_path / "src" / "cifar10-jpg" / "train"
    for c in ("airplane", "bird"):
        (src / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (i, 2, 3)).save(src / c / f"{i}.jpg")
    archive = tmp_path / "cifar10-jpg-train.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar10-jpg", arcname="cifar10-jpg")
    from convmixer.data import load_dataset
    assert len(load_dataset("cifar10", archive)) == 4


def test_package_attributes_after_a_bare_import():
    import subprocess
    import sys
    code = ("import convmixer; c = convmixer.config.make_config('fashion_mnist', {'epochs': 1}); "
            "print(c.epochs, callable(convmixer.train.train), callable(convmixer.load_model))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1", "True", "True"], out.stderr


def test_tensorboard_logs(tmp_path, fashion_dir):
    pytest.importorskip("tensorboard")
    from convmixer.config import make_config
    from convmixer.train import train
    train(make_config(None, dict(dataset="fashion_mnist", data_dir=str(fashion_dir), val_split=0, epochs=1,
                                 batch_size=64, dim=8, depth=1, progress=False, download=False, tensorboard=True,
                                 out=str(tmp_path / "tb"))))
    events = list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_timm_interface():
    timm_data = pytest.importorskip("timm.data")
    model = convmixer.create_model("convmixer_256_8", dim=16, depth=4)
    assert timm_data.resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    maps = model.forward_intermediates(x, indices=2, intermediates_only=True)
    final, last = model.forward_intermediates(x, indices=[-1])
    assert len(maps) == 2 and len(last) == 1 and torch.equal(last[0], final)
    assert torch.equal(maps[-1], final)
    features = convmixer.create_model("convmixer_256_8", dim=16, depth=4, features_only=True, out_indices=(0, 2, -1))
    out = features(x)
    assert [t.shape for t in out] == [(2, 16, 16, 16)] * 3
    assert features.feature_info.channels() == [16] * 3 and features.feature_info.reduction() == [2] * 3
    assert features.feature_info.module_name() == ["stem", "blocks.1", "blocks.3"]
    with pytest.raises(convmixer.ConvMixerError, match="outside"):
        model.forward_intermediates(x, indices=[7])


def test_embed_command(tmp_path, capsys):
    data = _my_images(tmp_path / "imgs", n_train=2, n_val=1)
    assert main(["embed", "--checkpoint", "cifar10", str(data / "train"), "--out", str(tmp_path / "e.safetensors")]) == 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "e.safetensors"), "pt") as f:
        vectors, files = f.get_tensor("embeddings"), json.loads(f.metadata()["files"])
    assert vectors.shape == (6, 256) and len(files) == 6 and torch.isfinite(vectors).all()
    assert main(["embed", "--checkpoint", "cifar10", str(data / "val" / "cat" / "0.jpg"), "--out",
                 str(tmp_path / "e.npz")]) == 0
    assert np.load(tmp_path / "e.npz")["embeddings"].shape == (1, 256)
    capsys.readouterr()
    assert main(["embed", "--checkpoint", "cifar10", str(data), "--out", str(tmp_path / "f.npz"), "--batch-size",
                 "0"]) == 2 and "--batch-size 0" in capsys.readouterr().err


def test_onnx_carries_metadata_takes_any_size_and_predicts(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", "--checkpoint", "cifar10", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert not [w for w in caught if "TracerWarning" in type(w.message).__name__]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"])[0] == "airplane" and meta["img_size"] == "32"
    model, _ = convmixer.load_model("cifar10")
    x = torch.randn(2, 3, 64, 48)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), model(x),
                               rtol=1e-3, atol=1e-4)
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(tmp_path / "m.onnx"), "--json", str(tmp_path / "x.png")]) == 0
    onnx_top = json.loads(capsys.readouterr().out)[0]["top"]
    assert main(["predict", "--checkpoint", "cifar10", "--json", str(tmp_path / "x.png")]) == 0
    torch_top = json.loads(capsys.readouterr().out)[0]["top"]
    assert [t["class"] for t in onnx_top] == [t["class"] for t in torch_top]


def test_a_fine_tuning_run_resumes_with_its_own_architecture_and_preprocessing(tmp_path, capsys, monkeypatch):
    data = _my_images(tmp_path / "mydata", n_train=6, n_val=2)
    out = tmp_path / "ft"
    args = ["train", "--config", "finetune", "--data-dir", str(data), "--out", str(out), "--no-progress",
            "--pretrained", "fashion_mnist", "--batch-size", "6"]
    assert main(args + ["--epochs", "1"]) == 0
    first = convmixer.load_model(out / "last.pt")[1]
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "2"]) == 0
    assert "epochs 1 -> 2: the schedule now spans the new length" in capsys.readouterr().out  # it said nothing
    model, info = convmixer.load_model(out)
    assert model.patch_size == 4 and model.in_chans == 3  # the weights' patch, the data's channels
    assert (info.img_size, info.mean, info.std) == (first.img_size, first.mean, first.std) == (28, info.mean, info.std)
    # and a new run may fine-tune from that run's folder, taking its architecture from last.pt alone
    (out / "model.safetensors").unlink()
    (out / "best.safetensors").unlink()
    from convmixer import weights
    reads, read = [], weights.torch_load_safely
    monkeypatch.setattr(weights, "torch_load_safely", lambda *a: reads.append(a) or read(*a))
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(data), "--pretrained", str(out), "--epochs",
                 "1", "--batch-size", "6", "--no-progress", "--out", str(tmp_path / "again")]) == 0
    assert len(reads) == 1  # last.pt is read once (it was read for its RunInfo, the shape check and the weights)
    assert convmixer.load_model(tmp_path / "again")[0].patch_size == 4


def test_shipped_names_win_over_folders_without_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10" / "train").mkdir(parents=True)  # a data folder that happens to share the name
    model, info = convmixer.load_model("cifar10")
    assert info.classes[0] == "airplane"


def test_eval_on_other_data_does_not_reuse_the_runs_split(tmp_path, capsys):
    data = _my_images(tmp_path / "other", n_train=4, n_val=2)
    out = tmp_path / "run"
    assert main(["train", "--config", "finetune", "--data-dir", str(data), "--out", str(out), "--epochs", "1",
                 "--val-split", "0.25", "--no-progress", "--batch-size", "6"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0  # its own data: its own carved split
    assert json.loads(capsys.readouterr().out)["n"] == 3
    other = _my_images(tmp_path / "other2", n_train=4, n_val=5)
    assert main(["eval", "--checkpoint", str(out), "--data-dir", str(other), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 15  # the other folder's own val/, nothing carved
