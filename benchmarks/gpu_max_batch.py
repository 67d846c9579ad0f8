"""The largest training batch that fits on the GPU, for this project's path and for timm's ConvMixer
at the same precision (bf16 autocast, channels_last): one forward + backward + AdamW step per try,
doubling and then bisecting until the out-of-memory boundary is found.

    python benchmarks/gpu_max_batch.py --model convmixer_1536_20 --img-size 224 [--limit 4096] [--json]
"""
import argparse
import json
import sys
import time

import torch
import torch.nn as nn

from convmixer.model import VARIANTS, create_model


def fits(build, batch: int, size: int, device, dtype) -> bool:
    model = None
    try:
        model = build().to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"batch {batch}: fits", file=sys.stderr, flush=True)  # a run cut short still says how far it got
        return True
    except torch.OutOfMemoryError:
        print(f"batch {batch}: out of memory", file=sys.stderr, flush=True)
        return False
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest(build, size, device, dtype, limit) -> int:
    low, high = 0, 1
    while high <= limit and fits(build, high, size, device, dtype):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > max(1, low // 32):  # within 3%
        mid = (low + high) // 2
        low, high = (mid, high) if fits(build, mid, size, device, dtype) else (low, mid)
    return low


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convmixer_1536_20")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--limit", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else None
    v = VARIANTS[args.model]
    builds = {"convmixer (default)": lambda: create_model(args.model)}
    try:
        from timm.models.convmixer import ConvMixer as TimmConvMixer
        act = nn.ReLU if v.act_layer == "relu" else nn.GELU
        builds["timm"] = lambda: TimmConvMixer(v.dim, v.depth, kernel_size=v.kernel_size, patch_size=v.patch_size,
                                               num_classes=v.num_classes, act_layer=act)
    except ImportError:
        pass
    start = time.time()
    result = {}
    for name, build in builds.items():
        print(name, file=sys.stderr, flush=True)
        result[name] = largest(build, args.img_size, device, dtype, args.limit)
    report = dict(model=args.model, img_size=args.img_size, dtype=str(dtype), device=str(device),
                  gpu=torch.cuda.get_device_name() if device.type == "cuda" else None, limit=args.limit,
                  largest_training_batch=result, seconds=round(time.time() - start, 1))
    print(json.dumps(report, indent=2) if args.json else report)


if __name__ == "__main__":
    main()
