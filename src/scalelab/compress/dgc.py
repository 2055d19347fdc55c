"""Deep Gradient Compression: top-k sparsification with momentum correction and the paper's full recipe.

Lin, Han, Mao, Wang, Dally 2018, "Deep Gradient Compression: Reducing the Communication Bandwidth for Distributed
Training", ICLR, arXiv 1712.01887; details of the reference code (``synxlin/deep-gradient-compression``) where the
paper leaves them open. Per worker ``k`` and flat tensor, with momentum ``m``:

* local gradient clipping (section 3.2): the worker's gradient is clipped to norm ``thr / sqrt(N)`` before it is
  accumulated (``thr`` = ``compress.dgc_clip``; the norm is over all parameters, as in the paper: the hook holds
  the DDP buckets back until the last one has arrived, see :mod:`scalelab.compress.hooks`);
* momentum correction (3.1): ``u <- m u + g``; ``v <- v + u``; (Nesterov, as in the code: ``u <- m (u + g)``,
  ``v <- v + u + g``);
* sparsification with local accumulation (2): send the entries of ``v`` above a threshold, keep the rest in ``v``;
* momentum factor masking (3.3): where an entry was sent, zero it in both ``v`` and ``u``;
* warm-up (3.4): density 25%, 6.25%, 1.5625%, 0.39% over the warm-up epochs (sparsity 75%, 93.75%, 98.4375%,
  99.6%), then the final density (0.1% = 99.9% sparsity by default);
* threshold by sampling (reference code): top-k of a strided random sample of ``|v|`` gives a threshold, lowered
  by 0.8 while too few entries pass; then the exact top-k among those that passed, so that exactly ``k`` entries
  are sent (the reference code sends between 0.8 k and 1.3 k).

The update sent is the sum over workers of the sparse ``v``, divided by ``N``; the optimizer then applies
``w <- w - lr * update`` with *no momentum on the gradient* (the momentum lives here) and the weight decay with a
momentum buffer of its own, as the reference code does (:func:`scalelab.compress.dgc_optimizer`). Tensors that are
1-D or small are all-reduced densely every step; for them ``u`` is averaged instead, which equals momentum after
averaging.

Optionally (``compress.dgc_lr_weighted``) ``v`` accumulates ``lr_t * u`` and the values sent are divided by the
current LR: a delayed entry is then applied with the LR of the steps it came from, not of the step that sends it,
as the memory of error feedback is written by Stich, Cordonnier & Jaggi 2018 ("Sparsified SGD with Memory",
NeurIPS, arXiv 1809.07599) and Karimireddy et al. 2019 (arXiv 1901.09847). Under a constant LR it is the paper's
update.
"""

from __future__ import annotations

import math

import torch

from scalelab.compress.compressors import selected_dense

# densities of the paper's exponential warm-up (sparsity 75%, 93.75%, 98.4375%, 99.6%)
WARMUP_DENSITIES = (0.25, 0.0625, 0.015625, 0.00390625)


def warmup_density(epoch: float, final: float, warmup_epochs: float) -> float:
    """Density at ``epoch``: the paper's four warm-up stages spread evenly over ``warmup_epochs``, then ``final``.

    >>> [warmup_density(e, 0.001, 4) for e in (0, 1, 2, 3, 4)]
    [0.25, 0.0625, 0.015625, 0.00390625, 0.001]
    """
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return final
    stage = min(len(WARMUP_DENSITIES) - 1, int(epoch * len(WARMUP_DENSITIES) / warmup_epochs))
    return max(final, WARMUP_DENSITIES[stage])


# group size of the candidate search: the group maxima of |x| cost two reduction passes (max, min) and, at the
# final density 0.1%, leave about 3% of the groups to look into
BLOCK = 32


def sampled_threshold_select(x: torch.Tensor, density: float, sample: float = 0.01, rounds: int = 10,
                             generator: torch.Generator | None = None, offset: int | None = None) -> torch.Tensor:
    """Indices (ascending) of the ``k = ceil(density * n)`` largest ``|x|`` (fewer when ``x`` has fewer non-zeros),
    found through a sampled threshold instead of a sort.

    The threshold is the smallest of the top ``ceil(1.3 density * s)`` magnitudes of a strided sample of
    ``s = max(sample * n, 2 / density)`` entries with a random offset (the reference code's estimate, aimed at
    ``1.3 k`` so that one round usually suffices). While fewer
    than ``k`` entries pass (``|x| >= thr``) it is lowered by 0.8 (at most ``rounds`` times, then an exact top-k of
    the whole tensor); once ``k`` or more pass, the exact top-k among them is the top-k of ``x``, since every entry
    left out is below ``thr``. (The reference code sends whatever passes between ``0.8 k`` and ``1.3 k``; exactly
    ``k`` keeps the paper's sparsity and lets the message be ``k`` pairs long, not ``1.3 k``.) The sample's random
    offset comes from ``generator``, or is ``offset`` (taken modulo the stride; the hooks derive it from the step
    and the parameter, so that it does not depend on how DDP groups the parameters into buckets). At low density no
    full-length temporary either: the compare runs on the groups of ``BLOCK`` entries (strided by ``n // BLOCK``)
    whose maximum magnitude passes (group maxima from one max and one min reduction), so the full-length work is
    two reading passes whatever the number of rounds.
    """
    n = x.numel()
    k = max(1, math.ceil(density * n))
    if k >= n:
        return torch.arange(n, device=x.device)
    ns = min(n, max(math.ceil(sample * n), math.ceil(2 / density)))
    if ns >= n // 2:  # small tensor: the sample would be most of it
        return _exact_topk(x, k)
    stride = n // ns
    if stride <= 1:
        start = 0
    elif offset is not None:
        start = offset % stride
    else:
        start = int(torch.randint(0, stride, (1,), generator=generator))
    samp = x[start::stride][:ns].abs()
    # aim at about 1.3 k passing: trimming to k is cheap, another round of the search is not
    thr = torch.topk(samp, max(1, math.ceil(1.3 * density * samp.numel())), sorted=False).values.min()
    thr = thr.clamp(min=torch.finfo(x.dtype).tiny)  # exact zeros never pass (nothing to send there)
    if density * BLOCK >= 0.5 or n < 4 * BLOCK:  # dense enough that most blocks would pass anyway
        a = x.abs()
        for _ in range(rounds):
            idx = torch.nonzero(a >= thr).view(-1)
            if idx.numel() >= k:
                return idx[torch.topk(a[idx], k, sorted=False).indices].sort().values
            thr = thr * 0.8
        return _exact_topk(x, k)
    nb = n // BLOCK
    # group j holds the entries j, j + nb, ..., j + (BLOCK - 1) nb: its maximum is an elementwise max over BLOCK
    # contiguous rows (a vectorised pass), where a max over contiguous blocks of BLOCK entries reduces short rows
    rows = x[:nb * BLOCK].view(BLOCK, nb)
    gmax = torch.maximum(rows.amax(0), rows.amin(0).neg_())  # max |x| per group
    tail, tail_at = x[nb * BLOCK:].abs(), nb * BLOCK
    for _ in range(rounds):
        cand = torch.nonzero(gmax >= thr).view(-1)
        sub = rows.index_select(1, cand).abs_()  # only the candidate groups are copied (faster than rows[:, cand])
        hit = torch.nonzero(sub >= thr)
        idx = torch.cat([hit[:, 0] * nb + cand[hit[:, 1]], torch.nonzero(tail >= thr).view(-1) + tail_at])
        if idx.numel() >= k:
            a = x[idx].abs_()
            return idx[torch.topk(a, k, sorted=False).indices].sort().values
        thr = thr * 0.8
    return _exact_topk(x, k)


def _exact_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest ``|x|`` by a full top-k, ascending, exact zeros left out (never sent)."""
    idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
    return idx[x[idx] != 0]


class DGC:
    """The per-tensor state and update of DGC; ``step`` returns the indices and values to send.

    Args:
        momentum: ``m`` (``recipe.momentum``).
        nesterov: Nesterov form of the reference code.
        sample: fraction of entries sampled for the threshold.
        clip: local clipping threshold ``thr_G`` (0 = off); each worker clips to ``thr_G / sqrt(world)``.
        world: number of workers ``N``.

    Example:
        >>> import torch
        >>> d = DGC(momentum=0.9)
        >>> u, v = torch.zeros(8), torch.zeros(8)
        >>> idx, vals = d.step(torch.arange(8.0), u, v, density=0.25)
        >>> sorted(idx.tolist()), v.tolist()[:6]
        ([6, 7], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    """

    def __init__(self, momentum: float = 0.9, nesterov: bool = False, sample: float = 0.01, clip: float = 0.0,
                 world: int = 1):
        self.m, self.nesterov, self.sample = momentum, nesterov, sample
        self.clip, self.world = clip, world

    def clip_scale(self, norm: float) -> float:
        """Local gradient clipping: the factor that brings a gradient of ``norm`` to at most ``clip / sqrt(N)``."""
        limit = self.clip / math.sqrt(self.world)
        return limit / (norm + 1e-12) if self.clip > 0 and norm > limit else 1.0

    def clip_(self, g: torch.Tensor) -> torch.Tensor:
        """Scale ``g`` in place to norm at most ``clip / sqrt(N)`` (the whole gradient of this worker)."""
        scale = self.clip_scale(float(g.norm()))
        return g.mul_(scale) if scale != 1.0 else g

    def accumulate(self, g: torch.Tensor, u: torch.Tensor, v: torch.Tensor, weight: float = 1.0) -> None:
        """Momentum correction and local accumulation, in place: ``u <- m u + g``, ``v <- v + weight * u``
        (``weight``: the step's LR when the accumulation is LR-weighted, see :meth:`CompressionHook._dgc`)."""
        if self.nesterov:
            u.add_(g).mul_(self.m)
            v.add_(u, alpha=weight).add_(g, alpha=weight)
        else:
            torch.add(g, u, alpha=self.m, out=u)  # u <- g + m u in one pass
            v.add_(u, alpha=weight)

    def velocity_(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """For densely exchanged entries: the local momentum step ``u <- m u + g``; ``g`` becomes what is sent
        (``u``, or ``u + g`` in the Nesterov form). In place; returns ``g``."""
        if self.nesterov:
            u.add_(g).mul_(self.m)
            return g.add_(u)
        u.mul_(self.m).add_(g)
        return g.copy_(u)

    def select_and_mask(self, u: torch.Tensor, v: torch.Tensor, density: float,
                        generator: torch.Generator | None = None, offset: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick the entries of ``v`` to send, copy their values, and zero them in ``v`` and ``u`` (masking)."""
        idx = sampled_threshold_select(v, density, self.sample, generator=generator, offset=offset)
        vals = v.index_select(0, idx)  # a copy of the k values (the gather)
        v.index_fill_(0, idx, 0)  # momentum factor masking: sent entries leave both accumulators
        u.index_fill_(0, idx, 0)
        return idx, vals

    def step(self, g: torch.Tensor, u: torch.Tensor, v: torch.Tensor, density: float,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate ``g`` (already clipped), select, mask; returns ``(indices, values)`` to send.

        Everything happens in place on ``u`` and ``v``: two or four elementwise passes for the momentum correction,
        two reading passes for the threshold search, and work proportional to the number of entries sent.
        """
        self.accumulate(g, u, v)
        return self.select_and_mask(u, v, density, generator)


def mix_seed(*ints: int) -> int:
    """A 62-bit hash of some integers (splitmix64 steps): a sample offset per (seed, rank, step, parameter)."""
    h = 0x9E3779B97F4A7C15
    for i in ints:
        h = (h ^ (i & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h >> 2


def residual_plus_sent(v: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """``v + sparse(idx, vals)``: what DGC held before it sent (for checks)."""
    out = v.clone()
    out[idx] += vals
    return out


__all__ = ["DGC", "WARMUP_DENSITIES", "warmup_density", "sampled_threshold_select", "residual_plus_sent", "mix_seed",
           "selected_dense"]
