"""Sample order: permutations per epoch, the split of a global batch over ranks, and the resumable sampler."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from scalelab.data import ShardedBatchSampler, batch_indices, epoch_order, steps_per_epoch
from scalelab.errors import DataError


def test_epoch_order_is_a_deterministic_permutation():
    order = epoch_order(1000, seed=3, epoch=2)
    assert order.dtype == torch.int64 and order.shape == (1000,)
    assert torch.equal(order.sort().values, torch.arange(1000))
    assert torch.equal(order, epoch_order(1000, seed=3, epoch=2))


def test_epoch_order_differs_across_epochs_and_seeds():
    base = epoch_order(1000, 0, 0)
    others = [epoch_order(1000, 0, 1), epoch_order(1000, 1, 0), epoch_order(1000, 1, 1)]
    assert all(not torch.equal(base, o) for o in others)
    # (seed, epoch) = (0, 1) and (1, 0) must not collide as they would with seed + epoch.
    assert not torch.equal(others[0], others[1])


def test_epoch_order_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    epoch_order(100, 5, 5)
    assert torch.equal(torch.rand(3), expected)


def test_steps_per_epoch_drops_the_last_partial_batch():
    assert steps_per_epoch(1000, 256) == 3
    assert steps_per_epoch(1024, 256) == 4
    with pytest.raises(DataError, match="train set of 100 samples is smaller than the global batch 256"):
        steps_per_epoch(100, 256)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_union_over_ranks_is_the_global_batch(world_size):
    n, B = 1000, 64
    order = epoch_order(n, seed=7, epoch=1)
    for step in range(steps_per_epoch(n, B)):
        parts = [batch_indices(order, step, B, rank, world_size) for rank in range(world_size)]
        assert all(len(p) == B // world_size for p in parts)
        assert torch.equal(torch.cat(parts), order[step * B:(step + 1) * B])
        assert torch.equal(batch_indices(order, step, B), order[step * B:(step + 1) * B])


def test_batch_indices_errors():
    order = epoch_order(100, 0, 0)
    with pytest.raises(DataError, match="not divisible by 3 workers"):
        batch_indices(order, 0, 32, 0, 3)
    with pytest.raises(DataError, match="rank 2 is not in"):
        batch_indices(order, 0, 32, 2, 2)
    with pytest.raises(DataError, match="outside the epoch"):
        batch_indices(order, 3, 32)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sampler_yields_the_same_batches(world_size):
    n, B, seed = 200, 32, 11
    for rank in range(world_size):
        sampler = ShardedBatchSampler(n, B, seed, rank=rank, world_size=world_size)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            order = epoch_order(n, seed, epoch)
            expected = [batch_indices(order, k, B, rank, world_size).tolist() for k in range(n // B)]
            assert list(sampler) == expected and len(sampler) == len(expected)


def test_sampler_resume_yields_the_tail():
    n, B, seed = 200, 32, 11  # 6 steps per epoch
    full = []
    sampler = ShardedBatchSampler(n, B, seed)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        full += list(sampler)
    resumed = []
    sampler = ShardedBatchSampler(n, B, seed, start_step=8)
    assert sampler.epoch == 1
    for epoch in range(1, 3):  # the usual loop from the resumed epoch, calling set_epoch each time
        sampler.set_epoch(epoch)
        assert len(sampler) == (4 if epoch == 1 else 6)
        resumed += list(sampler)
    assert resumed == full[8:]


def test_sampler_drives_a_dataloader():
    x = torch.arange(100).float()
    loader = DataLoader(TensorDataset(x), batch_sampler=ShardedBatchSampler(100, 20, 0, rank=1, world_size=2))
    batches = [b[0].long() for b in loader]
    order = epoch_order(100, 0, 0)
    assert [b.tolist() for b in batches] == [batch_indices(order, k, 20, 1, 2).tolist() for k in range(5)]
