"""MNIST and Fashion-MNIST from the original IDX files (raw or ``.gz``), parsed and checked here.

An IDX file is a 4-byte magic number ``0x0000TTDD`` (TT = element type, 0x08 for unsigned bytes; DD = number
of dimensions), DD big-endian uint32 sizes, then the elements in row-major order. Images are 0x00000803
(N x rows x cols), labels 0x00000801 (N). The file size must match the header exactly: a short file is a
truncated download and is reported as such rather than misread.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scalelab.config import DataConfig
from scalelab.data.cache import cache_dir
from scalelab.data.dataset import Dataset, take_first
from scalelab.data.download import download
from scalelab.data.messages import brief
from scalelab.errors import DataError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
GZIP_MAGIC = b"\x1f\x8b"
NUM_CLASSES = 10

# (split, kind) -> file name, as published.
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class IdxSource:
    """One IDX dataset: where to get it and how to normalise it."""

    name: str
    title: str
    url: str  # base URL of the .gz files (a mirror; the original sites throttle)
    url_env: str  # environment variable that overrides ``url``
    mean: float  # pixel statistics of the training set after scaling to [0, 1]
    std: float


MNIST = IdxSource("mnist", "MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/", "SCALELAB_MNIST_URL",
                  0.1307, 0.3081)
FASHION_MNIST = IdxSource("fashion_mnist", "Fashion-MNIST",
                          "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
                          "SCALELAB_FASHION_MNIST_URL", 0.2860, 0.3530)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file (gzip-compressed or not) and return its uint8 array.

    Args:
        path: the file; compression is detected from its content, so a ``.gz`` name that a browser already
            decompressed still loads.
        magic: the expected magic number, :data:`IMAGES_MAGIC` or :data:`LABELS_MAGIC`.

    Raises:
        DataError: naming the file, if it is unreadable, not valid gzip, has a wrong magic number, or its size
            does not match the header.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({brief(e)})") from None
    packed = data[:2] == GZIP_MAGIC
    if packed:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a valid gzip file ({brief(e)}); delete it and download it "
                            f"again") from None
    elif path.suffix == ".gz" and data[:2] != b"\x00\x00":  # neither gzip nor IDX
        raise DataError(f"{path}: not a valid gzip file (no gzip header); delete it and download it again")
    what = "decompressed file" if packed else "file"
    kind = "images" if magic == IMAGES_MAGIC else "labels"

    if len(data) < 4:
        raise DataError(f"{path}: truncated, {what} has {len(data)} bytes, less than the 4-byte magic number")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(f"{path}: bad magic number 0x{found:08x}, expected 0x{magic:08x} (IDX {kind})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated, {what} has {len(data)} bytes, less than the {header}-byte "
                        f"header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "too long"
        raise DataError(f"{path}: {state}, header says {'x'.join(map(str, dims))} = {expected} bytes, "
                        f"{what} has {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, name: str) -> Path | None:
    # Prefer the uncompressed file: it is what a user who unpacked the archive by hand has.
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate(src: IdxSource, cfg: DataConfig) -> dict[tuple[str, str], Path]:
    """Paths of the four files, downloading the missing ones if ``cfg.download``."""
    root = Path(cfg.root).expanduser() if cfg.root else cache_dir(cfg) / src.name
    found = {key: _find(root, name) for key, name in FILES.items()}
    missing = [key for key, p in found.items() if p is None]
    if missing and not cfg.download:
        names = ", ".join(FILES[k] for k in missing)
        raise DataError(f"{src.title} files missing in {root}: {names} (raw or .gz); put them there "
                        f"or set data.download=true")
    base = os.environ.get(src.url_env) or src.url
    base = base if base.endswith("/") else base + "/"
    for key in missing:
        name = f"{FILES[key]}.gz"
        found[key] = download(base + name, root / name, what=f"{src.title} {name}")
    return found  # type: ignore[return-value]


def load_idx(src: IdxSource, cfg: DataConfig) -> Dataset:
    """Load an IDX dataset as (N, 1, rows, cols) float32, scaled to [0, 1] and standardised.

    ``n_train`` / ``n_test`` of 0 keep every sample, else the first n.
    """
    paths = _locate(src, cfg)
    tensors: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        img_path, lab_path = paths[(split, "images")], paths[(split, "labels")]
        images = read_idx(img_path, IMAGES_MAGIC)
        labels = read_idx(lab_path, LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels")
        if len(labels) and labels.max() >= NUM_CLASSES:
            raise DataError(f"{lab_path}: label {int(labels.max())} is out of range 0..{NUM_CLASSES - 1}")
        n = take_first(len(labels), cfg.n_train if split == "train" else cfg.n_test, split, src.name)
        x = torch.from_numpy(images[:n].astype(np.float32)).unsqueeze(1)
        # One fused pass: (x / 255 - mean) / std.
        x.mul_(1.0 / (255.0 * src.std)).sub_(src.mean / src.std)
        tensors[f"x_{split}"] = x
        tensors[f"y_{split}"] = torch.from_numpy(labels[:n].astype(np.int64))
    return Dataset(src.name, tensors["x_train"], tensors["y_train"], tensors["x_test"], tensors["y_test"],
                   NUM_CLASSES)


def load_mnist(cfg: DataConfig) -> Dataset:
    """MNIST (LeCun et al.): 60000/10000 handwritten digits, 28x28 grey."""
    return load_idx(MNIST, cfg)


def load_fashion_mnist(cfg: DataConfig) -> Dataset:
    """Fashion-MNIST (Xiao et al.): 60000/10000 clothing images in MNIST's format."""
    return load_idx(FASHION_MNIST, cfg)
