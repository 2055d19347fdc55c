"""The dataset registry: ``DATASETS`` maps a name to a loader ``DataConfig -> Dataset``."""

from __future__ import annotations

from collections.abc import Callable

from scalelab.config import DataConfig
from scalelab.data.cifar import load_cifar10
from scalelab.data.dataset import Dataset, check_dataset
from scalelab.data.digits import load_digits
from scalelab.data.idx import load_fashion_mnist, load_mnist
from scalelab.data.mnist1d import load_mnist1d
from scalelab.data.npz import load_npz
from scalelab.data.synthetic import load_synthetic
from scalelab.errors import DataError, unknown_name

Loader = Callable[[DataConfig], Dataset]

DATASETS: dict[str, Loader] = {
    "mnist1d": load_mnist1d,
    "digits": load_digits,
    "synthetic": load_synthetic,
    "npz": load_npz,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the dataset ``cfg.name`` as float32/int64 tensors, generating or downloading it if needed.

    Raises:
        DataError: one line, for an unknown name or a missing, corrupt or truncated file.

    Example:
        >>> ds = load_dataset(DataConfig(name="synthetic", n_train=100, n_test=20, input_dim=8))
        >>> ds.input_shape, ds.num_classes, len(ds.y_test)
        ((8,), 10, 20)
    """
    loader = DATASETS.get(cfg.name)
    if loader is None:
        raise DataError(unknown_name("dataset", cfg.name, DATASETS))
    return check_dataset(loader(cfg))
