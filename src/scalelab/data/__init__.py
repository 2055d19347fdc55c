"""Datasets as in-memory tensors, and the sample order each step and worker sees.

``load_dataset(cfg.data)`` returns a :class:`Dataset` for any name in ``DATASETS``: generated (``mnist1d``,
``synthetic``), shipped with scikit-learn (``digits``), the user's own ``npz`` file, or the real MNIST,
Fashion-MNIST and CIFAR-10 files (downloaded into the cache when missing). Problems with names or files raise
:class:`~scalelab.errors.DataError` in one line.

``epoch_order``, ``steps_per_epoch`` and ``batch_indices`` make the order of samples a pure function of
(seed, epoch, step, rank), which is what makes resuming exact and lets W workers split each global batch.

Example:
    >>> from scalelab.config import DataConfig
    >>> ds = load_dataset(DataConfig(name="synthetic", n_train=64, n_test=16))
    >>> order = epoch_order(len(ds.y_train), seed=0, epoch=0)
    >>> ds.x_train[batch_indices(order, 0, 32)].shape
    torch.Size([32, 32])
"""

from scalelab.data.dataset import Dataset
from scalelab.data.registry import DATASETS, load_dataset
from scalelab.data.sharding import ShardedBatchSampler, batch_indices, epoch_order, steps_per_epoch

__all__ = ["DATASETS", "Dataset", "ShardedBatchSampler", "batch_indices", "epoch_order", "load_dataset",
           "steps_per_epoch"]
