"""Which samples each step and each worker sees: a pure function of (seed, epoch, step, rank).

Every epoch visits the training set in a fresh permutation derived only from ``(seed, epoch)``, so a resumed
run (or a run on a different number of workers) sees exactly the same global batches as an uninterrupted one.
The global batch of step ``k`` is ``order[k*B:(k+1)*B]``; with ``W`` workers, rank ``r`` takes the ``r``-th
contiguous slice of ``B/W`` samples, so the union over ranks is the global batch.

Example:
    >>> order = epoch_order(10, seed=0, epoch=0)
    >>> torch.equal(torch.cat([batch_indices(order, 1, 4, r, 2) for r in range(2)]), order[4:8])
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from scalelab.errors import DataError


def _epoch_seed(seed: int, epoch: int) -> int:
    # Hash (seed, epoch) rather than e.g. seed + epoch, so seed 0 epoch 1 and seed 1 epoch 0 differ.
    digest = hashlib.blake2b(f"scalelab-order:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits ``n`` training samples.

    Args:
        n: training set size.
        seed: run seed.
        epoch: zero-based epoch number.

    Returns:
        An int64 CPU tensor holding a permutation of ``range(n)``, the same for the same arguments on any
        machine.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g, dtype=torch.int64)


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Optimizer steps in one epoch: ``n // global_batch`` (the last partial batch is dropped).

    Dropping it keeps every step's batch exactly ``global_batch``, which the LR scaling rules assume.

    Raises:
        DataError: if the training set is smaller than one global batch.
    """
    if global_batch < 1:
        raise DataError(f"the global batch must be at least 1, got {global_batch}")
    steps = n // global_batch
    if steps == 0:
        raise DataError(f"train set of {n} samples is smaller than the global batch {global_batch}")
    return steps


def batch_indices(order: torch.Tensor, step_in_epoch: int, global_batch: int, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """Sample indices of worker ``rank`` at step ``step_in_epoch``.

    Args:
        order: the epoch's permutation from :func:`epoch_order` (on any device).
        step_in_epoch: zero-based step within the epoch.
        global_batch: B, the batch over all workers.
        rank: this worker, in ``[0, world_size)``.
        world_size: number of workers W; must divide B.

    Returns:
        ``B / W`` indices: the ``rank``-th contiguous share of ``order[step*B:(step+1)*B]``.

    Raises:
        DataError: if W does not divide B, the rank is out of range, or the step is past the epoch's end.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, {world_size}) workers")
    if global_batch < 1 or global_batch % world_size:
        raise DataError(f"global batch {global_batch} is not divisible by {world_size} workers; "
                        f"each worker takes B/W samples")
    steps = len(order) // global_batch
    if not 0 <= step_in_epoch < steps:
        raise DataError(f"step {step_in_epoch} is outside the epoch's {steps} steps of {global_batch} "
                        f"samples")
    local = global_batch // world_size
    start = step_in_epoch * global_batch + rank * local
    return order[start:start + local]


class ShardedBatchSampler(Sampler[list[int]]):
    """One worker's batches, in the order of :func:`batch_indices`, for ``DataLoader(batch_sampler=...)``.

    Call :meth:`set_epoch` before each epoch, as with ``DistributedSampler``. ``start_step`` is the global
    step (counted over all epochs) a resumed run continues from: batches before it are skipped, so resuming at
    step ``s`` yields exactly the batches an uninterrupted run would have used from step ``s`` on.

    Args:
        n: training set size.
        global_batch: B over all workers.
        seed: run seed (the same on every worker).
        rank: this worker.
        world_size: number of workers; must divide B.
        start_step: global step to resume from.

    Example:
        >>> s = ShardedBatchSampler(10, 4, seed=0, start_step=1)
        >>> len(list(s)), len(s)
        (1, 1)
    """

    def __init__(self, n: int, global_batch: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, {world_size}) workers")
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by {world_size} workers; "
                            f"each worker takes B/W samples")
        if start_step < 0:
            raise DataError(f"start step must be >= 0, got {start_step}")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.steps_per_epoch = steps_per_epoch(n, global_batch)
        self.epoch = start_step // self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration covers."""
        self.epoch = epoch

    def _first_step(self) -> int:
        # Only the epoch containing start_step is partial; later epochs are whole, earlier ones already done.
        return min(max(0, self.start_step - self.epoch * self.steps_per_epoch), self.steps_per_epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n, self.seed, self.epoch)
        for k in range(self._first_step(), self.steps_per_epoch):
            yield batch_indices(order, k, self.global_batch, self.rank, self.world_size).tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch - self._first_step()
