"""scikit-learn's 8x8 handwritten digits: 1797 real images shipped with sklearn, so no download is needed."""

from __future__ import annotations

import numpy as np
import torch

from scalelab.config import DataConfig
from scalelab.data.dataset import Dataset
from scalelab.errors import DataError

DEFAULT_TEST = 297


def load_digits(cfg: DataConfig) -> Dataset:
    """The digits as (N, 1, 8, 8), split at random by ``cfg.seed`` (default 1500 train / 297 test).

    Pixels are scaled to [0, 1] (they are 0..16) and then standardised with the training set's mean and std.

    Raises:
        DataError: if ``n_train + n_test`` exceeds the 1797 images.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    x = raw.data.astype(np.float32).reshape(-1, 1, 8, 8) / 16.0
    y = raw.target.astype(np.int64)
    n = len(y)
    n_test = cfg.n_test or DEFAULT_TEST
    n_train = cfg.n_train or n - n_test
    if n_train + n_test > n or n_train <= 0:
        raise DataError(f"digits has {n} images; data.n_train={cfg.n_train} + data.n_test={cfg.n_test} "
                        f"asks for {n_train + n_test}")
    perm = np.random.default_rng(cfg.seed).permutation(n)
    train, test = perm[:n_train], perm[n_train:n_train + n_test]
    # One scalar mean/std: per-pixel statistics are undefined for the always-blank border pixels.
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Dataset("digits", torch.from_numpy(x[train]), torch.from_numpy(y[train]),
                   torch.from_numpy(x[test]), torch.from_numpy(y[test]), 10)
