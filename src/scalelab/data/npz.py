"""The user's own data as one ``.npz`` file with arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from scalelab.config import DataConfig
from scalelab.data.dataset import Dataset, take_first
from scalelab.data.messages import brief
from scalelab.errors import DataError

KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; data.root must name the .npz file for dataset 'npz'")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a valid .npz file (not a zip archive); save it with numpy.savez")
    try:
        # allow_pickle=False: an .npz from elsewhere must not be able to run code through object arrays.
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; it has "
                                f"{', '.join(f.files) or 'none'} and needs {', '.join(KEYS)}")
            return {k: f[k] for k in KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read the arrays ({brief(e)})") from None


def _check(path: Path, a: dict[str, np.ndarray]) -> None:
    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if x.ndim < 2 or x.dtype.kind not in "biuf":
            raise DataError(f"{path}: x_{split} must be a numeric array of shape (N, ...), "
                            f"got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DataError(f"{path}: y_{split} must be a 1-D integer array of labels, "
                            f"got {y.dtype} {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{path}: x_{split} has {len(x)} samples but y_{split} has {len(y)} labels")
        if len(y) and y.min() < 0:
            raise DataError(f"{path}: y_{split} has a negative label {int(y.min())}; "
                            f"labels must be 0, 1, 2, ...")
    if len(a["y_train"]) == 0:
        raise DataError(f"{path}: x_train is empty")
    if a["x_train"].shape[1:] != a["x_test"].shape[1:]:
        raise DataError(f"{path}: x_train samples have shape {a['x_train'].shape[1:]} but x_test samples "
                        f"{a['x_test'].shape[1:]}")


def load_npz(cfg: DataConfig) -> Dataset:
    """Load ``cfg.root`` as an ``.npz`` dataset; x is cast to float32 as stored (normalise it yourself).

    ``num_classes`` is the largest label + 1. ``n_train`` / ``n_test`` (if non-zero) keep the first n samples.

    Raises:
        DataError: the file is missing, not an npz, lacks a key, or has mismatched or invalid arrays.
    """
    if not cfg.root:
        raise DataError("dataset 'npz' needs data.root set to the .npz file with x_train, y_train, x_test, "
                        "y_test")
    path = Path(cfg.root).expanduser()
    a = _read(path)
    _check(path, a)
    n_train = take_first(len(a["y_train"]), cfg.n_train, "train", "npz")
    n_test = take_first(len(a["y_test"]), cfg.n_test, "test", "npz")
    num_classes = int(max(a["y_train"].max(), a["y_test"].max() if len(a["y_test"]) else 0)) + 1

    def t(arr: np.ndarray, n: int, dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr[:n]).astype(dtype, copy=False))

    return Dataset("npz", t(a["x_train"], n_train, np.float32), t(a["y_train"], n_train, np.int64),
                   t(a["x_test"], n_test, np.float32), t(a["y_test"], n_test, np.int64), num_classes)
