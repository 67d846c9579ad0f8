"""``convmixer export``: a trained model as ONNX (checked against onnxruntime), TorchScript or
plain safetensors weights."""
from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path

import torch

from .errors import ConfigError, WeightsError


# An exported file must agree with PyTorch within this, relative to the largest logit, or it is not written.
TOLERANCE = 1e-4


def export(model, out: str | Path, fmt: str, img_size: int, opset: int = 17, check: bool = True,
           metadata: dict | None = None) -> dict:
    """Write ``model`` in ``fmt`` (onnx | torchscript | safetensors). ONNX and TorchScript use the plain
    depthwise op (the fast one only changes the backward pass), with a dynamic batch size, height and width.
    Before the file replaces ``out``, it is run (ONNX by onnxruntime, when installed) on batches of 1, 2 and
    3 images at two sizes and must match PyTorch (TOLERANCE); ``max_abs_diff`` reports the largest gap."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: give a file name, e.g. {out / ('model.' + fmt)}")
    if fmt not in ("onnx", "torchscript", "safetensors"):
        raise ConfigError(f"unknown export format {fmt!r}: choose onnx, torchscript or safetensors")
    from .weights import atomic_write
    model = copy.deepcopy(model).eval().set_fast(False)  # the caller's model keeps its mode and paths
    x = torch.randn(2, model.in_chans, img_size, img_size)
    if fmt == "safetensors":
        from .weights import save_weights
        save_weights(model, out, metadata)
        return {"path": str(out)}
    result = {"path": str(out)}
    if fmt == "torchscript":
        with torch.no_grad():
            scripted = torch.jit.trace(model, x)

        def write(tmp):
            scripted.save(tmp)
            if check:
                result["max_abs_diff"] = _verify(torch.jit.load(str(tmp)), model, img_size, fmt)
        atomic_write(out, write)
        return result
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install 'convmixer[export]'") from None
    # the TorchScript-based exporter: torch >= 2.9 defaults to the dynamo one, and torch < 2.5 has no switch
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}

    def write(tmp):
        torch.onnx.export(model, (x,), tmp, input_names=["images"], output_names=["logits"], opset_version=opset,
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
                          **legacy)
        if metadata:  # classes, mean/std, image size travel with the file (convmixer predict reads them)
            proto = onnx.load(tmp)
            for key, value in metadata.items():
                proto.metadata_props.add(key=key, value=str(value))
            onnx.save(proto, tmp)
        if check:
            try:
                result["max_abs_diff"] = _verify(OnnxModel(tmp), model, img_size, fmt)
            except ConfigError:  # no onnxruntime: written unchecked, and the caller is told so
                result["unchecked"] = "onnxruntime is not installed (pip install 'convmixer[export]')"
    atomic_write(out, write)
    return result


def _verify(exported, model, img_size: int, fmt: str) -> float:
    """The largest |difference| between ``exported`` and ``model`` on random batches of 1, 2 and 3 images at
    the traced size and one patch larger (the dynamic axes); above TOLERANCE the export is refused."""
    from .errors import ModelError
    worst = 0.0
    for n, size in ((2, img_size), (1, img_size), (3, img_size + model.patch_size)):
        x = torch.randn(n, model.in_chans, size, size)
        with torch.no_grad():
            expected = model(x)
            got = exported(x)
        gap = (got.float() - expected).abs().max().item() if got.shape == expected.shape else math.inf
        if not gap <= TOLERANCE * max(1.0, expected.abs().max().item()):  # NaN included
            raise ModelError(f"the {fmt} export gives {tuple(got.shape)} outputs differing from PyTorch's by {gap:.3g} "
                             f"on a batch of {n} at {size} px: nothing was written; export with --format safetensors, "
                             f"or report this with your torch version ({torch.__version__})")
        worst = max(worst, gap)
    return worst


class OnnxModel:
    """An exported ``.onnx`` file run by onnxruntime, with the little of a module's interface that
    ``evaluate.predict`` uses (``convmixer predict --checkpoint model.onnx``)."""

    def __init__(self, path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("running an .onnx file needs onnxruntime: pip install 'convmixer[export]'") from None
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise WeightsError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:200]})") from e
        self.in_chans = self.session.get_inputs()[0].shape[1]

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"images": x.float().numpy()})[0])


def load_onnx(path):
    """An exported model and the RunInfo stored in its metadata."""
    from .run import RunInfo
    model = OnnxModel(path)
    meta = dict(model.session.get_modelmeta().custom_metadata_map)
    return model, RunInfo.from_metadata(meta, path)


SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts"), "safetensors": (".safetensors",)}


def cmd_export(args):
    from .run import load_model
    from .weights import check_output_file
    check_output_file(args.out, SUFFIXES[args.format], args.overwrite)
    model, info = load_model(args.checkpoint)
    from .config import RANGES, check_range
    check_range("--img-size", args.img_size, model.patch_size, RANGES["img_size"][1])
    result = export(model, args.out, args.format, args.img_size or info.img_size, metadata=info.to_metadata())
    line = f"wrote {result['path']}"
    if "max_abs_diff" in result:
        line += f" (max |difference| from PyTorch on test batches: {result['max_abs_diff']:.2e})"
    if "unchecked" in result:
        line += f" (not checked: {result['unchecked']})"
    print(line)
    return 0


def add_parser(sub):
    p = sub.add_parser("export", help="ONNX (checked with onnxruntime), TorchScript or safetensors")
    from .run import CHECKPOINT_HELP
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--format", choices=("onnx", "torchscript", "safetensors"), default="onnx", help="file format")
    p.add_argument("--out", required=True, help="the file to write: .onnx, .pt (TorchScript) or .safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size of the traced graph (default: the size the model was trained at)")
    p.set_defaults(func=cmd_export)
