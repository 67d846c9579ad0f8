"""Process and device policy, shared by training, evaluation and the benchmark: which autocast
dtype, which device and process group, how much memory, and the CPU tuning that the ``convmixer``
command applies to its own process (a library user opts in with ``convmixer.tune_cpu()``)."""
from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from .fastops import flush_denormals, tune_allocator


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp`` (auto | bf16 | fp16 | off): ``auto`` is bf16 where the hardware has
    it (a CPU with AVX512-BF16/AMX, a recent GPU), fp16 on older GPUs, and off elsewhere."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":  # native bf16 from Ampere (8.x) on; before, torch would emulate it, slowly
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def pick_device(name: str | None = None) -> torch.device:
    """The device a user named (``cpu``, ``cuda``, ``cuda:1``), checked; None: the GPU if there is one."""
    from .errors import ConfigError
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {name} asks for a GPU this machine does not have: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    return device


def under_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (or the one that CONVMIXER_DDP=1 asks to form
    a process group of its own)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("CONVMIXER_DDP") == "1"
    return "RANK" in os.environ and several


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this
    is one process on the GPU if there is one. One process under torchrun skips the process group
    unless CONVMIXER_DDP=1 (which the GPU check sets to test NCCL with one GPU)."""
    if not under_torchrun():
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


@contextmanager
def rank_zero_first(rank: int, world: int):
    """The block runs on rank 0 first (it downloads, unpacks and caches), then on the other processes, which
    find its files. A failure on rank 0 leaves the others waiting until torchrun stops them all."""
    if world > 1 and rank != 0:
        dist.barrier()
    yield
    if world > 1 and rank == 0:
        dist.barrier()


def physical_memory() -> int:
    """This machine's memory in bytes (16 GiB assumed where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not Linux/POSIX
        return 16 << 30


def resident_mib() -> float | None:
    """This process's resident memory now (Linux), to spot growth over a long run."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_resident_mib() -> float | None:
    """This process's resident high-water mark (Linux VmHWM; writing 5 to /proc/self/clear_refs resets it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def tune_cpu() -> dict:
    """Make this process faster for eager CPU training (fastops explains both settings):
    glibc keeps freed memory instead of unmapping it (``CONVMIXER_NO_MALLOPT=1`` skips it), and
    subnormal floats are flushed to zero in this thread and in torch's worker threads, also when
    their pool has already started (``CONVMIXER_NO_FTZ=1`` skips it). ``import convmixer`` changes
    nothing; the ``convmixer`` command calls this for itself. Returns what was applied."""
    applied = {"allocator": tune_allocator(), "flush_denormals": flush_denormals()}
    if applied["flush_denormals"]:
        _flush_denormals_in_openmp_threads()
    return applied


def _flush_denormals_in_openmp_threads() -> bool:
    """The FTZ/DAZ flags are per thread, and a thread inherits them only when it is created: run one
    parallel region of torch's own OpenMP runtime in which every worker sets them."""
    path = None
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libgomp" in line and ".so" in line), None)
    except OSError:
        pass
    if path is None:  # no OpenMP runtime loaded yet (new threads will inherit the flag) or not Linux
        return False
    try:
        gomp = ctypes.CDLL(path)
        callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
        callback = callback_type(lambda _: torch.set_flush_denormal(True))
        gomp.GOMP_parallel.argtypes = [callback_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        gomp.GOMP_parallel(callback, None, 0, 0)  # 0 threads: the pool's current size
    except (OSError, AttributeError):
        return False
    return True
