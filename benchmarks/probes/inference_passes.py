"""Issue 15, lever 4: can inference on a CPU lose passes over memory, exactly?

    python benchmarks/probes/inference_passes.py [--model convmixer_256_8] [--img-size 32] [--images 1024]

Measures, in one process and interleaved round by round, on the same images: the modules one by one
(``fast=False``, the path before lever 4) in batches of several sizes; the same batches through the model's
CPU inference path for one tile (``ConvMixer._inference_features``: each convolution fused with its GELU by
oneDNN in fp32); and the default forward at batch 256, which picks its own tile (fastops.inference_tile).
Reports img/s (median of rounds) and the largest difference of the logits from the modules at batch 256.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from convmixer import create_model
from convmixer.runtime import tune_cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="convmixer_256_8")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--tiles", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tune_cpu()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).eval().to(memory_format=torch.channels_last)
    # trained-like statistics, so BatchNorm is not the identity
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_(0, 0.1)
    model.head.weight.data.mul_(50)  # logits of a trained model's size, not a fresh head's
    images = torch.randn(args.images, 3, args.img_size, args.img_size).contiguous(memory_format=torch.channels_last)

    plain = create_model(args.model, num_classes=10, fast=False).eval().to(memory_format=torch.channels_last)
    plain.load_state_dict(model.state_dict())
    cases = {f"modules one by one, batch {t}": (plain, t) for t in args.tiles}
    cases.update({f"fused conv+GELU, batch {t}": (lambda x: model.forward_head(model._inference_features(x)), t)
                  for t in args.tiles})
    cases["default forward, batch 256 (its own tiles)"] = (model, 256)

    def run(fn, tile):
        return torch.cat([fn(images[i:i + tile]) for i in range(0, len(images), tile)])

    with torch.inference_mode():
        reference = run(plain, 256)
        times = {name: [] for name in cases}
        errors = {}
        for name, (fn, tile) in cases.items():  # warm-up, and the exactness check
            errors[name] = (run(fn, tile) - reference).abs().max().item()
        for _ in range(args.rounds):
            for name, (fn, tile) in cases.items():
                t0 = time.perf_counter()
                run(fn, tile)
                times[name].append(time.perf_counter() - t0)
    scale = reference.abs().max().item()
    print(f"{args.model} at {args.img_size} px, {args.images} images, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| path | img/s (median of rounds) | max abs diff of logits vs the modules at batch 256 (logit scale) |")
    print("| --- | --- | --- |")
    for name in cases:
        print(f"| {name} | {args.images / statistics.median(times[name]):.4g} | {errors[name]:.2e} ({scale:.1f}) |")


if __name__ == "__main__":
    main()
