"""MNIST-1D (Greydanus 2020): 40-sample 1-D signals of 10 digit templates, generated locally and cached.

Generation is slow (a few thousand samples per second), so the arrays are saved once as ``.npz`` in the data
cache, under a name keyed on every parameter that affects them; later runs load that file in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from scalelab.config import DataConfig
from scalelab.data.cache import atomic_writer, cache_dir
from scalelab.data.dataset import Dataset

DEFAULT_TRAIN = 45000
DEFAULT_TEST = 5000
# Bump when the cached arrays change meaning (layout, dtype, split rule) so stale caches are not reused.
FORMAT_VERSION = 1


def _generation_args(total: int, seed: int):
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    args.num_samples = total
    args.train_split = 1.0  # we split ourselves, to exactly n_train / n_test
    args.seed = seed
    return args


def _cache_path(root: Path, n_train: int, n_test: int, seed: int, args) -> Path:
    # The package's own defaults (noise scales, lengths, ...) go into the key too: if a new mnist1d release
    # changes them, the old cache is simply not found instead of silently mixing two datasets.
    params = {k: v for k, v in sorted(vars(args).items()) if k != "url"}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return root / f"mnist1d-v{FORMAT_VERSION}-train{n_train}-test{n_test}-seed{seed}-{digest}.npz"


def _generate(args) -> tuple[np.ndarray, np.ndarray]:
    """Run the generator with its seed, without disturbing the caller's global RNGs (it seeds both)."""
    from mnist1d.data import make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([d["x"], d["x_test"]]) if len(d["x_test"]) else d["x"]
    y = np.concatenate([d["y"], d["y_test"]]) if len(d["y_test"]) else d["y"]
    return x.astype(np.float32), y.astype(np.int64)


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if the file is missing or unreadable (then it is regenerated)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        print(f"MNIST-1D cache {path} is unreadable ({type(e).__name__}); regenerating", file=sys.stderr)
        return None


def load_mnist1d(cfg: DataConfig) -> Dataset:
    """MNIST-1D with ``cfg.n_train`` / ``cfg.n_test`` samples (0 = 45000 / 5000) generated from ``cfg.seed``.

    Returns:
        A :class:`Dataset` of shape (N, 1, 40): one channel, so Conv1d models take it as is.
    """
    n_train = cfg.n_train or DEFAULT_TRAIN
    n_test = cfg.n_test or DEFAULT_TEST
    # make_dataset makes num_samples // 10 per class: round the total up to a multiple of 10, drop the excess.
    total = -(-(n_train + n_test) // 10) * 10
    args = _generation_args(total, cfg.seed)
    path = _cache_path(cache_dir(cfg), n_train, n_test, cfg.seed, args)

    arrays = _read_cache(path)
    if arrays is None:
        print(f"generating MNIST-1D: {total} samples (once; cached at {path})", file=sys.stderr, flush=True)
        x, y = _generate(args)
        arrays = {"x_train": x[:n_train], "y_train": y[:n_train],
                  "x_test": x[n_train:n_train + n_test], "y_test": y[n_train:n_train + n_test]}
        with atomic_writer(path) as f:
            np.savez(f, **arrays)

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    return Dataset("mnist1d",
                   t(arrays["x_train"], torch.float32).unsqueeze(1), t(arrays["y_train"], torch.int64),
                   t(arrays["x_test"], torch.float32).unsqueeze(1), t(arrays["y_test"], torch.int64), 10)
