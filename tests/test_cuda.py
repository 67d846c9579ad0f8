"""GPU paths (marked `cuda`; skipped where there is no GPU, run by benchmarks/gpu.sh on the device)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from convmixer.config import make_config
from convmixer.train import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = dict(dim=32, depth=2, kernel_size=5, patch_size=2, batch_size=32, randaugment_n=0, stem_init="whiten",
            progress=False, dataset="fashion_mnist", val_split=0, lr=0.01, download=False)


def _cfg(tmp_path, data, **kw):
    return make_config(None, {**TINY, "data_dir": str(data), "out": str(tmp_path / "run"), **kw})


def _train_losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines if "train_loss" in line]


def test_bf16_channels_last_training_on_the_gpu_follows_the_cpu(tmp_path, fashion_dir, monkeypatch):
    """The same seeded run on the CPU in fp32 and on the GPU in bf16 channels_last: the GPU run
    learns, and its loss curve stays within bf16 rounding of the CPU's."""
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        cpu = train(_cfg(tmp_path / "cpu", fashion_dir, epochs=4, amp="off"))
    torch.manual_seed(0)
    gpu = train(_cfg(tmp_path, fashion_dir, epochs=4, amp="auto", channels_last=True))
    assert gpu["best_val_top1"] > 0.5 and abs(gpu["best_val_top1"] - cpu["best_val_top1"]) < 0.1
    a, b = _train_losses(tmp_path / "cpu" / "run"), _train_losses(tmp_path / "run")
    assert len(a) == len(b) == 4 and all(abs(x - y) <= 0.05 * x for x, y in zip(a, b)), (a, b)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["config"]["amp"] == "auto" and "cuda" in ckpt["rng"]


def test_compiled_training(tmp_path, fashion_dir):
    summary = train(_cfg(tmp_path, fashion_dir, epochs=1, compile=True))
    assert 0 <= summary["final_val_top1"] <= 1


def test_fast_depthwise_falls_back_to_cudnn():
    from convmixer.fastops import depthwise_conv2d
    x = torch.randn(4, 16, 12, 12, device="cuda", requires_grad=True)
    w = torch.randn(16, 1, 5, 5, device="cuda", requires_grad=True)
    y = depthwise_conv2d(x, w, None)
    ref = torch.nn.functional.conv2d(x, w, None, padding=2, groups=16)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_batch_augmentation_on_the_gpu_equals_the_cpu():
    from convmixer.augment import BatchAugment
    from convmixer.config import TrainConfig
    aug = BatchAugment(TrainConfig(randaugment_n=1, randaugment_m=9), 16, [0.5] * 3, [0.5] * 3)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    draws = aug.draw(64)
    cpu = aug.randaugment_round(images, draws)
    gpu = aug.randaugment_round(images.cuda(), draws).cpu()
    assert (cpu.int() - gpu.int()).abs().max() <= 1  # interpolation may round differently on the GPU


def test_resume_on_the_gpu(tmp_path, fashion_dir):
    train(_cfg(tmp_path, fashion_dir, epochs=1))
    summary = train(_cfg(tmp_path, fashion_dir, epochs=2), resume=tmp_path / "run" / "last.pt")
    assert summary["epochs_run"] == 2


def test_one_process_nccl_ddp(tmp_path, fashion_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["train", "--dataset", "fashion_mnist", "--data-dir", str(fashion_dir), "--val-split", "0", "--epochs", "1",
            "--batch-size", "64", "--dim", "16", "--depth", "2", "--no-progress", "--sync-bn", "--out",
            str(tmp_path / "ddp")]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={port}",
                          "-m", "convmixer", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CONVMIXER_DDP": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 process(es) on cuda:0" in out.stdout
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["epochs_run"] == 1
