"""The ``convmixer`` command: thin shells over the library functions."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from contextlib import contextmanager

EXAMPLES = """examples:
  convmixer models                                   list the named variants
  convmixer summary convmixer_1536_20                parameters, FLOPs and a timed forward pass
  convmixer train                                    the authors' CIFAR-10 recipe (ConvMixer-256/8)
  convmixer train --config fashion_mnist --epochs 1  a shipped config with an override
  torchrun --nproc_per_node=2 -m convmixer train     the same on 2 processes (DDP)
  convmixer eval --checkpoint runs/default/model.safetensors --json
  convmixer predict --checkpoint runs/default/model.safetensors cat.jpg dog.png
"""


def cmd_models(args):
    from .model import VARIANTS, count_parameters, create_model, list_models
    print(f"{'name':<28} {'h':>5} {'d':>3} {'k':>2} {'p':>3} {'act':<5} {'classes':>7} {'params':>12}  notes")
    for name in list_models(args.pattern):
        v = VARIANTS[name]
        n = count_parameters(create_model(name))
        print(f"{name:<28} {v.dim:>5} {v.depth:>3} {v.kernel_size:>2} {v.patch_size:>3} {v.act_layer:<5} "
              f"{v.num_classes:>7} {n / 1e6:>11.3f}M  {v.note}")


def cmd_summary(args):
    import time

    import torch

    from .config import RANGES, check_batch_bytes, check_range
    from .model import VARIANTS, count_parameters, create_model, flops_per_image
    check_range("--img-size", args.img_size, 1, RANGES["img_size"][1])
    check_range("--batch-size", args.batch_size, 1, 4096)
    model = create_model(args.model).eval()
    size = args.img_size or VARIANTS[args.model].input_size
    check_batch_bytes(args.batch_size, model.in_chans, size)
    x = torch.randn(args.batch_size, model.in_chans, size, size).contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    gflop = flops_per_image(model, size, size) / 1e9
    best = min(times)
    print(f"{args.model}: {count_parameters(model):,} parameters, {gflop:.3f} GFLOP per {size}x{size} image, "
          f"patch grid {size // model.patch_size}x{size // model.patch_size}")
    print(f"forward, batch {args.batch_size}, fp32 on {torch.get_num_threads()} CPU thread(s): {best * 1e3:.1f} ms "
          f"({args.batch_size / best:.1f} img/s, {gflop * args.batch_size / best:.1f} GFLOP/s)")


def _add_config_flags(parser):
    """A --flag for every config key, with its help text and default; true/false keys are also bare
    flags (--tta-flip) and --no- flags (--no-tta-flip), and still take a value (--progress false)."""
    import typing

    from .config import TrainConfig
    group = parser.add_argument_group("config keys (each also settable as key=value; see the shipped YAML files)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, dest = "--" + f.name.replace("_", "-"), "cfg_" + f.name
        text = f"{f.metadata.get('help', '')} (default: {f.default})".replace("%", "%%")
        if hints[f.name] is bool:  # _bool_flags turns "--flag false" into "--no-flag" before parsing
            group.add_argument(flag, dest=dest, action="store_const", const="true", default=argparse.SUPPRESS,
                               help=text + f"; --no-{flag[2:]} or {flag} false turns it off")
            group.add_argument("--no-" + f.name.replace("_", "-"), dest=dest, action="store_const", const="false",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            group.add_argument(flag, dest=dest, metavar=f.name.upper(), default=argparse.SUPPRESS, help=text)


def _bool_flags(argv: list[str]) -> list[str]:
    """``--flag false`` / ``--flag=yes`` for a true/false config key become ``--no-flag`` / ``--flag``,
    so a bare ``--flag`` never swallows the word after it."""
    import typing

    from .config import TrainConfig
    names = {"--" + k.replace("_", "-") for k, t in typing.get_type_hints(TrainConfig).items() if t is bool}
    words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    out, i = [], 0
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        if flag in names and not value and i + 1 < len(argv) and argv[i + 1].lower() in words:
            value, i = argv[i + 1], i + 1
        if flag in names and value:
            if value.lower() not in words:
                out.append(argv[i])  # left for the one-line error of the config check
            else:
                out.append(flag if words[value.lower()] else "--no-" + flag[2:])
        else:
            out.append(argv[i])
        i += 1
    return out


class _Parser(argparse.ArgumentParser):
    """argparse whose unknown --flags get a did-you-mean from the subcommand's own flags (as unknown key=value
    words get one from the config keys), or the list of its flags."""

    def parse_args(self, args=None, namespace=None):
        args, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(self.unknown_message(unknown, getattr(args, "command", None)))
        return args

    def unknown_message(self, unknown: list[str], command: str | None) -> str:
        import difflib
        sub = next((a.choices[command] for a in self._actions if isinstance(a, argparse._SubParsersAction)
                    and command in a.choices), self)
        known = [s for a in sub._actions for s in a.option_strings if a.help != argparse.SUPPRESS]
        where = f"convmixer {command}" if command else "convmixer"
        message = f"unrecognized arguments: {' '.join(unknown)}"
        for flag in (u.split("=", 1)[0] for u in unknown if u.startswith("--")):
            close = difflib.get_close_matches(flag, known, n=1)
            message += (f"; {flag} is not a flag of `{where}`" +
                        (f" (did you mean {close[0]}?)" if close else f" (`{where} --help` lists them)"))
        return message


def cmd_train(args):
    from pathlib import Path

    from .config import make_config, parse_overrides, read_config_file
    from .run import load_checkpoint
    from .train import resumed_config, train
    # later wins: the config file, then --key value flags, then key=value words
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    overrides.update(parse_overrides(args.overrides))
    if args.resume:  # the checkpoint's run, in its folder; what is given may only change what may change
        if args.overwrite:
            from .errors import ConfigError
            raise ConfigError("--resume continues a run and --overwrite replaces one: pass only one of them")
        from_file = {k: v for k, v in (read_config_file(args.config) if args.config else {}).items()
                     if k != "out"}  # a config's own out: is not a --out given; the run stays in its folder
        changes = {**from_file, **overrides}
        if not args.print_config:
            train(resume=args.resume, changes=changes)
            return 0
        cfg = resumed_config(load_checkpoint(args.resume, for_resume=True), Path(args.resume), changes=changes)
    else:
        cfg = make_config(args.config, overrides)
        if not args.print_config:
            train(cfg, overwrite=args.overwrite)
            return 0
    import yaml
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    return 0


def cmd_eval(args):
    from .config import RANGES, check_range
    check_range("--batch-size", args.batch_size, 1, 4096)
    check_range("--workers", args.workers, *RANGES["workers"][:2])
    if args.confusion_png:  # a name matplotlib cannot write is found now, not after the evaluation
        from .viz import check_figure_path
        check_figure_path(args.confusion_png, args.overwrite, "--confusion-png")
    with _eval_processes(args.device) as (rank, world, device):
        result, info = _evaluate_checkpoint(args, rank, world, device)
    if rank:  # under torchrun, rank 0 reports
        return 0
    if result["skipped"]:
        print(f"left out {result['skipped']} unreadable image(s)", file=sys.stderr)
    if args.confusion_png:
        from .viz import plot_confusion
        plot_confusion(result["confusion"], info.classes, args.confusion_png)
    if args.json:
        print(json.dumps(result if args.full else {k: result[k] for k in ("top1", "top5", "n", "loss", "skipped")}))
        return 0
    print(f"{result['dataset']} {result['split']}: top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
          f"loss {result['loss']:.4f}  ({result['n']} images)")
    width = max(len(c) for c in info.classes)
    print("per-class accuracy:")
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {100 * acc:6.2f}%")
    if len(info.classes) <= 20:
        print("confusion matrix (rows: true class, columns: predicted):")
        for name, row in zip(info.classes, result["confusion"]):
            print(f"  {name:<{width}} " + " ".join(f"{v:>5d}" for v in row))
    return 0


@contextmanager
def _eval_processes(device_name):
    """(rank, world size, device): under torchrun every process evaluates a share of the images on its own GPU
    (or the CPU); rank None otherwise."""
    from .runtime import pick_device, setup_distributed, under_torchrun
    if not under_torchrun():
        yield None, 1, pick_device(device_name)
        return
    if device_name:
        from .errors import ConfigError
        raise ConfigError("under torchrun each process takes its own GPU (or the CPU without one): drop --device")
    import torch.distributed as dist
    rank, world, device = setup_distributed()
    try:
        yield rank, world, device
        dist.barrier()  # every process done before any tears the group down (gloo aborted otherwise)
    finally:
        dist.destroy_process_group()


def _evaluate_checkpoint(args, rank: int | None, world: int, device):
    import torch

    from .evaluate import evaluate, load_eval_data
    from .run import load_model
    from .runtime import amp_dtype, rank_zero_first
    with rank_zero_first(rank or 0, world):  # rank 0 downloads and caches, the others read its files
        model, info = load_model(args.checkpoint)
        data, dataset, split = load_eval_data(info, args.dataset, args.data_dir, args.split, args.val_split,
                                              args.skip_bad_images)
    model.to(device).to(memory_format=torch.channels_last)
    amp = None if args.fp32 else amp_dtype("auto", device)
    result = evaluate(model, data, info, batch_size=args.batch_size, device=device, amp=amp, tta_flip=args.tta_flip,
                      tta_shift=args.tta_shift, workers=args.workers, skip_bad_images=args.skip_bad_images,
                      distributed=rank is not None)
    result.update(dataset=dataset, split=split, checkpoint=args.checkpoint)
    return result, info


def cmd_embed(args):
    from .config import check_range
    from .evaluate import embed, image_files
    from .run import load_model
    from .weights import atomic_write, check_output_file
    check_output_file(args.out, (".safetensors", ".npz"), args.overwrite)
    check_range("--batch-size", args.batch_size, 1, 4096)
    model, info = load_model(args.checkpoint)
    files = image_files(args.images)
    vectors = embed(model, info, files, args.batch_size)
    if args.out.lower().endswith(".npz"):
        import numpy as np

        def write(tmp):  # a file object: given a name, numpy would add .npz to the temporary one
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=vectors.numpy(), files=np.array(files))
        atomic_write(args.out, write)
    else:
        from .weights import save_safetensors
        atomic_write(args.out, lambda tmp: save_safetensors({"embeddings": vectors.contiguous()}, tmp,
                                                            {"files": json.dumps(files)}))
    print(f"wrote {len(files)} x {vectors.shape[1]} embeddings to {args.out}")
    return 0


def cmd_cache(args):
    from .data import cache_dir, cache_entries, clear_cache
    entries = cache_entries()
    total = sum(size for _, size in entries)
    if args.clear:
        print(f"removed {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({total / 2 ** 20:.1f} MiB) from "
              f"{cache_dir()}")
        clear_cache()
        return 0
    print(f"{cache_dir()} (set CONVMIXER_CACHE to move it): {len(entries)} entries, {total / 2 ** 20:.1f} MiB")
    for path, size in entries:
        print(f"  {size / 2 ** 20:9.1f} MiB  {path.name}")
    return 0


def cmd_predict(args):
    from .evaluate import image_files, predict
    from .run import load_model
    if str(args.checkpoint).endswith(".onnx"):
        from .export import load_onnx
        model, info = load_onnx(args.checkpoint)
    else:
        model, info = load_model(args.checkpoint)
    results = predict(model, info, image_files(args.images), top_k=args.top_k, skip_bad_images=args.skip_bad_images)
    skipped = [r for r in results if "error" in r]
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:  # a file name that is not valid UTF-8 is printed with its odd bytes escaped
            print(os.fsencode(r["file"]).decode(errors="backslashreplace"))
            for t in r.get("top", []):
                print(f"  {t['class']:<20} {100 * t['probability']:6.2f}%")
            if "error" in r:
                print("  skipped: unreadable")
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]['error']}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .run import CHECKPOINT_HELP
    parser = _Parser(prog="convmixer", description="ConvMixer (\"Patches Are All You Need?\"): "
                                     "models, training, evaluation and tools.", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("models", help="list the named model variants with their parameter counts")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'convmixer_256*'")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="parameters, FLOPs and a timed forward pass of a variant")
    p.add_argument("model", nargs="?", default="convmixer_256_8", help="a named variant (see `convmixer models`)")
    p.add_argument("--img-size", type=int, default=None, help="input size in pixels (default: the variant's)")
    p.add_argument("--batch-size", type=int, default=32, help="batch of the timed forward pass")
    p.set_defaults(func=cmd_summary)

    _add_train_parser(sub)
    _add_eval_parser(sub)

    p = sub.add_parser("predict", help="top-k classes for image files (or folders)")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads) and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="report unreadable files (in the JSON: {file, error}) and go on, instead of stopping at the first")
    p.add_argument("--json", action="store_true", help="print a JSON array: one object (file, top) per image")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("embed", help="pooled features of image files (or folders) into one .safetensors/.npz file")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="embeddings.safetensors (files in its metadata) or embeddings.npz")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("cache", help="show (or --clear) the cache of decoded images and unpacked archives")
    p.add_argument("--clear", action="store_true", help="delete what the cache made (it is rebuilt when needed); other files in its folder stay")
    p.set_defaults(func=cmd_cache)

    for name in ("bench", "export", "viz", "ablate"):
        module = _optional_command(name)
        if module is not None:
            module.add_parser(sub)
    for choice in sub._choices_actions:  # `convmixer predict --help` opens with what the command does
        command = sub.choices[choice.dest]
        command.description = command.description or choice.help[:1].upper() + choice.help[1:] + "."
    return parser


def _add_train_parser(sub) -> None:
    from .config import CONFIG_DIR, RESUME_MUTABLE
    shipped = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
    p = sub.add_parser("train", help="train a model (default: the authors' CIFAR-10 recipe)",
                       description="Train a ConvMixer. Settings come from --config (a YAML/TOML file or a "
                                   f"shipped config name: {shipped}), then from --key value flags and key=value "
                                   "words. A run owns its --out folder: a folder that holds a run is refused "
                                   "unless --overwrite, and --resume continues the checkpoint's run in its own "
                                   f"folder with its own settings (only {', '.join(RESUME_MUTABLE)} may change).")
    p.add_argument("--config", default=None, help="YAML/TOML file or shipped config name")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue the run of this checkpoint (<out>/last.pt) with its own settings and folder")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its files are deleted)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config keys as words, e.g. epochs=3 lr=0.01 (the same keys as the flags below)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)


def _add_eval_parser(sub) -> None:
    from .run import CHECKPOINT_HELP
    p = sub.add_parser("eval", help="top-1/top-5, per-class accuracy and confusion matrix of a checkpoint")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--dataset", default=None, help="default: the one the checkpoint was trained on")
    p.add_argument("--data-dir", default=None, help="where the data set lies (default: the training run's)")
    p.add_argument("--split", choices=("val", "test", "train"), default=None,
                   help="val: the run's seeded split of the training set; test: the test split (or <dir>/test)")
    p.add_argument("--val-split", type=float, default=None,
                   help="with --split val: images (or a fraction) carved from the training set (default: the run's)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch (1-4096)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: decode in this process)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--fp32", action="store_true", help="no bf16/fp16 autocast")
    p.add_argument("--tta-flip", action="store_true", help="average the predictions for each image and its mirror")
    p.add_argument("--tta-shift", type=int, default=0, metavar="PX",
                   help="also average views shifted by +-PX pixels (with --tta-flip: 6 views)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out (and count) unreadable image files instead of stopping at the first")
    p.add_argument("--json", action="store_true", help="print a JSON object with top1, top5, n, loss")
    p.add_argument("--full", action="store_true", help="with --json: also per-class accuracy and confusion matrix")
    p.add_argument("--confusion-png", default=None, help="write the confusion matrix as a PNG")
    p.add_argument("--overwrite", action="store_true", help="replace --confusion-png if it exists")
    p.set_defaults(func=cmd_eval)


def _optional_command(name):
    import importlib
    try:
        return importlib.import_module(f".{name}", __package__)
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(f"convmixer.{name}"):
            return None
        raise


def _version():
    from . import __version__
    return f"convmixer {__version__}"


def _user_error(args, message) -> int:
    print(f"convmixer {args.command}: error: {message}", file=sys.stderr)
    print("(run with --debug for the full traceback)", file=sys.stderr)
    return 2


def _show_causes(error: BaseException):
    """Undo ``raise ... from None`` along the chain, so --debug shows the original error too."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__suppress_context__ = False
        error = error.__cause__ or error.__context__


def main(argv=None) -> int:
    """The ``convmixer`` command. Called without ``argv`` (the console script, ``python -m convmixer``)
    it also tunes its own process (runtime.tune_cpu); called with ``argv`` from a program, it leaves
    that program's process as it was."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, also after the subcommand
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv[:1] + _bool_flags(argv[1:]) if argv[:1] == ["train"] else argv)
    args.debug = debug
    args.argv_echo = argv[1:]
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .errors import ConvMixerError
    if from_command_line:  # the command's own process only: importing the library changes nothing
        from .runtime import tune_cpu
        tune_cpu()
    try:
        return args.func(args) or 0
    except BrokenPipeError:  # the reader went away (convmixer eval ... | head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ConvMixerError as e:  # a problem the user can fix: one line; --debug shows where and why
        if args.debug:
            _show_causes(e)
            raise
        return _user_error(args, e)
    except OSError as e:  # a file or folder the user named cannot be read or written
        if args.debug or not e.filename:
            raise
        return _user_error(args, f"{e.filename}: {e.strerror or e}; check the path and its permissions, or free "
                                 f"space")
    except KeyboardInterrupt:
        print(f"convmixer {args.command}: interrupted", file=sys.stderr)
        return 130
