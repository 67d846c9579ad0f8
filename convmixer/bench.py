"""``convmixer bench``: training and inference throughput of this project's default path against
timm's ConvMixer (eager fp32, as users run it) and a plain PyTorch reference (the authors' nn.Sequential
ConvMixer), interleaved in one process on the same machine, medians after warm-up, with achieved
GFLOP/s against a matmul peak measured in the same run."""
from __future__ import annotations

import json
import platform
import resource
import statistics
import time

import torch
import torch.nn as nn

from .errors import ConfigError
from .fastops import set_allocator_tuned, trim_allocator
from .model import VARIANTS, create_model, flops_per_image
from .runtime import amp_dtype, peak_resident_mib, physical_memory, pick_device, resident_mib


def reference_convmixer(dim, depth, kernel_size, patch_size, num_classes, in_chans=3, act=nn.GELU):
    """The authors' published definition, verbatim in structure (nn.Sequential, plain nn.Conv2d)."""
    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x) + x
    return nn.Sequential(
        nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size), act(), nn.BatchNorm2d(dim),
        *[nn.Sequential(Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), act(),
                                               nn.BatchNorm2d(dim))),
                        nn.Conv2d(dim, dim, kernel_size=1), act(), nn.BatchNorm2d(dim)) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, num_classes))


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Achievable GFLOP/s of a large square matmul on this machine now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times) / 1e9


class Candidate:
    """One way of running the model: how it is built, its dtype, layout and allocator setting."""

    def __init__(self, name, build, amp=None, channels_last=False, allocator=False, compile=False):
        self.name, self.build, self.amp, self.channels_last = name, build, amp, channels_last
        self.allocator, self.compile = allocator, compile
        self.train_times, self.infer_times, self.latency_times = [], [], []

    def prepare(self, device):
        torch.manual_seed(0)
        self.model = self.build().to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, foreach=True)
        self.eval_model = self.train_model = torch.compile(self.model) if self.compile else self.model

    def _input(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def _autocast(self, device):
        return torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def train_step(self, x, y, device):
        set_allocator_tuned(self.allocator)
        self.model.train()
        x = self._input(x)
        t = time.perf_counter()
        with self._autocast(device):
            loss = nn.functional.cross_entropy(self.train_model(x).float(), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t

    @torch.no_grad()
    def infer(self, x, device):
        set_allocator_tuned(self.allocator)
        self.model.eval()
        x = self._input(x)
        t = time.perf_counter()
        with self._autocast(device):
            self.eval_model(x)
        _sync(device)
        return time.perf_counter() - t


def step_peak_mib(step, device) -> tuple[float, float] | None:
    """(peak, peak over what was held before) in MiB while ``step()`` runs: on a GPU the allocator's
    peak counter; on Linux the process's resident high-water mark (VmHWM), reset through
    /proc/self/clear_refs after glibc has returned its free memory (malloc_trim), so each candidate
    is measured from the memory all of them hold and not from what an earlier one left. None where
    neither is available."""
    if device.type == "cuda":  # the device's own counters: cuda:1 is not the current device
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
        step()
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
        return peak, peak - before
    try:
        trim_allocator()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = resident_mib()
        step()
        peak = peak_resident_mib()
        return peak, peak - before
    except (OSError, TypeError):  # no /proc (None from the readers)
        return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DEFAULT = "convmixer (default)"
BASELINES = ("timm eager fp32", "plain PyTorch fp32")  # the ratios' baseline: the first one measured


def candidates(model_name: str, device: torch.device, include_timm: bool = True) -> list[Candidate]:
    v = VARIANTS[model_name]
    kwargs = dict(dim=v.dim, depth=v.depth, kernel_size=v.kernel_size, patch_size=v.patch_size,
                  num_classes=v.num_classes)
    act = nn.ReLU if v.act_layer == "relu" else nn.GELU
    fast_dtype = amp_dtype("auto", device)
    out = [Candidate(DEFAULT, lambda: create_model(model_name), amp=fast_dtype, channels_last=True,
                     allocator=True)]
    if include_timm:
        try:
            from timm.models.convmixer import ConvMixer as TimmConvMixer
            out.append(Candidate("timm eager fp32", lambda: TimmConvMixer(**kwargs, act_layer=act)))
            # the best a timm user would run: the same autocast and memory layout as ours
            label = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[fast_dtype]
            out.append(Candidate(f"timm {label} channels_last",
                                 lambda: TimmConvMixer(**kwargs, act_layer=act), amp=fast_dtype, channels_last=True))
        except ImportError:
            pass
    out.append(Candidate("plain PyTorch fp32", lambda: reference_convmixer(**kwargs, act=act)))
    return out


def breakdown(model_name: str, device: torch.device) -> list[Candidate]:
    """The default path with one speed-up taken away at a time: what each one is worth."""
    fast_dtype = amp_dtype("auto", device)
    return [
        Candidate("- allocator setting", lambda: create_model(model_name), amp=fast_dtype, channels_last=True),
        Candidate("- fast dw/pw bwd", lambda: _without_fast_backward(create_model(model_name)), amp=fast_dtype,
                  channels_last=True, allocator=True),
        Candidate("- bf16 (fp32)", lambda: create_model(model_name), channels_last=True, allocator=True),
        Candidate("- channels_last", lambda: create_model(model_name), amp=fast_dtype, allocator=True),
        Candidate("- inference tiles+fusion", lambda: _without_inference_path(create_model(model_name)), amp=fast_dtype,
                  channels_last=True, allocator=True),
    ]


def _without_inference_path(model: nn.Module) -> nn.Module:
    model.fast = False  # the model's own switch: the CPU inference path; the depthwise modules keep theirs
    return model


def _without_fast_backward(model: nn.Module) -> nn.Module:
    model.set_fast(False)  # plain nn.Conv2d for the depthwise and pointwise layers ...
    model.fast = True  # ... while the CPU inference path stays on
    return model


def run_benchmark(model_name="convmixer_256_8", img_size=None, batch_size=128, infer_batch_size=256,
                  steps=10, warmup=3, device=None, include_timm=True, extra=(), with_breakdown=False,
                  with_compile=False) -> dict:
    device = pick_device(device)
    img_size = _check_args(model_name, img_size, batch_size, infer_batch_size, steps, warmup, device)
    cudnn_benchmark = torch.backends.cudnn.benchmark
    try:  # the caller's random state and cuDNN setting are theirs again afterwards
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.backends.cudnn.benchmark = device.type == "cuda"
            return _benchmark(model_name, img_size, batch_size, infer_batch_size, steps, warmup, device,
                              include_timm, extra, with_breakdown, with_compile)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark


def _benchmark(model_name, img_size, batch_size, infer_batch_size, steps, warmup, device, include_timm, extra,
               with_breakdown, with_compile) -> dict:
    cands = candidates(model_name, device, include_timm) + list(extra)
    if with_breakdown:
        cands += breakdown(model_name, device)
    if with_compile:  # ours, and timm as its best user would run it (our autocast and layout)
        cands += [Candidate(c.name + " compiled", c.build, amp=c.amp, channels_last=c.channels_last,
                            allocator=c.allocator, compile=True) for c in list(cands)
                  if c.name == DEFAULT or c.name.startswith("timm") and c.channels_last]
    for c in cands:
        c.prepare(device)
    peak_memory = _measure(cands, model_name, img_size, batch_size, infer_batch_size, steps, warmup, device)
    set_allocator_tuned(True)
    flop = flops_per_image(create_model(model_name), img_size, img_size)
    peaks = {}
    if device.type == "cpu":
        peaks = {"fp32": matmul_peak(torch.float32)}
        if amp_dtype("auto", device) == torch.bfloat16:  # without bf16 hardware its matmul is emulated: minutes
            peaks["bf16"] = matmul_peak(torch.bfloat16)
    rows = _rows(cands, peak_memory, peaks, flop, batch_size, infer_batch_size)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(model=model_name, img_size=img_size, batch_size=batch_size, infer_batch_size=infer_batch_size,
                steps=steps, warmup=warmup, device=str(device), gpu=gpu, threads=torch.get_num_threads(),
                gflop_per_image=flop / 1e9, matmul_peak_gflops=peaks, torch=torch.__version__,
                cpu=_cpu_name(), python=platform.python_version(), date=time.strftime("%Y-%m-%d"),
                # per candidate: peak_memory_mb (resident on a CPU, allocated on a GPU) and step_memory_mb
                process_max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, results=rows)


def _check_args(model_name, img_size, batch_size, infer_batch_size, steps, warmup, device) -> int:
    """One-line errors for bad benchmark settings; returns the image size (the variant's when not given)."""
    if model_name not in VARIANTS:
        from .model import model_kwargs
        model_kwargs(model_name)  # a one-line "unknown model ... did you mean" error
    from .config import RANGES, check_batch_bytes, check_range
    check_range("--img-size", img_size, 1, RANGES["img_size"][1])
    for name, value in (("--batch-size", batch_size), ("--infer-batch-size", infer_batch_size)):
        check_range(name, value, 1, 65536)
    check_range("--steps", steps, 1, 100_000)
    check_range("--warmup", warmup, 0, 100_000)
    img_size = img_size or VARIANTS[model_name].input_size
    check_batch_bytes(max(batch_size, infer_batch_size), 3, img_size)
    _check_training_memory(model_name, img_size, batch_size, device)
    return img_size


def _check_training_memory(model_name, img_size, batch_size, device):
    """A training step keeps about six block-sized float tensors per block for the backward pass: a batch
    whose estimate exceeds the device's whole memory is refused, not left to the out-of-memory killer."""
    v = VARIANTS[model_name]
    need = 6 * 4 * batch_size * v.depth * v.dim * max(img_size // v.patch_size, 1) ** 2
    have = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else physical_memory()
    if need > have:
        raise ConfigError(f"a training step of {model_name} at batch {batch_size} and {img_size} px keeps about "
                          f"{need / 2 ** 30:.0f} GiB of activations, more than the {have / 2 ** 30:.0f} GiB of "
                          f"{device.type.upper()} memory here: lower --batch-size or --img-size")


def _measure(cands, model_name, img_size, batch_size, infer_batch_size, steps, warmup, device) -> dict:
    """Times every candidate's training step, batch inference and single-image latency, interleaved so that
    each sees the same machine state (into its *_times lists); returns each one's peak memory of a step."""
    g = torch.Generator().manual_seed(0)
    num_classes = VARIANTS[model_name].num_classes
    x_train = torch.randn(batch_size, 3, img_size, img_size, generator=g).to(device)
    y_train = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    x_infer = torch.randn(infer_batch_size, 3, img_size, img_size, generator=g).to(device)
    x_one = x_infer[:1]
    for _ in range(warmup):
        for c in cands:
            c.train_step(x_train, y_train, device)
            c.infer(x_infer, device)
            c.infer(x_one, device)
    for _ in range(steps):
        for c in cands:
            c.train_times.append(c.train_step(x_train, y_train, device))
            c.infer_times.append(c.infer(x_infer, device))
            c.latency_times.append(c.infer(x_one, device))
    peak_memory = {}
    for c in cands:  # one more training step per candidate, with the peak counter reset
        peak = step_peak_mib(lambda: c.train_step(x_train, y_train, device), device)
        if peak is not None:
            peak_memory[c.name] = peak
    return peak_memory


def _rows(cands, peak_memory, peaks, flop, batch_size, infer_batch_size) -> list[dict]:
    """One result row per candidate (medians, GFLOP/s, share of the matmul peak), with its ratio to the baseline
    row (timm eager fp32, or plain PyTorch fp32 without timm)."""
    rows = []
    for c in cands:
        train_s, infer_s = statistics.median(c.train_times), statistics.median(c.infer_times)
        row = dict(name=c.name, amp=str(c.amp).replace("torch.", "") if c.amp else "fp32",
                   channels_last=c.channels_last, allocator_tuned=c.allocator,
                   train_images_per_second=batch_size / train_s,
                   infer_images_per_second=infer_batch_size / infer_s,
                   latency_ms=1e3 * statistics.median(c.latency_times),
                   train_gflops=3 * flop * batch_size / train_s / 1e9,
                   infer_gflops=flop * infer_batch_size / infer_s / 1e9)
        if c.name in peak_memory:
            row["peak_memory_mb"], row["step_memory_mb"] = peak_memory[c.name]
        peak = peaks.get("bf16" if c.amp == torch.bfloat16 else "fp32")
        if peak:
            row["train_share_of_peak"] = row["train_gflops"] / peak
            row["infer_share_of_peak"] = row["infer_gflops"] / peak
        rows.append(row)
    base = next(r for r in rows if r["name"] in BASELINES)  # timm eager when timm is there, else plain PyTorch
    # like for like: against timm run with the same autocast dtype and memory layout, where it was measured
    same = {(r["amp"], r["channels_last"]): r for r in rows if r["name"].startswith("timm ")}
    for r in rows:
        r["train_ratio_vs_" + base["name"].split()[0]] = r["train_images_per_second"] / base["train_images_per_second"]
        r["infer_ratio_vs_" + base["name"].split()[0]] = r["infer_images_per_second"] / base["infer_images_per_second"]
        twin = same.get((r["amp"], r["channels_last"]))
        if twin is not None and not r["name"].startswith("timm "):
            r["train_ratio_vs_timm_same_settings"] = r["train_images_per_second"] / twin["train_images_per_second"]
            r["infer_ratio_vs_timm_same_settings"] = r["infer_images_per_second"] / twin["infer_images_per_second"]
    return rows


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def format_table(report: dict) -> str:
    rows = report["results"]
    ratio_key = next(k for k in rows[0] if k.startswith("train_ratio"))
    lines = [f"{report['model']} at {report['img_size']}px on {report['device']} ({report['cpu'] if not report['gpu'] else report['gpu']}, "
             f"{report['threads']} threads, torch {report['torch']}); train batch {report['batch_size']}, "
             f"inference batch {report['infer_batch_size']}; medians of {report['steps']} interleaved steps",
             f"{'path':<24} {'amp':>5} {'train img/s':>11} {'x':>5} {'infer img/s':>11} {'x':>5} {'lat ms':>7} "
             f"{'train GF/s':>10} {'%peak':>6} {'infer GF/s':>10} {'%peak':>6}"]
    for r in rows:
        lines.append(f"{r['name']:<24} {r['amp']:>5} {r['train_images_per_second']:>11.1f} {r[ratio_key]:>5.2f} "
                     f"{r['infer_images_per_second']:>11.1f} {r[ratio_key.replace('train', 'infer')]:>5.2f} "
                     f"{r['latency_ms']:>7.2f} {r['train_gflops']:>10.1f} {100 * r.get('train_share_of_peak', 0):>5.1f}% "
                     f"{r['infer_gflops']:>10.1f} {100 * r.get('infer_share_of_peak', 0):>5.1f}%")
    where = "GPU allocated" if report["gpu"] else "resident"
    lines.append(f"process peak resident memory: {report['process_max_rss_mb']:.0f} MiB; peak {where} in one training "
                 f"step (of which the step's own):")
    lines += [f"  {r['name']:<24} {r['peak_memory_mb']:>8.0f} MiB ({r['step_memory_mb']:.0f})" for r in rows
              if "peak_memory_mb" in r]
    default = rows[0]
    if "train_ratio_vs_timm_same_settings" in default:
        lines.append(f"{default['name']} against timm with the same autocast ({default['amp']}) and memory layout: "
                     f"training {default['train_ratio_vs_timm_same_settings']:.2f}x, inference "
                     f"{default['infer_ratio_vs_timm_same_settings']:.2f}x")
    if report["matmul_peak_gflops"]:
        lines.append("matmul peak measured now: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["matmul_peak_gflops"].items()))
    return "\n".join(lines)


def cmd_bench(args):
    report = run_benchmark(args.model, args.img_size, args.batch_size, args.infer_batch_size, args.steps,
                           args.warmup, args.device, include_timm=not args.no_timm, with_breakdown=args.breakdown,
                           with_compile=args.compile)
    report["command"] = "convmixer bench " + " ".join(args.argv_echo)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0


def add_parser(sub):
    p = sub.add_parser("bench", help="throughput of this project's path vs timm and plain PyTorch, side by side")
    p.add_argument("--model", default="convmixer_256_8", help="a named variant (see `convmixer models`)")
    p.add_argument("--img-size", type=int, default=None, help="input size in pixels (default: the variant's)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--infer-batch-size", type=int, default=256, help="inference batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps per candidate (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per candidate first")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--no-timm", action="store_true", help="leave timm out (it is a test-only dependency)")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile'd candidates (ours and timm with our autocast and layout)")
    p.add_argument("--breakdown", action="store_true",
                   help="also the default path with each speed-up taken away in turn")
    p.add_argument("--json", action="store_true", help="print the report as JSON (machine, versions, every candidate)")
    p.set_defaults(func=cmd_bench)
