"""Data sets and input pipelines.

Small data sets (CIFAR, (Fashion-)MNIST, image folders of same-size images) are decoded once into
one uint8 tensor (N, C, H, W), cached on disk as safetensors, so an epoch never decodes an image
again; large folders (ImageNet layout) are decoded on the fly in DataLoader workers. Both feed the
same per-image torchvision.transforms.v2 pipeline; mixup/CutMix run on whole batches.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import pickle
import re
import struct
import sys
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2

# what decode() makes of a file: raised when that changes (EXIF orientation, 16-bit scaling, ...), so that no
# cache of decoded images made before is served
DECODE_VERSION = 2
MAX_ASPECT = 8  # evaluation: of an image longer than 8:1, the central 8:1 (crop_long_side)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DATASETS = ("cifar10", "cifar100", "fashion_mnist", "mnist", "imagefolder")
STATS = {  # per-channel mean/std of the training images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


from .errors import ConfigError, DataError


@dataclass
class ImageData:
    """A labelled image set: either decoded (``images`` uint8 N x C x H x W) or ``files`` to decode."""
    labels: torch.Tensor
    classes: list[str]
    images: torch.Tensor | None = None
    files: list[str] | None = None
    channels: int = 3
    dropped: int = 0  # unreadable files left out when decoding with skip_bad (counted in evaluate's "skipped")
    origin: torch.Tensor | None = None  # after such drops: each image's index among the files scanned

    def __len__(self):
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageData":
        return ImageData(self.labels[index], self.classes,
                         None if self.images is None else self.images[index],
                         None if self.files is None else [self.files[i] for i in index.tolist()], self.channels)

    def with_channels(self, channels: int) -> "ImageData":
        """The same images as grayscale (1) or RGB (3): a grayscale model evaluated on RGB image files, or the
        other way round. Grayscale is Pillow's own conversion (ITU-R 601-2 luma)."""
        if channels == self.channels:
            return self
        if channels not in (1, 3):
            raise DataError(f"images are read as grayscale or RGB, not {channels} channels: evaluate this model "
                            f"from Python on tensors you build")
        images = self.images
        if images is not None:
            images = (v2.functional.rgb_to_grayscale(images) if channels == 1
                      else images.expand(-1, 3, -1, -1).contiguous())
        return ImageData(self.labels, self.classes, images, self.files, channels, self.dropped)


# --- readers -------------------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's python pickles hold only numpy arrays, lists and strings: refuse anything else, so a
    doctored file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def _read_cifar_batch(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
        data = torch.as_tensor(entry["data"])
        labels = torch.as_tensor(entry[label_key], dtype=torch.long)
    except FileNotFoundError:
        raise DataError(f"missing CIFAR file {path}") from None
    except Exception as e:
        raise DataError(f"{path} is not a valid CIFAR batch file ({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{path} has the wrong shape {tuple(data.shape)} (expected N x 3072 with N labels)")
    return data.view(-1, 3, 32, 32).to(torch.uint8), labels


def _check_labels(labels: torch.Tensor, classes: list, source) -> torch.Tensor:
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{source} has labels {labels.min().item()}..{labels.max().item()} but there are "
                        f"{len(classes)} classes: the file is corrupt, download it again")
    return labels


def read_cifar(root: Path, train: bool, hundred: bool) -> ImageData:
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    if hundred:
        images, labels = _read_cifar_batch(folder / ("train" if train else "test"), "fine_labels")
        try:
            with open(folder / "meta", "rb") as f:
                classes = _ArrayUnpickler(f, encoding="latin1").load()["fine_label_names"]
        except FileNotFoundError:
            raise DataError(f"missing CIFAR file {folder / 'meta'}: download CIFAR-100 again") from None
        except Exception as e:  # truncated, another pickle, or one that names other objects
            raise DataError(f"{folder / 'meta'} is not CIFAR-100's class list ({type(e).__name__}: {e}): download "
                            f"CIFAR-100 again") from None
    else:
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        parts = [_read_cifar_batch(folder / n, "labels") for n in names]
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        classes = CIFAR10_CLASSES
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{folder / 'meta'} does not hold a list of class names: download CIFAR-100 again")
    return ImageData(_check_labels(labels, classes, folder), list(classes), images=images)


MAX_IDX_BYTES = 1 << 30  # what an IDX header may promise (MNIST's largest file holds 47 MB)


def _read_idx(path: Path) -> torch.Tensor:
    """An unsigned-byte IDX file (.gz or not): the header is checked before its data is read, so a damaged
    or crafted file cannot make us decompress or allocate more than the header promises (and that is bounded)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\0\0\x08":
                raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
            ndim = head[3]
            dims_raw = f.read(4 * ndim)
            if not 1 <= ndim <= 4 or len(dims_raw) < 4 * ndim:
                raise DataError(f"{path} has an impossible IDX header ({ndim} dimensions): the file is corrupt")
            dims = struct.unpack(f">{ndim}I", dims_raw)
            size = math.prod(dims)
            if size > MAX_IDX_BYTES:
                raise DataError(f"{path}: its header promises {size} bytes of images ({dims}): the file is corrupt")
            raw = f.read(size + 1)  # one byte more tells a file longer than its header says
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} cannot be read ({e})") from None
    if len(raw) != size:
        raise DataError(f"{path} has {4 + 4 * ndim + len(raw)}{'+' if len(raw) > size else ''} bytes but its header "
                        f"promises {4 + 4 * ndim + size}: the file is truncated or corrupt, download it again")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(*dims)


def _find_idx(root: Path, fashion: bool, stem: str) -> Path:
    """The IDX file ``stem`` (or ``stem.gz``) in torchvision's layout or a folder named after the set; the
    two sets share their file names, so ``root`` itself is searched only when its name is not the other set's."""
    name = root.name.lower()
    fashion_name = "fashion" in name or name.startswith("fmnist")
    other = name.startswith("mnist") and not fashion_name if fashion else fashion_name
    folders = ("FashionMNIST", "fashionmnist", "fashion-mnist", "fashion_mnist") if fashion else ("MNIST", "mnist")
    for base in [root / folders[0] / "raw", *(root / f for f in folders), *([] if other else [root])]:
        for file in (stem, stem + ".gz"):
            if (base / file).is_file():
                return base / file
    raise FileNotFoundError(stem)


def read_mnist(root: Path, train: bool, fashion: bool) -> ImageData:
    folder = "FashionMNIST" if fashion else "MNIST"
    prefix = "train" if train else "t10k"
    images = _read_idx(_find_idx(root, fashion, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(root, fashion, f"{prefix}-labels-idx1-ubyte")).long()
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{folder} {prefix}: {len(images)} images but {len(labels)} labels")
    classes = FASHION_CLASSES if fashion else [str(i) for i in range(10)]
    labels = _check_labels(labels, classes, f"{folder} {prefix} labels")
    return ImageData(labels, classes, images=images.unsqueeze(1).contiguous(), channels=1)


def scan_folder(root: Path, skip_bad: bool = False) -> ImageData:
    """An ImageFolder tree: ``root/<class>/<image>``; class folders sorted by name. Only regular
    files are read: a FIFO, a socket, a broken or looping link with an image name is an error (or,
    with ``skip_bad``, skipped and counted), never opened."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders: expected {root}/<class>/<image files>")
    files, labels, empty, odd = [], [], [], []
    for index, name in enumerate(classes):
        named = [p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        odd += [str(p) for p in named if not p.is_file() and not p.is_dir()]
        found = sorted(str(p) for p in named if p.is_file())
        if not found:
            empty.append(name)
        files += found
        labels += [index] * len(found)
    if empty:
        raise DataError(f"class folder(s) with no images in {root}: {', '.join(empty[:5])}; remove them or add images")
    if odd and not skip_bad:
        raise DataError(f"{odd[0]} is not a regular file (a broken or looping link, a FIFO or a device"
                        f"{f'; {len(odd) - 1} more' if len(odd) > 1 else ''}): remove it or pass --skip-bad-images")
    if odd:
        print(f"skipped {len(odd)} entr{'y' if len(odd) == 1 else 'ies'} that are not regular files, e.g. {odd[0]}",
              file=sys.stderr)
    return ImageData(torch.tensor(labels, dtype=torch.long), classes, files=files)


def first_image(data: ImageData, skip_bad: bool = False) -> torch.Tensor:
    """The first readable image of a file list (with ``skip_bad``, unreadable ones are passed over)."""
    for path in data.files:
        try:
            return decode(path, data.channels)
        except DataError:
            if not skip_bad:
                raise
    raise DataError("no readable images")


def decode(path: str, channels: int = 3) -> torch.Tensor:
    """One image file as uint8 C x H x W (RGB, or grayscale when channels == 1), turned upright by its EXIF
    orientation; any mode, bit depth or alpha is converted. Unreadable files raise DataError naming the file."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):  # a FIFO or a device would block or never end; a folder is not an image
        raise DataError(f"cannot read image {path}: {'no such file' if not os.path.exists(path) else 'not a regular file'}")
    try:
        with Image.open(path) as im:
            im.load()
            im = _upright(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grayscale, float: scale, don't clip
                import numpy as np
                a = np.asarray(im, dtype=np.float64)
                if not np.isfinite(a).all():
                    raise ValueError("it holds NaN or infinite pixel values")
                if im.mode == "F":  # [0, 1] images as they are, any other range stretched to it
                    low, high = (0.0, 1.0) if a.min() >= 0 and a.max() <= 1 else (a.min(), max(a.max(), a.min() + 1e-12))
                    a = (a - low) / (high - low) * 255.0
                else:
                    a = a * 255.0 / (65535.0 if im.mode.startswith("I;16") else max(a.max(), 1.0))
                im = Image.fromarray(a.clip(0, 255).round().astype("uint8"))
            im = im.convert("L" if channels == 1 else "RGB")
            return v2.functional.pil_to_tensor(im)
    except Image.DecompressionBombError:
        raise DataError(f"cannot read image {path}: it has more pixels than Pillow's guard against decompression "
                        f"bombs allows ({2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP): downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def _upright(im):
    """The image as it is meant to be seen: a camera's EXIF orientation (a phone photo taken upright is
    stored sideways) applied; a damaged EXIF block leaves the pixels as stored."""
    from PIL import ImageOps
    try:
        if im.getexif().get(0x0112, 1) == 1:  # upright already (exif_transpose would copy the pixels anyway)
            return im
        return ImageOps.exif_transpose(im)
    except Exception:  # Pillow raises many kinds of errors on malformed EXIF; orientation is only a hint
        return im


# --- data sets by name ---------------------------------------------------------------------------
# what the cache makes, and the temporaries a killed write leaves: the only names `convmixer cache` lists and
# --clear deletes, whatever else the folder holds (decoded image sets are files, unpacked archives folders)
CACHE_FILES = re.compile(r"\.?images-[0-9a-f]{20}\.safetensors(\.[A-Za-z0-9_]+\.tmp)?")
CACHE_FOLDERS = re.compile(r"\.?[^/]+-[0-9a-f]{16}(\.[A-Za-z0-9_]+)?")


def cache_dir() -> Path:
    value = os.environ.get("CONVMIXER_CACHE")
    if value is not None and not value.strip():  # Path("") is the current folder
        raise DataError("CONVMIXER_CACHE is set but empty: unset it or name a folder")
    path = Path(value).expanduser() if value else Path.home() / ".cache" / "convmixer"
    if path.exists() and not path.is_dir():
        raise DataError(f"the cache folder {path} is a file: remove it or set CONVMIXER_CACHE to a folder")
    return path


def cache_entries() -> list[tuple[Path, int]]:
    """What the cache holds (decoded image sets, unpacked archives) and the bytes of each; other files in
    the folder are not the cache's and are left out."""
    root = cache_dir()
    if not root.is_dir():
        return []
    sizes = lambda p: p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    ours = lambda p: not p.is_symlink() and (CACHE_FILES if p.is_file() else CACHE_FOLDERS).fullmatch(p.name)
    return [(p, sizes(p)) for p in sorted(root.iterdir()) if ours(p)]


def clear_cache() -> int:
    """Delete what the cache made; returns the bytes freed."""
    import shutil
    freed = 0
    for path, size in cache_entries():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        freed += size
    return freed


class MixedSizes(DataError):
    """The images of a folder that was to be decoded into one tensor do not share one size."""

    def __init__(self, path: str, size: tuple, earlier: tuple):
        self.sizes = f"{path} is {size} but earlier images are {earlier}"
        super().__init__(f"{self.sizes}: pass --img-size to resize all images to one size")


def cache_budget() -> int:
    """The most bytes of decoded images one process holds in memory: a quarter of this machine's, shared by
    the processes torchrun started on it (each holds its own copy); larger folders stream."""
    from .runtime import physical_memory
    return physical_memory() // 4 // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)


def decode_folder(data: ImageData, size: int | None, skip_bad: bool = False, progress: bool = True) -> ImageData:
    """Decode every file once into one uint8 tensor, cached on disk (safetensors) by content key. Images
    of another size are resized to ``size``; with ``size=None`` they must all share the first one's
    (else MixedSizes)."""
    import PIL
    from safetensors import safe_open
    stat = [os.stat(f) for f in data.files]  # regular files only (scan_folder)
    key = hashlib.sha256(repr((DECODE_VERSION, PIL.__version__, [os.path.realpath(f) for f in data.files],
                               [(s.st_size, s.st_mtime_ns) for s in stat], size, data.channels,
                               skip_bad)).encode()).hexdigest()[:20]
    cache = cache_dir() / f"images-{key}.safetensors"
    if cache.is_file():
        try:
            with safe_open(str(cache), framework="pt") as f:  # one read: the tensors and the metadata
                bad = json.loads((f.metadata() or {}).get("unreadable", "[]"))  # indices into data.files
                out = _decoded(data, f.get_tensor("images"), f.get_tensor("labels"), bad)
            _report_unreadable(data, bad)
            return out
        except Exception:
            cache.unlink(missing_ok=True)  # a damaged cache is rebuilt, never trusted
    images, labels, bad = _decode_all(data, size, skip_bad, progress)
    _report_unreadable(data, bad)
    out = _decoded(data, images, labels, bad)
    try:
        from .weights import atomic_write, save_safetensors
        atomic_write(cache, lambda tmp: save_safetensors({"images": out.images, "labels": out.labels}, tmp,
                                                         {"unreadable": json.dumps(bad)}))
    except OSError:
        pass  # the cache is an optimisation; a read-only or full disk must not stop training
    return out


def _decoded(data: ImageData, images: torch.Tensor, labels: torch.Tensor, bad: list[int]) -> ImageData:
    """The decoded images of ``data``'s files, the unreadable ones (``bad``: their indices) left out; each
    image's place among the files is kept, so that a split carved from them is the one carved from the
    streamed files."""
    if len(images) != len(labels) or len(images) + len(bad) != len(data.files) or \
            any(not isinstance(i, int) or not 0 <= i < len(data.files) for i in bad):
        raise ValueError("a decoded set that does not match its files")  # a damaged cache: rebuilt
    out = ImageData(labels, data.classes, images=images, channels=data.channels, dropped=len(bad))
    if bad:
        keep = torch.ones(len(data.files), dtype=torch.bool)
        keep[bad] = False
        out.origin = torch.nonzero(keep)[:, 0]
    return out


def _report_unreadable(data: ImageData, bad: list[int]) -> None:
    if bad:
        print(f"skipped {len(bad)} unreadable image(s), e.g. {data.files[bad[0]]}", file=sys.stderr)


def _decode_all(data: ImageData, size: int | None, skip_bad: bool, progress: bool):
    """The readable images as one preallocated uint8 tensor (no second copy), their labels, the indices of the
    unreadable ones."""
    from tqdm import tqdm
    images, labels, bad, count = None, [], [], 0
    for index, (path, label) in enumerate(tqdm(list(zip(data.files, data.labels.tolist())), desc="decoding images",
                                               unit="img", disable=not progress, leave=False,
                                               mininterval=0.1 if sys.stderr.isatty() else 60.0)):
        try:
            img = decode(path, data.channels)
        except DataError:
            if not skip_bad:
                raise
            bad.append(index)
            continue
        if size is not None and img.shape[-2:] != (size, size):
            img = v2.functional.resize(img, [size, size], antialias=True)
        if images is None:
            images = torch.empty((len(data.files), *img.shape), dtype=torch.uint8)
        if img.shape != images.shape[1:]:
            raise MixedSizes(path, tuple(img.shape[-2:]), tuple(images.shape[-2:]))
        images[count] = img
        labels.append(label)
        count += 1
    if images is None:
        raise DataError("no readable images")
    return images[:count], torch.tensor(labels), bad


MAX_ARCHIVE_MEMBERS = 2_000_000  # ImageNet's training set is 1.3 million files
ARCHIVE_EXPANSION, ARCHIVE_SLACK = 100, 1 << 30  # image files barely compress: an archive unpacks to at most this


def _check_unpacked_size(tarball: Path, tar: tarfile.TarFile, folder: Path) -> None:
    """Read the archive's headers and refuse, before writing anything, one that would unpack to more than the
    disk has free or more than 100 times its own size (image files barely compress: more is a decompression
    bomb), or to more entries than an image data set holds; stops reading as soon as a bound is passed."""
    import shutil
    limit = min(shutil.disk_usage(folder).free, ARCHIVE_EXPANSION * tarball.stat().st_size + ARCHIVE_SLACK)
    total = count = 0
    for member in tar:
        total, count = total + (member.size if member.isfile() else 0), count + 1
        if total > limit or count > MAX_ARCHIVE_MEMBERS:
            raise DataError(f"{tarball} would unpack to over {total / 2 ** 30:.1f} GiB or {count:,} entries (at most "
                            f"{limit / 2 ** 30:.1f} GiB, {MAX_ARCHIVE_MEMBERS:,} entries here): not an image data set "
                            f"archive, or set CONVMIXER_CACHE to a folder with room")


def _extract_tarball(tarball: Path) -> Path:
    """Unpack a .tar.gz data set once into the cache and return the folder. The cache is keyed by the
    archive's content, so a replaced archive is unpacked again; unpacking goes to a temporary folder
    renamed into place, so an interrupted one is never taken for complete."""
    digest = hashlib.sha256()
    with open(tarball, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    target = cache_dir() / f"{tarball.name.split('.tar')[0]}-{digest.hexdigest()[:16]}"
    if target.is_dir():
        return target
    import shutil
    import tempfile
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise DataError(f"cannot unpack {tarball} into {target.parent} ({e.strerror}): set CONVMIXER_CACHE to a "
                        f"writable folder") from e
    try:
        with tarfile.open(tarball) as tar:
            _check_unpacked_size(tarball, tar, target.parent)
            tar.extractall(tmp, filter="data")
        os.replace(tmp, target)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if target.is_dir():  # another process unpacked the same archive meanwhile
            return target
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{tarball} cannot be unpacked ({reason}): the archive is corrupt or the disk is full; "
                        f"copy it again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _download(name: str, root: Path):
    import torchvision.datasets as tvd
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "fashion_mnist": tvd.FashionMNIST,
           "mnist": tvd.MNIST}[name]
    made = [p for p in [root, *root.parents] if not p.exists()]  # the folders this download creates
    try:
        root.mkdir(parents=True, exist_ok=True)
        import contextlib
        with contextlib.redirect_stdout(io.StringIO()):
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
    except Exception as e:
        for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):  # leave no empty ./data behind
            _remove_if_empty(folder)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{name} not found under {root} and the download failed ({reason}); "
                        f"pass --data-dir pointing at a local copy") from None


def _remove_if_empty(folder: Path):
    """Remove a folder tree that holds no files (what a failed download created)."""
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


def _cifar10_jpeg_folder(root: Path) -> Path | None:
    """The JPEG copy of CIFAR-10 (../shared/data): an unpacked folder, its tarball, or --data-dir
    naming the tarball itself."""
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        return _extract_tarball(root) / "cifar10-jpg" / "train"
    for candidate in (root / "cifar10-jpg" / "train", root / "train"):
        if candidate.is_dir() and (candidate / "airplane").is_dir():
            return candidate
    tarball = root / "cifar10-jpg-train.tar.gz"
    if tarball.is_file():
        return _extract_tarball(tarball) / "cifar10-jpg" / "train"
    return None


def load_dataset(name: str, data_dir: str | os.PathLike, train: bool = True, img_size: int | None = None,
                 download: bool = True, skip_bad_images: bool = False, cache: bool = True,
                 progress: bool = True, prefer: str = "val") -> ImageData:
    """Read a data set split. ``name`` is one of DATASETS; ``data_dir`` holds it in the torchvision
    on-disk layout (or the JPEG ImageFolder copy of CIFAR-10, or its .tar.gz). Returns decoded
    uint8 images when the set is small, file paths otherwise (``cache=False`` forces files)."""
    root = Path(data_dir).expanduser()
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if name == "imagefolder":
        splits = ["train"] if train else (["test", "val"] if prefer == "test" else ["val", "test"])
        split = next((root / s for s in splits if (root / s).is_dir()), None)
        if split is None and not train:
            raise DataError(f"{root} has no val/ or test/ folder: add one, or use --val-split to carve a "
                            f"validation set from the training images")
        held_out = [s for s in ("val", "test") if (root / s).is_dir()]
        if split is None and held_out:  # its held-out images would be trained on as a class of their own
            raise DataError(f"{root} holds class folders beside {held_out[0]}/ but no train/: move the class folders "
                            f"into {root / 'train'}")
        return _decoded_or_streamed(scan_folder(split or root, skip_bad_images), img_size, skip_bad_images, cache,
                                    progress)
    if name.startswith("cifar"):
        hundred = name == "cifar100"
        torchvision_folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
        if root.is_file() and not root.name.endswith((".tar.gz", ".tgz")):
            raise DataError(f"--data-dir {root} is a file: give the folder that holds the data set (or the "
                            f"cifar10-jpg-train.tar.gz archive itself)")
        if not torchvision_folder.is_dir() and not hundred:
            jpeg = _cifar10_jpeg_folder(root)
            if jpeg is not None:
                if not train:
                    raise DataError(f"the JPEG copy of CIFAR-10 in {root} has no test split: use --val-split, "
                                    f"or --dataset imagefolder --data-dir <folder with test/>")
                folder = scan_folder(jpeg, skip_bad_images)
                return decode_folder(folder, 32, skip_bad_images, progress) if cache else folder
        if not torchvision_folder.is_dir():
            if not download:
                raise DataError(f"{name} not found under {root}: pass --data-dir pointing at a local copy")
            _download(name, root)
        return read_cifar(root, train, hundred)
    fashion = name == "fashion_mnist"
    try:
        return read_mnist(root, train, fashion)
    except FileNotFoundError:
        if not download:
            raise DataError(f"{name} IDX files not found under {root}: pass --data-dir pointing at them") from None
        _download(name, root)
        return read_mnist(root, train, fashion)


def _decoded_or_streamed(folder: ImageData, img_size: int | None, skip_bad: bool, cache: bool,
                         progress: bool) -> ImageData:
    """An image folder decoded once into memory when its images all share one size (img_size, when given:
    a square resize would distort photos) and fit the cache budget; otherwise its files, streamed and each
    resized and cropped as it is read."""
    first = first_image(folder, skip_bad)
    if not cache or len(folder) * first.numel() > cache_budget():
        return folder
    if img_size is not None and tuple(first.shape[-2:]) != (img_size, img_size):
        return folder
    try:
        return decode_folder(folder, None, skip_bad, progress)
    except MixedSizes as e:
        if img_size is None:
            raise
        print(f"streaming the images from disk, each resized as it is read: {e.sizes}", file=sys.stderr)
        return folder


def split_train_val(data: ImageData, val_size: float, seed: int = 0) -> tuple[ImageData, ImageData]:
    """A seeded random validation split carved from the training set: ``val_size`` images
    (or that fraction of them when < 1). It is drawn over the files scanned, so unreadable files dropped
    while decoding leave every other image on the side it has when the files are streamed."""
    n = len(data) + (data.dropped if data.origin is not None else 0)  # the files scanned
    count = int(round(val_size * n)) if val_size < 1 else int(val_size)
    if not 0 < count < n:
        raise DataError(f"--val-split {val_size} leaves no training or no validation images out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if data.origin is None:
        return data.subset(perm[count:].sort().values), data.subset(perm[:count].sort().values)
    in_val = torch.zeros(n, dtype=torch.bool)
    in_val[perm[:count]] = True
    kept_in_val = in_val[data.origin]
    train, val = data.subset(torch.nonzero(~kept_in_val)[:, 0]), data.subset(torch.nonzero(kept_in_val)[:, 0])
    val.dropped = count - len(val)  # the unreadable files that fell on each side
    train.dropped = data.dropped - val.dropped
    return train, val


# --- pipelines ------------------------------------------------------------------------------------
def train_transform(cfg, img_size: int, mean, std) -> v2.Compose:
    """The per-image training augmentation of a TrainConfig ``cfg``."""
    steps = [v2.RandomResizedCrop(img_size, scale=(cfg.scale_min, 1.0), antialias=True)]
    if cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.translate:
        steps.append(v2.RandomCrop(img_size, padding=cfg.translate, padding_mode="reflect"))
    if cfg.randaugment_n > 0 and cfg.randaugment_impl == "timm":
        steps.append(TimmRandAugment(cfg.randaugment_n, cfg.randaugment_m, img_size, mean))
    elif cfg.randaugment_n > 0:
        steps.append(v2.RandAugment(num_ops=cfg.randaugment_n, magnitude=cfg.randaugment_m))
    if cfg.color_jitter > 0:
        steps.append(v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if cfg.random_erasing > 0:
        steps.append(v2.RandomErasing(cfg.random_erasing, value="random"))
    return v2.Compose(steps)


class TimmRandAugment:
    """timm's RandAugment as the paper's ImageNet recipe ran it (``rand-mM-nN-mstd0.5-inc1``: magnitude M of 10
    with noise of std 0.5, each of N operations applied with probability 0.5, the increasing-severity variants),
    on a uint8 tensor image. timm draws from Python's and NumPy's generators: they are seeded from torch's (which
    TransformedImages seeds per image) for each call, and put back after it."""

    def __init__(self, n: int, m: int, img_size: int, mean):
        try:
            from timm.data.auto_augment import rand_augment_transform
        except ImportError:
            raise ConfigError("randaugment_impl timm needs timm: pip install timm (or randaugment_impl torchvision)") from None
        rgb_mean = list(mean) * 3 if len(mean) == 1 else list(mean)
        hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * x)) for x in rgb_mean))
        self.name = f"rand-m{m}-n{n}-mstd0.5-inc1"
        self.transform = rand_augment_transform(self.name, hparams)
        for op in self.transform.ops:  # this instance's own operations; timm's module is left as it is
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        gray = img.shape[0] == 1  # timm's operations expect RGB: a grayscale image goes through as R = G = B
        pil = v2.functional.to_pil_image(img.expand(3, -1, -1) if gray else img)
        with _python_and_numpy_seeded(int(torch.randint(2 ** 31, ()))):
            out = v2.functional.pil_to_tensor(self.transform(pil))
        return out[:1] if gray else out

    def __repr__(self):
        return f"TimmRandAugment({self.name})"


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, with 0 bits (its increasing-severity variant at magnitude 10, which the noise reaches)
    the black image older Pillow made of it, as in the authors' runs: Pillow 11 refuses 0 bits."""
    from PIL import Image, ImageOps
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep) if bits_to_keep > 0 else Image.new(img.mode, img.size)


def crop_long_side(img: torch.Tensor) -> torch.Tensor:
    """The central part, MAX_ASPECT times as long as wide, of an image longer than that. The centre crop
    after the resize keeps far less of the long side, so the result is the same, without the resize's huge
    intermediate (a 1 x 10^6 pixel strip would otherwise become 32 x 3.2e7 pixels)."""
    h, w = img.shape[-2:]
    if max(h, w) <= MAX_ASPECT * min(h, w):
        return img
    return v2.functional.center_crop(img, [min(h, MAX_ASPECT * w), min(w, MAX_ASPECT * h)])


def eval_transform(img_size: int, crop_pct: float, mean, std, interpolation: str = "bilinear") -> v2.Compose:
    """The one evaluation preprocessing (per image or on a whole uint8 batch): resize the short side
    to img_size / crop_pct (bilinear, or bicubic as the released ImageNet weights were evaluated),
    centre-crop img_size, normalise."""
    resize = int(round(img_size / crop_pct))
    mode = v2.InterpolationMode.BICUBIC if interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
    return v2.Compose([crop_long_side, v2.Resize(resize, interpolation=mode, antialias=True), v2.CenterCrop(img_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def batch_mixer(cfg, num_classes: int):
    """mixup / CutMix on a whole batch (labels become soft), one of them picked per batch."""
    mixers = []
    if cfg.mixup > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


class TransformedImages(torch.utils.data.Dataset):
    """(transformed image, label) pairs from decoded images or files. With ``skip_bad_images`` an
    unreadable file is replaced by the next readable one (training: every batch stays full), or, with
    ``leave_out`` (evaluation: no image may count twice), returned as None for ``readable_batch`` to drop."""

    def __init__(self, data: ImageData, transform, skip_bad_images: bool = False, leave_out: bool = False):
        self.data, self.transform, self.skip_bad, self.leave_out = data, transform, skip_bad_images, leave_out

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if isinstance(i, tuple):  # (index, seed): the augmentation drawn from the image's own seed, so it is the
            i, seed = i           # same whichever worker draws it and after a resume (training's batches)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # the CPU's only: a GPU's generator is not forked here
                return self[i]
        if self.data.images is not None:
            return self.transform(self.data.images[i]), self.data.labels[i]
        for attempt in range(1 if self.leave_out else len(self)):
            j = (i + attempt) % len(self)
            try:
                return self.transform(decode(self.data.files[j], self.data.channels)), self.data.labels[j]
            except DataError:
                if not self.skip_bad:
                    raise
        if self.leave_out:
            return None
        raise DataError("no readable image in the data set")


@contextmanager
def _python_and_numpy_seeded(seed: int):
    """Python's and NumPy's global generators seeded for a block, and put back as they were after it."""
    import random

    import numpy as np
    python, numpy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def readable_batch(items):
    """A DataLoader batch of the items that are not None (unreadable images left out); None if none is."""
    items = [item for item in items if item is not None]
    return torch.utils.data.default_collate(items) if items else None


def leave_signals_to_the_parent(worker_id: int):
    """DataLoader workers ignore SIGINT/SIGTERM (a Ctrl-C or a scheduler's stop reaches the whole process
    group): the training or evaluating process notes them (a trainer checkpoints first) and then shuts its
    workers down."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_errors_in_one_line(batches):
    """Batches from a DataLoader; a DataError raised in a worker process comes back with the worker's
    whole traceback in its message, and is re-raised with the original one line. However the batches
    end (exhausted, an error, the consumer stopping early), the workers are shut down here and now: a
    traceback held in a reference cycle would otherwise keep them alive until a garbage collection, and
    since they ignore SIGTERM (leave_signals_to_the_parent), an exiting process would wait for
    them forever."""
    iterator = iter(batches)
    try:
        yield from iterator
    except DataError as e:
        lines = str(e).strip().splitlines()
        if len(lines) > 1 and "Original Traceback" in str(e):
            raise DataError(lines[-1].split(": ", 1)[-1]) from e
        raise
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # what torch's loader iterator runs when deleted
        if shutdown is not None:
            shutdown()


def eval_batches(data: ImageData, batch_size: int, transform, workers: int = 0, skip_bad_images: bool = False):
    """(images, labels) batches for evaluation: decoded sets are transformed a whole batch at a time,
    files one image at a time in DataLoader workers; the same transform either way. With
    ``skip_bad_images`` unreadable files are left out (the batches then hold fewer images)."""
    if data.images is not None:
        for start in range(0, len(data), batch_size):
            yield transform(data.images[start:start + batch_size]), data.labels[start:start + batch_size]
        return
    batches = torch.utils.data.DataLoader(TransformedImages(data, transform, skip_bad_images, leave_out=True),
                                          batch_size=batch_size, num_workers=workers, collate_fn=readable_batch,
                                          worker_init_fn=leave_signals_to_the_parent)
    yield from (batch for batch in worker_errors_in_one_line(batches) if batch is not None)
