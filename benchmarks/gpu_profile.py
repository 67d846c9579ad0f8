"""Where a training step's time goes on the training device: a short run of a config (seeded subset,
one epoch, its evaluation included) under torch.profiler, after an unprofiled run that decodes and
caches the data and warms the kernels up. Prints the top operators by host time and by device time.

    python benchmarks/gpu_profile.py --config cifar10_script --data-dir gpu-data [--subset 15360] [--rows 20]
        [--set KEY=VALUE ...]   (config overrides, as `convmixer train`'s trailing KEY=VALUE)
"""
import argparse
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from convmixer.config import make_config, parse_overrides
from convmixer.train import train


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cifar10_script")
    p.add_argument("--data-dir", default="gpu-data")
    p.add_argument("--subset", type=int, default=15360)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        def run(name):
            cfg = make_config(args.config, dict(data_dir=args.data_dir, out=f"{tmp}/{name}", epochs=1,
                                                subset=args.subset, progress=False,
                                                **parse_overrides(args.set)))
            start = time.time()
            summary = train(cfg)
            return time.time() - start, summary
        warm_s, _ = run("warm")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            seconds, summary = run("profiled")
    print(f"warm-up run {warm_s:.1f} s; profiled run {seconds:.1f} s for {args.subset} images, one epoch, "
          f"train_seconds {summary['train_seconds']:.1f}")
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))
    if torch.cuda.is_available():
        print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
