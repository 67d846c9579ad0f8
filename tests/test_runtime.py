"""Process state and module structure: importing the library changes nothing in the user's process,
the convmixer command tunes its own, and the package's modules import without a circle."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Observes both settings from inside a process: subnormals flushed in torch's worker threads (a
# parallel multiply of subnormals gives zeros), and freed large blocks kept by glibc (resident memory
# stays up after free; stock glibc unmaps them).
PROBE = """
import ctypes, os, sys
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def state():
    import torch
    x = torch.full((1 << 22,), 1e-39)
    ftz = bool(((x * 1.0) == 0).all())
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = rss()
    p = libc.malloc(256 << 20)
    ctypes.memset(p, 1, 256 << 20)
    libc.free(p)
    return ftz, rss() - before > (128 << 20)
import torch
torch.set_num_threads(2)
mode = sys.argv[1]
if mode == "late":
    (torch.randn(1 << 20) * 2).sum()  # torch's thread pool is running before tuning
import convmixer
if mode in ("tune", "late"):
    convmixer.tune_cpu()
if mode == "cli":
    from convmixer.cli import main
    sys.argv = ["convmixer", "models", "no_such_pattern"]
    main()
if mode == "cli-api":
    from convmixer.cli import main
    main(["models", "no_such_pattern"])
print(*state())
"""


def _probe(mode, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CONVMIXER_NO_", "MALLOC_"))}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                         env={**clean, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-2:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_import_changes_nothing_and_the_command_tunes_itself():
    assert _probe("import") == ["False", "False"]       # import convmixer: stock flags and allocator
    assert _probe("tune") == ["True", "True"]           # convmixer.tune_cpu(): both applied
    assert _probe("late") == ["True", "True"]           # also reaches worker threads already running
    assert _probe("cli") == ["True", "True"]            # the convmixer command applies both to itself
    assert _probe("cli-api") == ["False", "False"]      # cli.main(argv) called from a program does not
    assert _probe("tune", CONVMIXER_NO_FTZ="1", CONVMIXER_NO_MALLOPT="1") == ["False", "False"]


def _imports(path: Path, package: str) -> set[str]:
    """The package modules a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            found.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith(package + "."))
    return found


def test_no_import_circle_between_modules():
    root = Path(__file__).resolve().parent.parent / "convmixer"
    modules = {p.stem for p in root.glob("*.py")} - {"__init__", "__main__"}
    graph = {m: _imports(root / f"{m}.py", "convmixer") & modules for m in modules}
    assert graph["evaluate"] and "train" not in graph["evaluate"]

    def visit(node, path):
        assert node not in path, "import circle: " + " -> ".join(path[path.index(node):] + [node])
        for nxt in graph[node]:
            visit(nxt, path + [node])
    for m in sorted(modules):
        visit(m, [])


def test_auto_amp_on_a_gpu_is_bf16_only_where_it_is_native(monkeypatch):
    """torch.cuda.is_bf16_supported() is True on a T4 or V100 too (emulated): there fp16 with GradScaler."""
    import torch

    from convmixer.runtime import amp_dtype
    for capability, dtype in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert amp_dtype("auto", torch.device("cuda")) == dtype
