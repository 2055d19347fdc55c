"""CIFAR-10 from the "python version" batches (``cifar-10-batches-py``), read with a restricted unpickler."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalelab.config import DataConfig
from scalelab.data.archive import extract_tar
from scalelab.data.cache import cache_dir
from scalelab.data.dataset import Dataset, take_first
from scalelab.data.download import download
from scalelab.data.safe_pickle import load_pickle
from scalelab.errors import DataError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
URL_ENV = "SCALELAB_CIFAR10_URL"
ARCHIVE = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
NUM_CLASSES = 10
# Per-channel mean and std of the 50000 training images, scaled to [0, 1].
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _batch_dir(root: Path) -> Path | None:
    """The directory holding all six batches: ``root/cifar-10-batches-py`` or ``root`` itself."""
    for d in (root / BATCH_DIR, root):
        if all((d / n).is_file() for n in (*TRAIN_BATCHES, TEST_BATCH)):
            return d
    return None


def _locate(cfg: DataConfig) -> Path:
    root = Path(cfg.root).expanduser() if cfg.root else cache_dir(cfg) / "cifar10"
    found = _batch_dir(root)
    if found is not None:
        return found
    if not cfg.download:
        raise DataError(f"CIFAR-10 batches missing: {root / BATCH_DIR} needs {', '.join(TRAIN_BATCHES)} and "
                        f"{TEST_BATCH} (extract {ARCHIVE} into {root}), or set data.download=true")
    archive = root / ARCHIVE
    if not archive.is_file():  # a previous run may have downloaded it and been stopped while extracting
        download(os.environ.get(URL_ENV) or URL, archive, what="CIFAR-10")
    extract_tar(archive, root)
    found = _batch_dir(root)
    if found is None:
        raise DataError(f"{archive}: extracted, but {root / BATCH_DIR} still lacks some of "
                        f"{', '.join((*TRAIN_BATCHES, TEST_BATCH))}; is it the CIFAR-10 python version?")
    with contextlib.suppress(OSError):
        archive.unlink()  # 170 MB no longer needed once the batches are out
    return found


def _get(d: dict, key: str) -> Any:
    # Python 2 pickles read with encoding="bytes" have bytes keys; one rewritten in Python 3 may have str
    # keys.
    return d[key.encode()] if key.encode() in d else d.get(key)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as uint8 images (N, 3, 32, 32) and int64 labels (N,).

    Raises:
        DataError: naming the file, if it is not a valid CIFAR-10 batch.
    """
    d = load_pickle(path)
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict with 'data' and 'labels', got {type(d).__name__}")
    data, labels = _get(d, "data"), _get(d, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
    try:
        y = np.asarray(labels)
    except Exception:  # noqa: BLE001 - ragged or odd objects: report as a bad batch
        y = np.asarray([], dtype=object)
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(data):
        raise DataError(f"{path}: 'labels' must be {len(data)} integers, one per image")
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels must be in 0..{NUM_CLASSES - 1}, "
                        f"found {int(y.min())}..{int(y.max())}")
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32))
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return x.div_(255.0).sub_(mean).div_(std)


def load_cifar10(cfg: DataConfig) -> Dataset:
    """CIFAR-10 as (N, 3, 32, 32) float32 normalised per channel; ``n_train``/``n_test`` keep the first n.

    Files come from ``cfg.root`` (default: cache_dir/cifar10), downloaded and extracted if missing and
    ``cfg.download`` is set.
    """
    d = _locate(cfg)
    train = [read_batch(d / name) for name in TRAIN_BATCHES]
    x_train, y_train = np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])
    x_test, y_test = read_batch(d / TEST_BATCH)
    n_train = take_first(len(y_train), cfg.n_train, "train", "cifar10")
    n_test = take_first(len(y_test), cfg.n_test, "test", "cifar10")
    return Dataset("cifar10", _to_tensor(x_train[:n_train]), torch.from_numpy(y_train[:n_train]),
                   _to_tensor(x_test[:n_test]), torch.from_numpy(y_test[:n_test]), NUM_CLASSES)
