"""Reading and writing ConvMixer weights: safetensors, PyTorch files (never unpickling code),
the official release files and timm state dicts."""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ConfigError, WeightsError

SAFETENSORS_SUFFIXES = (".safetensors",)
# the project's own weights, shipped in the package (model cards: pretrained/README.md)
SHIPPED = {name: Path(__file__).resolve().parent / "pretrained" / f"{name}.safetensors"
           for name in ("cifar10", "fashion_mnist")}


def shipped_weights(name) -> Path | None:
    """The path of shipped weights called ``name`` (``cifar10``, ``fashion_mnist``), else None."""
    return SHIPPED.get(name) if isinstance(name, str) else None


JSON_FIELDS = ("model_args", "classes", "mean", "std", "config")  # the rest are plain strings
TEXT_FIELDS = ("model_name", "img_size", "crop_pct", "dataset", "interpolation")


def decode_metadata(meta: dict, source) -> dict:
    """The model description in safetensors metadata (``run.RunInfo.to_metadata`` writes it), its JSON
    fields decoded; ``run.RunInfo`` checks the values."""
    try:
        d = {k: json.loads(meta[k]) for k in JSON_FIELDS if k in meta}
    except json.JSONDecodeError as e:
        raise WeightsError(f"{source} has malformed metadata ({e}): re-export it with convmixer") from None
    d.update({k: meta[k] for k in TEXT_FIELDS if meta.get(k)})
    return d


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` and rename the result over ``path``: a crash or a full disk leaves the
    previous file intact. A failure is an OSError naming ``path`` (not the temporary file)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the user's umask applies
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and (e.filename is None or os.fspath(e.filename) == os.fspath(tmp)):
            try:
                named = type(e)(e.errno, e.strerror or str(e), str(path))
            except TypeError:  # an OSError subclass with a constructor of its own
                named = OSError(e.errno, e.strerror or str(e), str(path))
            raise named from e
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` survive a power cut (where the file system supports it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_file(path, suffixes: tuple[str, ...], overwrite: bool = False) -> Path:
    """A file a command will write, checked before any work: one of ``suffixes``, not a folder, and not
    an existing file unless ``overwrite`` (a user's weights are never replaced by a slip of the keyboard)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder: give a file name, e.g. {path / ('model' + suffixes[0])}")
    if not path.name.lower().endswith(suffixes):
        raise ConfigError(f"--out {path}: end the file name with {' or '.join(suffixes)}")
    return check_new_file(path, overwrite)


def check_new_file(path: Path, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse, before any work, an existing file (unless ``overwrite``) and a place we cannot write in."""
    if path.exists() and not overwrite:
        raise ConfigError(f"{flag} {path} exists: pass --overwrite to replace it, or choose another name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders to be made: their first existing parent
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{flag} {path}: {folder} is a file, not a folder: choose another place")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {folder} (permission denied): choose another place")
    return path


def checkpoint_filter_fn(state_dict: dict) -> dict:
    """Bring foreign layouts to ours (timm's): unwrap ``{"state_dict": ...}`` / ``{"model": ...}``,
    strip ``module.`` / ``_orig_mod.`` prefixes (DDP, torch.compile), and translate the authors'
    nn.Sequential layout (``0.weight``, ``3.0.fn.0.weight``, ..., ``<depth+5>.weight``)."""
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    out = {}
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise WeightsError(f"the state dict has a key that is not a parameter name ({str(k)[:40]}): "
                               f"it does not hold a model's weights")
        k = re.sub(r"^(module\.|_orig_mod\.)+", "", k)
        out[k] = v
    if "0.weight" in out and "stem.0.weight" not in out:  # the official repo's nn.Sequential
        depth = len({int(m.group(1)) for k in out if (m := re.match(r"^(\d+)\.0\.fn", k))})
        renamed = {}
        for k, v in out.items():
            index, _, rest = k.partition(".")
            if not index.isdecimal() or not rest:  # not a layer of the Sequential: kept, reported as unexpected
                renamed[k] = v
                continue
            index = int(index)
            if index < 3:
                renamed[f"stem.{index}.{rest}"] = v
            elif index < 3 + depth:
                renamed[f"blocks.{index - 3}.{rest}"] = v
            else:
                renamed[f"head.{rest}"] = v
        out = renamed
    return out


def torch_load_safely(path: Path, error=None):
    """``torch.load(weights_only=True)`` with one-line errors: a pickle that would build arbitrary
    Python objects (and so could run code) is refused; a cut or garbage file is named as such."""
    error = error or WeightsError
    if _is_torchscript(path):  # torch.load would warn and hand it to torch.jit.load, which runs its code
        raise error(f"{path} is a TorchScript program (convmixer export --format torchscript), not weights: load it "
                    f"with torch.jit.load, or give convmixer the run's .safetensors or an .onnx export")
    import argparse
    from contextlib import nullcontext
    # timm's train.py saves its argparse.Namespace beside the weights (timm allows it the same way)
    allowed = getattr(torch.serialization, "safe_globals", None)
    try:
        with allowed([argparse.Namespace]) if allowed else nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "Unsupported global" in text:
            raise error(f"{path} was refused: it holds Python objects beyond tensors (loading it could run code); "
                        f"convert it to safetensors from a trusted copy") from None
        if "Weights only load failed" in text or "WeightsUnpickler" in text:
            raise error(f"{path} was refused: it is truncated or not a weights file, or it holds Python objects "
                        f"beyond tensors (loading those could run code)") from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise error(f"{path} is truncated or not a PyTorch weights file ({first})") from None


def _is_torchscript(path) -> bool:
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in z.namelist()[:10_000])
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def read_state_dict(path: str | os.PathLike) -> dict:
    """Tensors from a .safetensors, .pth or .pth.tar file. PyTorch files are read with
    ``weights_only=True``: a file that tries to run code is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.name.endswith(SAFETENSORS_SUFFIXES):
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{path} is not a readable safetensors file ({e}); re-download or re-export it") from None
    obj = torch_load_safely(path, WeightsError)
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return obj


def describe_mismatch(model: torch.nn.Module, state_dict: dict) -> str | None:
    """None if ``state_dict`` fits ``model`` exactly, else a short list of what does not."""
    own = model.state_dict()
    odd = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if odd:
        return f"not tensors: {', '.join(map(str, odd[:3]))}"
    own_float = {k for k, v in own.items() if v.is_floating_point()}
    dtypes = [f"{k} is {state_dict[k].dtype}" for k in own_float if k in state_dict
              and not state_dict[k].is_floating_point()]
    if dtypes:
        return f"wrong dtype (weights must be floating point): {', '.join(dtypes[:3])}"
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and hasattr(state_dict[k], "shape")
              and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    for label, items in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(parts)


def adapt_stem(state_dict: dict, model: torch.nn.Module) -> dict:
    """``state_dict`` with its patch-embedding weight (h x C x p x p) made for the model's number of input
    channels, as timm adapts a pretrained first convolution: summed over C for one channel, else tiled and
    scaled by C / channels (RGB weights for grayscale images and back). Anything else is left as it is."""
    weight, own = state_dict.get("stem.0.weight"), model.state_dict().get("stem.0.weight")
    if not (isinstance(weight, torch.Tensor) and own is not None and weight.ndim == 4 and weight.is_floating_point()
            and weight.shape[1] != own.shape[1] and weight.shape[::2] == own.shape[::2]
            and weight.shape[-1] == own.shape[-1]):
        return state_dict
    channels, wanted = weight.shape[1], own.shape[1]
    if wanted == 1:
        adapted = weight.sum(1, keepdim=True)
    else:
        adapted = weight.repeat(1, -(-wanted // channels), 1, 1)[:, :wanted] * (channels / wanted)
    return {**state_dict, "stem.0.weight": adapted}


def load_into(model: torch.nn.Module, state_dict: dict, strict: bool = True, source: str = "weights") -> list[str]:
    """Load with a message that names what does not match; returns the names left as initialised.
    ``strict=False`` is for fine-tuning: only the classifier (``head.*``) and, for another number of
    input channels, the patch-embedding weight may differ; any other mismatch is still an error."""
    state_dict = checkpoint_filter_fn(state_dict)
    problem = describe_mismatch(model, state_dict)
    if problem is not None and problem.startswith(("not tensors", "wrong dtype")):
        raise WeightsError(f"{source} cannot be used: {problem}")
    if problem is None:
        model.load_state_dict(state_dict, strict=True)
        return []
    own = model.state_dict()
    fitting = {k: v for k, v in state_dict.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    skipped = [k for k in own if k not in fitting]
    other_channels = ("stem.0.weight" in state_dict and state_dict["stem.0.weight"].ndim == 4
                      and tuple(state_dict["stem.0.weight"].shape[::2]) == tuple(own["stem.0.weight"].shape[::2]))
    replaceable = [k for k in skipped if k.startswith("head.") or (k == "stem.0.weight" and other_channels)]
    unexpected = [k for k in state_dict if k not in own and not k.startswith("head.")]
    if strict or len(replaceable) != len(skipped) or unexpected:
        hint = ""
        if "head." in problem:
            hint = (" (the classifier differs: build the model with the file's num_classes, or load with "
                    "strict=False to fine-tune a new head)")
        raise WeightsError(f"{source} do not fit this model: {problem}{hint}")
    model.load_state_dict(fitting, strict=False)
    return skipped


def save_weights(model: torch.nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write the model's state dict as safetensors (atomically). A ConvMixer also records its
    architecture (and its variant's name), so every ``convmixer`` command can rebuild it."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {}
    if isinstance(getattr(model, "model_args", None), dict):
        meta["model_args"] = json.dumps(model.model_args)
        meta["model_name"] = getattr(model, "model_name", "")
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, meta))


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with a full disk or an unwritable file raised as the OSError it is (safetensors
    reports them in its own error type)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        raise OSError(errno.EIO, (str(e).splitlines() or ["write failed"])[0], str(path)) from e


def load_weights(model: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> torch.nn.Module:
    """Load a .safetensors / .pth / .pth.tar file into ``model``; returns the model."""
    load_into(model, read_state_dict(path), strict=strict, source=str(path))
    return model


def read_metadata(path: str | os.PathLike) -> dict:
    """The string metadata stored in a safetensors file (model name and arguments, classes)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e})") from None


DOWNLOAD_STALL_SECONDS = 60  # a connection silent this long is given up (a stalled proxy or firewall)
DOWNLOAD_MAX_BYTES = 2 << 30  # the largest release file is about 200 MB


def download(url: str, filename: str | None = None) -> Path:
    """Fetch ``url`` into the torch hub cache once (``$TORCH_HOME/hub/checkpoints``), written atomically."""
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    target = directory / (filename or url.rsplit("/", 1)[-1])
    if target.is_file():
        return target
    try:
        atomic_write(target, lambda tmp: _fetch(url, tmp))
    except _Unfetched as e:
        raise WeightsError(f"could not download {url} ({e}); download it elsewhere and pass "
                           f"pretrained='path/to/{target.name}' (or put it at {target})") from None
    except OSError as e:
        full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        fix = "free space" if full else "set TORCH_HOME to a folder you can write"
        raise WeightsError(f"could not write {target} ({e.strerror or e}): {fix}") from None
    return target


class _Unfetched(Exception):
    """Why a download failed (the network's or the server's doing, not the disk's)."""


def _fetch(url: str, tmp: Path) -> None:
    """``url``'s bytes into ``tmp``, with a progress bar in a terminal. What the network or the server does wrong
    is an _Unfetched; what the disk does, the OSError it is."""
    import urllib.request
    from tqdm import tqdm
    with _network():
        response = urllib.request.urlopen(url, timeout=DOWNLOAD_STALL_SECONDS)
        size = response.headers.get("Content-Length")
        size = int(size) if size is not None else None
        if (size or 0) > DOWNLOAD_MAX_BYTES:
            raise ValueError(f"it announces {size} bytes, more than any release file")
    with response, open(tmp, "wb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                                               disable=None) as bar:
        for chunk in _body(response, size):
            f.write(chunk)
            bar.update(len(chunk))


def _body(response, size: int | None):
    """The response's bytes in chunks; given up after DOWNLOAD_STALL_SECONDS without a byte, past
    DOWNLOAD_MAX_BYTES, short of the announced ``size``, or empty."""
    with _network():
        done = 0
        while chunk := response.read(1 << 20):
            done += len(chunk)
            if done > DOWNLOAD_MAX_BYTES:
                raise ValueError(f"it sent more than {DOWNLOAD_MAX_BYTES} bytes, more than any release file")
            yield chunk
        if size is not None and done != size:
            raise ValueError(f"the connection closed after {done} of {size} bytes")
        if done == 0:
            raise ValueError("the server sent an empty file")


@contextmanager
def _network():
    """Network and server failures in the block as an _Unfetched with the reason in a few words."""
    import http.client
    import urllib.error
    try:
        yield
    except (OSError, ValueError, http.client.HTTPException) as e:
        reason = str(e) if isinstance(e, urllib.error.HTTPError) else (  # "HTTP Error 404: Not Found"
            getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__)
        raise _Unfetched(str(reason).splitlines()[0]) from None


def load_pretrained(model: torch.nn.Module, source, variant=None, adapt=()) -> None:
    """``source`` is True (download the variant's release file), a shipped name or a local file.
    ``adapt``: what the caller set explicitly, so may differ from the file: ``num_classes`` (a new classifier)
    and ``in_chans`` (the patch embedding adapted as timm does); anything else must match the file."""
    path = shipped_weights(source)
    if path is None and source is True:
        if variant is None or variant.url is None:
            raise WeightsError("this variant has no released weights; pass pretrained='path/to/weights'")
        path = download(variant.url)
    elif path is None:
        path = Path(source)
        if not path.is_file():
            raise WeightsError(f"pretrained={str(source)!r}: no such file, and not shipped weights ({', '.join(SHIPPED)}); "
                               f"pretrained=True loads the variant's released weights")
    try:
        state_dict = checkpoint_filter_fn(read_state_dict(path))
    except WeightsError as e:
        if source is not True:
            raise
        path.unlink(missing_ok=True)  # a download cut short is kept by nothing else: removed, fetched afresh next time
        raise WeightsError(f"{e}; the damaged download was removed: run again to download it afresh") from None
    if "in_chans" in adapt:
        state_dict = adapt_stem(state_dict, model)
    head_rows = state_dict.get("head.weight")
    rows = head_rows.shape[0] if isinstance(head_rows, torch.Tensor) and head_rows.ndim == 2 else None
    if rows is not None and getattr(model, "num_classes", None) not in (None, rows):
        if "num_classes" not in adapt:  # a default left as it was: never a silent random classifier
            raise WeightsError(f"{path} has a {rows}-class classifier and the model {model.num_classes} classes: pass "
                               f"num_classes={rows} to use it, or another num_classes for a new classifier")
        load_into(model, state_dict, strict=False, source=str(path))  # new classifier for fine-tuning
    else:
        load_into(model, state_dict, strict=True, source=str(path))
