"""Normalisation layers: one BatchNorm for every layout, with ghost batches and emulated data-parallel
workers.

Batch normalisation (Ioffe & Szegedy 2015, arXiv 1502.03167) normalises each channel with statistics of the
current batch. In data-parallel training every worker normalises with the statistics of *its own* share of the
global batch, so the effective "BN batch" is B/K, not B. Large-batch studies depend on that detail:

* Ghost batch normalisation (Hoffer, Hubara & Soudry 2017, arXiv 1705.08741) deliberately normalises small
  contiguous virtual batches ("ghost batches") inside a large batch, to keep the regularising noise of
  small-batch BN when the batch grows.
* Emulated workers (``parallel.emulate_workers = K``) reproduce in one process what K workers would compute:
  the batch is split into K contiguous chunks and each is normalised on its own. The trainer sets ``splits``
  with :func:`set_emulated_workers`.
* Cross-replica BN (Ying et al. 2018, arXiv 1811.06992) goes the other way and pools the statistics of a
  group of workers: with real workers, :meth:`BatchNorm._cross_replica` all-reduces them over a process group
  (set by :func:`set_cross_replica`); emulated, ``set_emulated_workers(model, k, bn_group)`` makes the chunks
  those of the groups.

Example:
    >>> import torch
    >>> bn = BatchNorm(8, ghost_batch=4)
    >>> bn(torch.randn(16, 8, 5, 5)).shape    # four ghost batches of four samples
    torch.Size([16, 8, 5, 5])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scalelab.errors import ConfigError, unknown_name

NORMS = ("bn", "ghost", "none")


def group_sums(x: Tensor, groups: int, shift: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """Per-group, per-channel sums of ``x - shift`` and of its squares, over contiguous groups of the batch.

    Args:
        x: input of shape (N, C, *spatial); N must be divisible by ``groups``.
        groups: number of contiguous groups G along dim 0.
        shift: per-channel constant (C,) subtracted first; ``None`` for zero. Subtracting a value close to the
            mean (e.g. the detached batch mean) avoids the cancellation of the one-pass variance formula
            E[x^2] - E[x]^2 when |mean| >> std; the variance is shift-invariant and, the shift being a
            constant, so are the gradients.

    Returns:
        ``(s, ss, count)``: ``s`` and ``ss`` of shape (G, C), and the number of values per group and channel.
        These are additive over disjoint sets of samples, so a cross-replica BN can all-reduce them (sum over
        workers, who must then use a common shift) before calling :func:`moments_from_sums`.
    """
    n, c = x.shape[0], x.shape[1]
    # Accumulate half-precision inputs in float32: sums of squares overflow/underflow easily in fp16.
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if shift is not None:
        x = x - shift.reshape((1, c) + (1,) * (x.dim() - 2))
    xg = x.reshape(groups, n // groups, c, *x.shape[2:])
    dims = (1, *range(3, xg.dim()))  # everything but group and channel
    count = (n // groups) * xg[0, 0, 0].numel()
    return xg.sum(dims), (xg * xg).sum(dims), count


def moments_from_sums(s: Tensor, ss: Tensor, count: int,
                      shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance from :func:`group_sums` output (possibly already all-reduced).

    ``shift`` must be the one given to :func:`group_sums`. The variance is clamped at zero against rounding.
    """
    d = s / count  # mean of x - shift
    var = (ss / count - d * d).clamp_min(0.0)
    return (d if shift is None else d + shift), var


class BatchNorm(nn.Module):
    """Batch normalisation of (N, C), (N, C, L) and (N, C, H, W) inputs, with ghost BN and emulated workers.

    In training mode the batch of N samples is split into ``splits`` equal contiguous chunks (one per emulated
    worker) and, if ``ghost_batch`` is set, every chunk further into contiguous ghost batches of
    ``ghost_batch`` samples (Hoffer et al. 2017). Each group is normalised with its own mean and biased
    variance; the affine parameters are shared. With a single group the layer calls ``F.batch_norm`` exactly
    as ``nn.BatchNorm*d`` does, so it is bit-identical to it. In eval mode the running statistics are used.

    The running statistics receive one EMA update per group, in batch order, as in Hoffer et al.'s
    implementation (sequential updates per ghost batch), but in closed form: after G updates with momentum m,
    ``r <- (1-m)^G r + sum_i m (1-m)^(G-1-i) s_i``. The running variance uses the unbiased group variance,
    like PyTorch. ``num_batches_tracked`` counts forward calls. The state dict has the keys of
    ``nn.BatchNorm*d``.

    Args:
        num_features: channels C.
        eps: added to the variance.
        momentum: EMA factor of the running statistics (PyTorch convention: weight of the new value).
        ghost_batch: virtual batch size; ``None`` for plain BN. A ghost batch not smaller than the per-worker
            chunk (e.g. at evaluation-sized batches) means one group per chunk.
    """

    splits: int = 1  # set by the trainer (set_emulated_workers): number of emulated data-parallel workers
    process_group = None  # set by set_cross_replica: statistics are all-reduced over this group of workers
    replicas: int = 1  # the size of process_group

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 ghost_batch: int | None = None) -> None:
        super().__init__()
        if ghost_batch is not None and ghost_batch < 1:
            raise ConfigError(f"ghost_batch: {ghost_batch} must be >= 1")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.ghost_batch = ghost_batch
        self.weight = nn.Parameter(torch.empty(num_features))
        self.bias = nn.Parameter(torch.empty(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"ghost_batch={self.ghost_batch}, splits={self.splits}")

    def num_groups(self, n: int) -> int:
        """Number of normalisation groups for a training batch of ``n`` samples.

        Raises:
            ConfigError: if the batch does not split into ``splits`` chunks, or a chunk into ghost batches.
        """
        if n % self.splits:
            raise ConfigError(f"BatchNorm: a batch of {n} samples does not split into {self.splits} emulated "
                              f"workers; the batch size must be divisible by parallel.emulate_workers")
        chunk = n // self.splits
        if self.ghost_batch is None or self.ghost_batch >= chunk:
            return self.splits
        if chunk % self.ghost_batch:
            raise ConfigError(f"BatchNorm: ghost_batch {self.ghost_batch} does not divide the per-worker "
                              f"batch of {chunk} samples (batch {n}, {self.splits} workers)")
        return n // self.ghost_batch

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm({self.num_features}) expects (N, {self.num_features}, *), "
                             f"got {tuple(x.shape)}")
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False,
                                self.momentum, self.eps)
        self.num_batches_tracked.add_(1)
        if self.process_group is not None:
            return self._cross_replica(x)
        groups = self.num_groups(x.shape[0])
        if groups == 1:
            # Exactly what nn.BatchNorm*d does in training mode, hence bit-identical to it.
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                                self.momentum, self.eps)
        return self._grouped(x, groups)

    def _grouped(self, x: Tensor, groups: int) -> Tensor:
        """Normalise ``groups`` contiguous groups at once: reshape to (G, N/G, C, *) and reduce, no loop."""
        # Shift by the detached whole-batch mean: group means sit close to it, so little cancellation.
        shift = x.detach().mean((0, *range(2, x.dim()))).to(torch.promote_types(x.dtype, torch.float32))
        s, ss, count = group_sums(x, groups, shift)
        if count < 2:
            raise ConfigError(f"BatchNorm: groups of {x.shape[0] // groups} sample(s) of shape "
                              f"{tuple(x.shape[1:])} have one value per channel; the variance is undefined "
                              f"(ghost batch or per-worker batch too small)")
        mean, var = moments_from_sums(s, ss, count, shift)
        self._update_running(mean.detach(), var.detach() * (count / (count - 1)))
        return self._normalize(x, groups, mean, var)

    def _cross_replica(self, x: Tensor) -> Tensor:
        """Statistics over the whole batch of every worker in ``process_group`` (Ying et al. 2018).

        Two passes, each one all-reduce of C numbers per layer: the sum gives the group mean, then the sum of
        squared deviations from it gives the variance. The one-pass E[x^2] - E[x]^2 would save one collective
        but loses the variance to cancellation wherever a channel's mean is large against its spread, and a
        mis-estimated variance of a nearly constant channel multiplies the error through rsqrt. The all-reduces
        are autograd-aware (``torch.distributed.nn``): the backward pass sums the statistics' gradients over
        the group too, so the gradient is that of the loss over the group's combined batch. Works with gloo on
        CPU (PyTorch's SyncBatchNorm is CUDA-only).
        """
        import torch.distributed.nn.functional as dist_fn

        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        dims = (0, *range(2, x.dim()))
        count = x.numel() // x.shape[1] * self.replicas
        mean = dist_fn.all_reduce(xf.sum(dims), group=self.process_group) / count
        centred = xf - mean.reshape((1, -1) + (1,) * (x.dim() - 2))
        var = dist_fn.all_reduce((centred * centred).sum(dims), group=self.process_group) / count
        mean, var = mean.unsqueeze(0), var.unsqueeze(0)
        self._update_running(mean.detach(), var.detach() * (count / (count - 1)))
        return self._normalize(x, 1, mean, var)

    def _normalize(self, x: Tensor, groups: int, mean: Tensor, var: Tensor) -> Tensor:
        """``(x - mean) * rsqrt(var + eps) * gamma + beta`` with (G, C) statistics for G contiguous groups."""
        # Subtracting the mean first (rather than folding it into the offset, beta - mean * scale) avoids
        # cancellation when |mean| >> std.
        view = (groups, 1, self.num_features) + (1,) * (x.dim() - 2)
        scale = (torch.rsqrt(var + self.eps) * self.weight).reshape(view)
        xg = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        y = torch.addcmul(self.bias.reshape(view[1:]), xg - mean.reshape(view), scale)
        return y.reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var_unbiased: Tensor) -> None:
        """G sequential EMA updates in closed form; group i gets weight m (1-m)^(G-1-i)."""
        g, m = mean.shape[0], self.momentum
        powers = torch.arange(g - 1, -1, -1, dtype=torch.float64, device=mean.device)
        w = (m * (1.0 - m) ** powers).to(mean.dtype).unsqueeze(1)
        keep = (1.0 - m) ** g
        self.running_mean.mul_(keep).add_((w * mean).sum(0).to(self.running_mean.dtype))
        self.running_var.mul_(keep).add_((w * var_unbiased).sum(0).to(self.running_var.dtype))


def make_norm(kind: str, num_features: int, ghost_batch: int) -> nn.Module:
    """The normalisation layer of ``model.norm``: ``"bn"``, ``"ghost"`` (uses ``ghost_batch``) or ``"none"``.

    Raises:
        ConfigError: for an unknown kind.
    """
    if kind == "bn":
        return BatchNorm(num_features)
    if kind == "ghost":
        return BatchNorm(num_features, ghost_batch=ghost_batch)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(unknown_name("norm", kind, NORMS))


def set_emulated_workers(model: nn.Module, k: int, bn_group: int = 1) -> None:
    """Make every :class:`BatchNorm` in ``model`` behave as in ``k`` data-parallel workers.

    With ``bn_group = 1`` each worker normalises its own B/k chunk; with ``bn_group = g`` the statistics are
    pooled over groups of g consecutive workers (cross-replica BN, Ying et al. 2018), i.e. over k/g chunks;
    ``bn_group = 0`` pools all k workers (plain BN over the global batch).
    """
    if k < 1:
        raise ConfigError(f"parallel.emulate_workers: {k} must be >= 1")
    g = bn_group or k
    if k % g:
        raise ConfigError(f"parallel.bn_group: {bn_group} must divide the number of workers {k}")
    for module in model.modules():
        if isinstance(module, BatchNorm):
            module.splits = k // g


def set_cross_replica(model: nn.Module, group, size: int) -> None:
    """Make every :class:`BatchNorm` in ``model`` all-reduce its statistics over ``group`` (``size`` workers)."""
    for module in model.modules():
        if isinstance(module, BatchNorm):
            if module.ghost_batch is not None:
                raise ConfigError("model.norm: ghost BN and cross-replica BN (parallel.bn_group != 1) "
                                  "do not combine; choose one")
            module.process_group, module.replicas = group, size
