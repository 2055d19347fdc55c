"""BatchNorm with ghost batches and emulated workers, checked against plain nn.BatchNorm on chunks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scalelab.errors import ConfigError
from scalelab.recipe.norm import BatchNorm, group_sums, make_norm, moments_from_sums, set_emulated_workers

TOL = dict(rtol=1e-5, atol=1e-5)


def _ref(c: int, dim: int) -> nn.Module:
    return nn.BatchNorm1d(c) if dim in (2, 3) else nn.BatchNorm2d(c)


def _random_affine(*modules: nn.Module) -> None:
    """Give all modules the same non-trivial gamma/beta so the affine part is exercised."""
    g = torch.Generator().manual_seed(1)
    w = torch.rand(modules[0].weight.shape, generator=g) + 0.5
    b = torch.randn(modules[0].bias.shape, generator=g)
    for m in modules:
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)


def _input(shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g) * 2 + 0.5).requires_grad_()


SHAPES = [(16, 6), (16, 6, 7), (8, 4, 5, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_single_group_is_bit_identical_to_nn_batchnorm(shape):
    c, n = shape[1], shape[0]
    for ours in (BatchNorm(c), BatchNorm(c, ghost_batch=n), BatchNorm(c, ghost_batch=4 * n)):
        ref = _ref(c, len(shape))
        _random_affine(ours, ref)
        x1, x2 = _input(shape), _input(shape)
        y1, y2 = ours(x1), ref(x2)
        assert torch.equal(y1, y2)
        dy = torch.randn(shape)
        y1.backward(dy)
        y2.backward(dy)
        assert torch.equal(x1.grad, x2.grad)
        assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(ours.bias.grad, ref.bias.grad)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(ours, key), getattr(ref, key)), key


@pytest.mark.parametrize("shape", SHAPES)
def test_ghost_equals_batchnorm_on_each_chunk(shape):
    c, b = shape[1], 2 if shape[0] == 8 else 4
    ours, ref = BatchNorm(c, ghost_batch=b), _ref(c, len(shape))
    _random_affine(ours, ref)
    x1, x2 = _input(shape), _input(shape)
    y1 = ours(x1)
    y2 = torch.cat([ref(chunk) for chunk in x2.split(b)])  # sequential running-stat updates, one per chunk
    torch.testing.assert_close(y1, y2, **TOL)
    dy = torch.randn(shape)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **TOL)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)
    assert ours.num_batches_tracked.item() == 1  # counts forward calls, not groups


def test_running_stats_after_several_steps_match_sequential_updates():
    ours, ref = BatchNorm(3, momentum=0.3, ghost_batch=2), nn.BatchNorm2d(3, momentum=0.3)
    for step in range(3):
        x = torch.randn(8, 3, 4, 4) * (step + 1) + step
        ours(x)
        for chunk in x.split(2):
            ref(chunk)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)


def test_splits_and_ghost_combine():
    """2 workers x ghost 2 on a batch of 8 = four groups of two, the same as ghost 2 alone."""
    a, b = BatchNorm(5, ghost_batch=2), BatchNorm(5, ghost_batch=2)
    b.splits = 2
    x = torch.randn(8, 5, 3)
    torch.testing.assert_close(a(x), b(x), **TOL)
    torch.testing.assert_close(a.running_var, b.running_var, **TOL)
    c = BatchNorm(5, ghost_batch=8)  # ghost >= per-worker chunk: one group per worker
    c.splits = 2
    d = BatchNorm(5, ghost_batch=4)
    torch.testing.assert_close(c(x), d(x), **TOL)


@pytest.mark.parametrize("k", [2, 4])
def test_emulated_workers_gradient_is_mean_of_worker_gradients(k):
    """The emulate_workers contract: full-batch mean-loss gradient == average of K workers' gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNorm(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 5))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    set_emulated_workers(model, k)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))
    F.cross_entropy(model(x), y).backward()

    worker_grads = []
    for xc, yc in zip(x.chunk(k), y.chunk(k)):
        ref = copy.deepcopy(model)
        ref[1] = nn.BatchNorm2d(4)
        ref[1].load_state_dict(model[1].state_dict())
        ref.zero_grad()
        F.cross_entropy(ref(xc), yc).backward()
        worker_grads.append([p.grad for p in ref.parameters()])
    for p, *gs in zip(model.parameters(), *worker_grads):
        torch.testing.assert_close(p.grad, torch.stack(gs).mean(0), **TOL)


def test_eval_uses_running_stats():
    bn = BatchNorm(4, ghost_batch=2)
    bn.splits = 2
    for _ in range(5):
        bn(torch.randn(8, 4, 3) + 3)
    bn.eval()
    x = torch.randn(3, 4, 3)  # any batch size in eval, even one the splits don't divide
    expected = (x - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
    expected = expected * bn.weight[:, None] + bn.bias[:, None]
    torch.testing.assert_close(bn(x), expected, **TOL)
    before = bn.running_mean.clone()
    bn(x)
    assert torch.equal(bn.running_mean, before) and bn.num_batches_tracked.item() == 5


def test_non_dividing_sizes_raise_config_error():
    bn = BatchNorm(3, ghost_batch=3)
    with pytest.raises(ConfigError, match="ghost_batch 3 does not divide the per-worker batch of 8"):
        bn(torch.randn(8, 3))
    bn = BatchNorm(3)
    bn.splits = 3
    with pytest.raises(ConfigError, match="batch of 8 samples does not split into 3"):
        bn(torch.randn(8, 3))
    with pytest.raises(ConfigError, match="variance"):
        BatchNorm(3, ghost_batch=1)(torch.randn(4, 3))  # one value per channel per group


def test_state_dict_keys_match_nn_batchnorm():
    ours = BatchNorm(7, ghost_batch=4)
    for ref in (nn.BatchNorm1d(7), nn.BatchNorm2d(7)):
        assert list(ours.state_dict()) == list(ref.state_dict())
        ref.load_state_dict(ours.state_dict())  # and interchangeable
    assert ours.state_dict()["running_var"].shape == (7,)


def test_sums_are_additive_for_cross_replica_reduction():
    """Summing per-group sums over groups (what an all-reduce would do) gives the whole-batch moments."""
    x = torch.randn(8, 3, 5)
    s, ss, count = group_sums(x, 4)
    mean, var = moments_from_sums(s.sum(0), ss.sum(0), count * 4)
    torch.testing.assert_close(mean, x.mean((0, 2)), **TOL)
    torch.testing.assert_close(var, x.var((0, 2), unbiased=False), **TOL)


def test_make_norm_and_set_emulated_workers():
    assert isinstance(make_norm("none", 4, 32), nn.Identity)
    assert make_norm("bn", 4, 32).ghost_batch is None
    assert make_norm("ghost", 4, 32).ghost_batch == 32
    with pytest.raises(ConfigError, match="unknown norm 'layer'"):
        make_norm("layer", 4, 32)
    model = nn.Sequential(make_norm("bn", 4, 32), nn.Linear(4, 4), make_norm("ghost", 4, 2))
    set_emulated_workers(model, 4)
    assert model[0].splits == 4 and model[2].splits == 4 and BatchNorm.splits == 1


def test_large_mean_small_std_is_accurate():
    """Shifted sums: no catastrophic cancellation of E[x^2] - E[x]^2 when |mean| >> std."""
    x = (torch.randn(64, 8, 4, 4) * 0.01 + 100).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ours, ref = BatchNorm(8, ghost_batch=16), nn.BatchNorm2d(8)
    y1, y2 = ours(x), torch.cat([ref(c) for c in x2.split(16)])
    torch.testing.assert_close(y1, y2, rtol=1e-3, atol=1e-3)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-3, atol=1e-6)
