"""benchmarks/gpu.sh, the prepared device check, runs end to end (QUICK=1: tiny sizes, on this CPU),
so that the one GPU session that runs it does not spend its minutes on a typo."""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_script_runs_every_step(tmp_path):
    src = tmp_path / "src" / "cifar10-jpg" / "train"
    for c in ("airplane", "automobile"):
        (src / c).mkdir(parents=True)
        for i in range(25):
            Image.new("RGB", (32, 32), (10 * i, 100 if c == "airplane" else 200, 0)).save(src / c / f"{i}.jpg")
    data = tmp_path / "gpu-data"
    data.mkdir()
    with tarfile.open(data / "cifar10-jpg-train.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar10-jpg", arcname="cifar10-jpg")
    out = tmp_path / "results"
    env = {"PATH": "/usr/bin:/bin", "QUICK": "1", "OUT": str(out), "DATA": str(data), "BUDGET": "240",
           "PYTHON": sys.executable, "CONVMIXER_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    run = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    codes = dict(line.split() for line in (out / "exit_codes.txt").read_text().splitlines())
    assert set(codes) == {"cuda_tests", "bench_convmixer_256_8_8", "profile", "max_batch", "cifar10_script", "cifar10_paper"}
    assert all(rc == "0" for rc in codes.values()), codes
    assert (out / "cifar10_script" / "metrics.jsonl").is_file() and (out / "cifar10_paper" / "summary.json").is_file()
    assert '"results"' in (out / "bench_convmixer_256_8_8.json").read_text()
