"""The in-memory dataset every loader returns: train/test tensors, already normalised, and the class count."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scalelab.errors import DataError


@dataclass
class Dataset:
    """A classification dataset held in memory as tensors.

    Attributes:
        name: registry name the data was loaded under (e.g. ``"mnist1d"``).
        x_train: float32 inputs of shape ``(N, *input_shape)``, already normalised.
        y_train: int64 labels of shape ``(N,)`` in ``[0, num_classes)``.
        x_test: float32 test inputs, same per-sample shape as ``x_train``.
        y_test: int64 test labels.
        num_classes: number of classes the model must output.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 40)`` for MNIST-1D or ``(3, 32, 32)`` for CIFAR-10."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        # The default dataclass repr would print every tensor element.
        return (f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
                f"num_classes={self.num_classes})")


def check_dataset(ds: Dataset) -> Dataset:
    """Check the invariants the trainer relies on; a failure here is a loader bug, not a user error."""
    assert ds.x_train.dtype == torch.float32 and ds.x_test.dtype == torch.float32, ds
    assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64, ds
    assert ds.x_train.shape[0] == ds.y_train.shape[0] and ds.x_test.shape[0] == ds.y_test.shape[0], ds
    assert ds.x_train.shape[1:] == ds.x_test.shape[1:], ds
    return ds


def take_first(n_avail: int, n_wanted: int, split: str, name: str) -> int:
    """How many samples to keep: all when ``n_wanted`` is 0, else ``n_wanted`` if the split has that many.

    Raises:
        DataError: when more samples are asked for than the split holds.
    """
    if n_wanted == 0:
        return n_avail
    if n_wanted > n_avail:
        key = "n_train" if split == "train" else "n_test"
        raise DataError(f"data.{key}={n_wanted} but the {name} {split} set has only {n_avail} samples")
    return n_wanted
