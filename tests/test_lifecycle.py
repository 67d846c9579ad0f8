"""The life of a run: resume continues that run, a run never destroys another, one process per
folder, the checkpoint survives a full disk, stale temporaries go, signals are acted on at once."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from convmixer.cli import main
from convmixer.config import make_config
from convmixer.errors import ConfigError, TrainingError
from convmixer.train import train

TINY = dict(dim=16, depth=2, kernel_size=3, patch_size=2, batch_size=32, randaugment_n=0, progress=False,
            dataset="fashion_mnist", val_split=0, lr=0.01, download=False, amp="off")


def cfg(tmp_path, data_dir, **kw):
    return make_config(None, {**TINY, "data_dir": str(data_dir), "out": str(tmp_path / "run"), **kw})


def cli_args(data_dir, out, *extra):
    return ["train", "--dataset", "fashion_mnist", "--data-dir", str(data_dir), "--val-split", "0", "--batch-size",
            "32", "--dim", "16", "--depth", "2", "--kernel-size", "3", "--patch-size", "2", "--randaugment-n", "0",
            "--progress", "false", "--out", str(out), *extra]


def epochs_logged(out):
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


def test_resume_restores_the_runs_own_settings_and_folder(tmp_path, fashion_dir, monkeypatch, capsys):
    out = tmp_path / "runs" / "s05"
    assert main(cli_args(fashion_dir, out, "--epochs", "2", "--lr", "0.003")) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no ./data here, no runs/default: all must come from the checkpoint
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "3"]) == 0
    assert epochs_logged(out) == [1, 2, 3]
    saved = torch.load(out / "last.pt", weights_only=True)["config"]
    assert (saved["lr"], saved["dataset"], saved["dim"], saved["epochs"]) == (0.003, "fashion_mnist", 16, 3)
    assert not (elsewhere / "runs").exists()
    # what cannot change mid-run is refused in one line that lists the keys; nothing is touched
    before = snapshot(out)
    assert main(["train", "--resume", str(out / "last.pt"), "--lr", "0.05", "--batch-size", "64", "--epochs", "4"]) == 2
    err = capsys.readouterr().err
    assert "lr (0.003 -> 0.05)" in err and "batch_size (32 -> 64)" in err and len(err.strip().splitlines()) == 2
    assert main(["train", "--resume", str(out / "last.pt"), "--out", str(tmp_path / "other")]) == 2
    assert "in its own folder" in capsys.readouterr().err
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "1"]) == 2
    assert "fewer than the 3 epochs" in capsys.readouterr().err
    assert snapshot(out) == before


def test_resume_messages_and_a_mid_epoch_checkpoint(tmp_path, fashion_dir, capsys):
    out = tmp_path / "r"
    assert main(cli_args(fashion_dir, out, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2  # the folder: its checkpoint is named
    assert f"--resume {out / 'last.pt'}" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text(f"out: {tmp_path / 'elsewhere'}\nepochs: 2\n")  # a config's own out: no --out
    assert main(["train", "--resume", str(out / "last.pt"), "--config", str(tmp_path / "c.yaml")]) == 0
    assert epochs_logged(out) == [1, 2] and not (tmp_path / "elsewhere").exists()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["batch_in_epoch"] = 1  # as a signal one step into epoch 3 leaves it
    torch.save(ckpt, out / "last.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "2"]) == 2  # would save an unevaluated model
    assert "fewer than the 3 epochs this run has done or begun" in capsys.readouterr().err


def test_a_checkpoint_stopped_mid_epoch_as_the_time_ran_out_ends_evaluated(tmp_path, fashion_dir):
    """A signal in the same step as the time limit: the mid-epoch checkpoint has its time spent. Resumed, that
    epoch is closed and evaluated (finish() saved weights that were never evaluated before)."""
    out = tmp_path / "run"
    train(cfg(tmp_path, fashion_dir, epochs=2, time_limit=60, val_split=100))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt.update(epoch=1, batch_in_epoch=2, elapsed=3600.0, partial={"loss": 2.0, "correct": 10, "seen": 64,
                                                                      "seconds": 1.0})
    torch.save(ckpt, out / "last.pt")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n")
    summary = train(None, resume=out / "last.pt")
    assert epochs_logged(out) == [1, 2] and summary["time_limit_reached"]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["val_top1"] == summary["final_val_top1"]


def test_a_non_finite_gradient_stops_before_a_checkpoint(tmp_path, fashion_dir, monkeypatch):
    """bf16 or fp32 (no GradScaler to skip the step): a gradient that overflows while the loss is still finite
    was stepped into the weights, and the epoch's checkpoint then saved them."""
    real = torch.nn.utils.clip_grad_norm_

    def overflowing(parameters, max_norm):
        real(parameters, max_norm)
        return torch.tensor(float("inf"))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflowing)
    with pytest.raises(TrainingError, match="or its gradient"):
        train(cfg(tmp_path, fashion_dir, epochs=1, clip_grad=1.0))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_time_running_out_during_an_evaluation_ends_the_run_there(tmp_path, fashion_dir, monkeypatch):
    """It went on for one more step, then logged that as an epoch and evaluated a second time."""
    import convmixer.train as train_module
    real = train_module._validate

    def slow(run, record):  # an evaluation that takes the rest of the hour
        improved = real(run, record)
        run.started -= 3600
        return improved
    monkeypatch.setattr(train_module, "_validate", slow)
    summary = train(cfg(tmp_path, fashion_dir, epochs=3, time_limit=60, val_split=100))
    assert epochs_logged(tmp_path / "run") == [1] and summary["time_limit_reached"]


def test_a_new_run_never_replaces_an_existing_one(tmp_path, fashion_dir, capsys):
    out = tmp_path / "k11"
    assert main(cli_args(fashion_dir, out, "--epochs", "1")) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(cli_args(fashion_dir, out, "--epochs", "2")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(out) == before
    # --overwrite deletes the old run only once the new one has its data and model: one that cannot start
    # (a typo in --data-dir) leaves it as it was
    assert main(cli_args(fashion_dir, out, "--epochs", "2", "--overwrite", "--data-dir", str(tmp_path / "typo"),
                     "--download", "false")) == 2
    assert "typo" in capsys.readouterr().err
    assert snapshot(out) == before
    # an explicit --overwrite replaces it
    assert main(cli_args(fashion_dir, out, "--epochs", "2", "--overwrite")) == 0
    assert epochs_logged(out) == [1, 2]
    # --overwrite with --resume is a contradiction
    assert main(["train", "--resume", str(out / "last.pt"), "--overwrite"]) == 2


def test_tensorboard_logs_and_other_files_in_the_folder_are_left_alone(tmp_path, fashion_dir, capsys):
    out = tmp_path / "mine"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.1").write_text("the user's own logs")
    (out / ".notes.tmp").write_text("an editor's file")
    assert main(cli_args(fashion_dir, out, "--epochs", "1")) == 2
    assert "already holds a run (tensorboard)" in capsys.readouterr().err
    assert (out / "tensorboard" / "events.1").exists() and (out / ".notes.tmp").exists()
    (out / ".last.pt.x1y2z3.tmp").write_bytes(b"cut short")  # a killed write of a run file
    assert main(cli_args(fashion_dir, out, "--epochs", "1", "--overwrite")) == 0
    assert not (out / "tensorboard").exists() and not (out / ".last.pt.x1y2z3.tmp").exists()
    assert (out / ".notes.tmp").read_text() == "an editor's file"


def test_a_config_built_in_python_is_checked_and_converted(tmp_path, fashion_dir):
    from convmixer.config import TrainConfig
    base = {**TINY, "data_dir": str(fashion_dir), "out": str(tmp_path / "py")}
    with pytest.raises(ConfigError, match="eval_every=0"):  # was a ZeroDivisionError after the first epoch
        train(TrainConfig(**{**base, "eval_every": 0}))
    with pytest.raises(ConfigError, match="epochs"):
        train(TrainConfig(**{**base, "epochs": "two"}))
    assert not (tmp_path / "py").exists()
    summary = train(TrainConfig(**{**base, "epochs": "1", "residual": "false", "subset": 64}))
    saved = torch.load(tmp_path / "py" / "last.pt", weights_only=True)["config"]
    assert summary["params"] and saved["epochs"] == 1 and saved["residual"] is False


def test_a_relative_data_dir_is_saved_absolute_so_resume_works_anywhere(tmp_path, fashion_dir, monkeypatch):
    monkeypatch.chdir(fashion_dir.parent)
    out = tmp_path / "rel"
    train(make_config(None, {**TINY, "data_dir": fashion_dir.name, "out": str(out), "epochs": 1, "subset": 64}))
    assert torch.load(out / "last.pt", weights_only=True)["config"]["data_dir"] == str(fashion_dir)
    monkeypatch.chdir(tmp_path / "rel")  # no such data folder here
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "2"]) == 0
    assert epochs_logged(out) == [1, 2]


def test_a_lost_best_weights_write_is_repaired_on_resume(tmp_path, fashion_dir, capsys):
    out = tmp_path / "run"
    train(cfg(tmp_path, fashion_dir, epochs=1, val_split=100))
    from safetensors.torch import load_file

    from convmixer.weights import read_metadata
    best = out / "best.safetensors"
    written = {k: v.clone() for k, v in load_file(best).items()}, read_metadata(best)  # not the mapped file
    best.write_bytes(b"older weights")  # a kill between last.pt and best.safetensors leaves the older file
    capsys.readouterr()
    train(None, resume=out / "last.pt")  # the finished run: nothing to train, the best put right
    assert "best.safetensors rewritten with epoch 1" in capsys.readouterr().out
    tensors, metadata = load_file(best), read_metadata(best)
    assert metadata == written[1] and all(torch.equal(tensors[k], v) for k, v in written[0].items())
    train(None, resume=out / "last.pt")
    assert "rewritten" not in capsys.readouterr().out  # an intact one is left alone


def test_resume_refuses_data_that_gained_or_lost_images(tmp_path, folder_dir, capsys):
    """A seeded 10% split of an image folder moves when images come or go: validation images would be trained on."""
    import shutil
    (folder_dir / "test").rename(tmp_path / "elsewhere")  # no test/: the run carves its validation split
    out = tmp_path / "run"
    train(make_config(None, {**TINY, "dataset": "imagefolder", "data_dir": str(folder_dir), "val_split": None,
                             "epochs": 1, "out": str(out)}))
    first = next((folder_dir / "train" / "class_0").iterdir())
    shutil.copy(first, first.with_name("added" + first.suffix))
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "2"]) == 2
    assert "this run had 216 / 24" in capsys.readouterr().err


HOLDER = """
import sys, time
from convmixer.run import RunFolder
held = RunFolder(sys.argv[1]).open(resume=False)
print("holding", flush=True)
time.sleep(600)
"""


def test_one_process_per_folder_and_a_killed_holder_is_stale(tmp_path, fashion_dir, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert main(cli_args(fashion_dir, out, "--epochs", "1")) == 2
        err = capsys.readouterr().err
        assert f"in use by a running training (pid {holder.pid} on " in err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").read_text().startswith(f"pid {holder.pid}")  # what kill -9 left behind
    assert main(cli_args(fashion_dir, out, "--epochs", "1")) == 0     # ...is recognised as stale
    assert epochs_logged(out) == [1]


def test_disk_full_on_metrics_keeps_the_checkpoint_and_resume_restores_the_line(tmp_path, fashion_dir, monkeypatch):
    import builtins

    import convmixer.run as run_module
    calls = []

    def full_disk_open(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            calls.append(path)
            if len(calls) == 2:  # epoch 2's line
                raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *a, **k)
    monkeypatch.setattr(run_module, "open", full_disk_open, raising=False)
    with pytest.raises(TrainingError, match=r"could not write .*metrics.jsonl \(No space left on device; .* MiB free, "
                                            r"about .* MiB needed\).*--resume"):
        train(cfg(tmp_path, fashion_dir, epochs=3))
    out = tmp_path / "run"
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2  # the checkpoint was written first
    assert epochs_logged(out) == [1]
    monkeypatch.undo()
    train(None, resume=out / "last.pt")
    assert epochs_logged(out) == [1, 2, 3]  # epoch 2's record came back from the checkpoint


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path, fashion_dir):
    train(cfg(tmp_path, fashion_dir, epochs=1))
    out = tmp_path / "run"
    (out / ".last.pt.k9x2ab.tmp").write_bytes(os.urandom(4096))  # as kill -9 during atomic_write leaves it
    (out / ".metrics.jsonl.zz.tmp").write_bytes(b"{")
    train(cfg(tmp_path, fashion_dir, epochs=2), resume=out / "last.pt")
    assert not list(out.glob(".*.tmp"))


def test_resume_with_another_batch_size_is_refused(tmp_path, fashion_dir):
    train(cfg(tmp_path, fashion_dir, epochs=1))
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"batch_size \(32 -> 64\)"):
        train(cfg(tmp_path, fashion_dir, epochs=2, batch_size=64), resume=tmp_path / "run" / "last.pt")
    assert snapshot(tmp_path / "run") == before


def test_a_signal_during_evaluation_stops_after_that_epoch(tmp_path, fashion_dir, monkeypatch, capsys):
    import convmixer.train as train_module
    real = train_module.evaluate

    def signalled_evaluate(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the epoch's evaluation runs
        return real(*a, **k)
    monkeypatch.setattr(train_module, "evaluate", signalled_evaluate)
    result = train(cfg(tmp_path, fashion_dir, epochs=3))
    assert result["interrupted"]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (1, 0, 600 // 32)  # not one step further
    assert "SIGTERM: stopped after epoch 1" in capsys.readouterr().out


def test_weights_saved_from_python_work_with_every_command(tmp_path, capsys):
    from PIL import Image

    import convmixer
    model = convmixer.create_model("convmixer_256_8", dim=16, depth=2, num_classes=3)
    convmixer.save_weights(model, tmp_path / "m.safetensors")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "x.png")
    assert main(["predict", "--checkpoint", str(tmp_path / "m.safetensors"), "--json", str(tmp_path / "x.png")]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert {t["class"] for t in top} == {"0", "1", "2"}
    assert main(["viz", "--checkpoint", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "viz")]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "m.safetensors"), "--format", "torchscript",
                 "--out", str(tmp_path / "m.pt")]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "m.safetensors")]) == 2  # which data? it says so
    assert "pass --dataset" in capsys.readouterr().err


def test_metrics_with_a_cut_off_line_are_read_by_every_reader(tmp_path, fashion_dir, capsys):
    train(cfg(tmp_path, fashion_dir, epochs=2))
    out = tmp_path / "run"
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # a crash mid-line
    assert main(["viz", "--runs", str(out), "--out", str(tmp_path / "viz")]) == 0
    train(None, resume=out / "last.pt")  # the resumed run drops the cut line
    assert epochs_logged(out) == [1, 2]


def test_user_errors_are_one_line_and_bugs_are_not_hidden(tmp_path, capsys, monkeypatch):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    import convmixer.cli as cli

    def bug(args):
        raise ValueError("an internal bug")
    monkeypatch.setattr(cli, "cmd_models", bug)
    with pytest.raises(ValueError, match="an internal bug"):  # not disguised as a user error
        main(["models"])


def test_debug_shows_the_hidden_cause(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(os.urandom(100))
    with pytest.raises(TrainingError) as info:
        main(["--debug", "train", "--resume", str(tmp_path / "junk.pt")])
    assert info.value.__context__ is not None and not info.value.__suppress_context__


def test_host_syncs_only_in_agree(tmp_path, fashion_dir, monkeypatch):
    """Loss and accuracy accumulate on the device; the NaN check, the stop flag and the time spent
    come back in one transfer per agree() (every sync_every steps), however many micro-batches."""
    from convmixer.train import SignalFlag, agree, build_run, train_step
    config = cfg(tmp_path, fashion_dir, epochs=1, accum_steps=4)
    run = build_run(config, None, tmp_path / "run", overwrite=False)
    batches = iter([(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(8)])
    counts = {"item": 0, "tolist": 0, "bool": 0}
    for name, attr in (("item", "item"), ("tolist", "tolist"), ("bool", "__bool__")):
        real = getattr(torch.Tensor, attr)

        def counting(self, *a, _real=real, _name=name, **k):
            # AdamW reads its step counters, which it keeps on the host (no device sync on a GPU either)
            if not sys._getframe(1).f_globals.get("__name__", "").startswith("torch.optim"):
                counts[_name] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, attr, counting)
    try:
        run.stats = {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
        train_step(run, batches)
        train_step(run, batches)
        assert counts == {"item": 0, "tolist": 0, "bool": 0}  # two steps, nothing waited for the device
        agree(run, SignalFlag())
    finally:
        monkeypatch.undo()
        run.folder.close()
    assert counts == {"item": 0, "tolist": 1, "bool": 0}
    assert run.step == 2 and run.stats["seen"] == 64 and run.pending is None


def test_sync_every_n_steps_trains_the_same(tmp_path, fashion_dir):
    """Synchronising every 5 steps instead of every step changes no weight and no logged number."""
    a = train(cfg(tmp_path / "a", fashion_dir, epochs=2, sync_every=1, deterministic=True))
    b = train(cfg(tmp_path / "b", fashion_dir, epochs=2, sync_every=5, deterministic=True))
    wa = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a["best_val_top1"] == b["best_val_top1"]
    la = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in la] == pytest.approx([r["train_loss"] for r in lb], rel=1e-12)


def test_a_checkpoint_from_before_a_new_key_resumes_as_it_trained(tmp_path, fashion_dir):
    from convmixer.config import resume_config
    saved = {k: v for k, v in json.loads(json.dumps(cfg(tmp_path, fashion_dir).__dict__)).items() if k != "decay_all"}
    assert resume_config(saved, {}).decay_all is False  # older runs exempted biases and norms from weight decay
    # nor may a key the checkpoint predates change the run: it trained with that key's default
    older = {k: v for k, v in saved.items() if k not in ("translate", "stem_init")}
    for change in ({"translate": 4}, {"stem_init": "whiten"}):
        with pytest.raises(ConfigError, match=f"{next(iter(change))} .* -> "):
            resume_config(older, change)
    assert resume_config(older, {"translate": 0}).translate == 0


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "never"
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "image folder not found" in capsys.readouterr().err and not out.exists()
    assert main(["train", "--out", ""]) == 2
    assert "out is empty" in capsys.readouterr().err


def test_streamed_images_are_augmented_the_same_with_any_number_of_workers(tmp_path, folder_dir):
    """Each streamed image draws its augmentation from its own seed (run seed, epoch, index), so neither the
    worker that loads it nor a resume (which hands the remaining batches to fresh workers) changes it."""
    from safetensors.torch import load_file
    weights = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train(make_config(None, {**TINY, "dataset": "imagefolder", "data_dir": str(folder_dir), "cache": False,
                                 "translate": 2, "hflip": 0.5, "randaugment_n": 1, "epochs": 2,
                                 "workers": workers, "out": str(out)}))
        weights.append(load_file(str(out / "model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
