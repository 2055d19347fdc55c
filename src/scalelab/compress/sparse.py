"""Sparse all-reduce: (index, value) pairs by all-gather, or dense all-reduce when that is cheaper.

The idea of SparCML (Renggli, Ashkboos, Aghagolzadeh, Alistarh, Hoefler 2019, "SparCML: High-Performance Sparse
Communication for Machine Learning", SC'19, arXiv 1802.08021): sparse gradients travel as (index, value) pairs;
when the sum fills in (the union of the supports grows with the number of workers) a dense representation is
cheaper, and the collective switches to it.

Here every worker contributes at most ``cap`` pairs (``cap`` is known to all workers in advance, so the choice
can be made before anything is sent, and no extra round trip exchanges the counts). The message of a worker is one
tensor ``[count, idx_0 .. idx_{cap-1}, val_0 .. val_{cap-1}]`` in the values' dtype, the indices stored as integers
of the same width (int32 under float32) and reinterpreted bit for bit.

Cost model (alpha-beta, Hockney 1994; ring algorithms as in Thakur, Rabenseifner, Gropp 2005):

* sparse, ring all-gather of ``p = (2 cap + 1) * e`` bytes per worker: ``(n-1) alpha + (n-1) p / beta``; each
  worker *sends* ``(n-1) p`` bytes (it forwards every other worker's block once);
* dense, ring all-reduce of ``D * e`` bytes: ``2 (n-1) alpha + 2 (n-1)/n * D e / beta``; each worker sends
  ``2 (n-1)/n * D e`` bytes (:func:`scalelab.parallel.runtime.ring_bytes_sent`).

In bandwidth, sparse wins while ``n (2 cap + 1) < 2 D``, i.e. while the union density ``n cap / D`` stays below
about 1: at 75% sparsity (density 0.25) on 8 workers the all-gather moves as much as the dense all-reduce, on
32 workers 4x more (the pitfall DGC's authors note; hence dense warm-up). The decision and both costs are returned
with every call, and the hooks log them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


@dataclass
class CostModel:
    """Alpha-beta model of one link: ``alpha_s`` per message, ``beta`` bytes/s."""

    alpha_s: float = 5e-5
    beta: float = 1.25e8  # 1 Gbit/s

    def dense_s(self, numel: int, elem: int, n: int) -> float:
        if n <= 1:
            return 0.0
        return 2 * (n - 1) * self.alpha_s + 2 * (n - 1) / n * numel * elem / self.beta

    def sparse_s(self, cap: int, elem: int, n: int) -> float:
        if n <= 1:
            return 0.0
        return (n - 1) * self.alpha_s + (n - 1) * (2 * cap + 1) * elem / self.beta


@dataclass
class Decision:
    """What one sparse all-reduce did: ``sparse`` or ``dense``, the model's costs, and the bytes this rank sent."""

    mode: str
    sparse_s: float
    dense_s: float
    bytes_sent: int
    union_density_bound: float  # n * cap / D: an upper bound of the union's density
    decode_s: float = 0.0  # time to scatter-add the gathered messages (set when the future completes)


def choose(numel: int, cap: int, elem: int, n: int, cost: CostModel, force: str = "auto") -> Decision:
    """Decide sparse or dense for ``n`` workers with at most ``cap`` of ``numel`` entries each."""
    s, d = cost.sparse_s(cap, elem, n), cost.dense_s(numel, elem, n)
    mode = force if force != "auto" else ("sparse" if s < d else "dense")
    if n <= 1:
        sent = 0
    elif mode == "sparse":
        sent = (n - 1) * (2 * cap + 1) * elem
    else:
        sent = (2 * (n - 1) * numel * elem) // n
    return Decision(mode, s, d, sent, min(1.0, n * cap / max(numel, 1)))


def pack(idx: torch.Tensor, vals: torch.Tensor, cap: int) -> torch.Tensor:
    """One worker's message ``[count, indices (padded), values (padded)]`` in ``vals.dtype``."""
    k = idx.numel()
    if k > cap:
        raise ValueError(f"sparse all-reduce: {k} entries exceed the capacity {cap}")
    it = _INT_OF[vals.dtype]
    ints = torch.zeros(cap + 1, dtype=it, device=vals.device)
    ints[0] = k
    ints[1:k + 1] = idx.to(it)
    out = torch.zeros(2 * cap + 1, dtype=vals.dtype, device=vals.device)
    out[: cap + 1] = ints.view(vals.dtype)
    out[cap + 1: cap + 1 + k] = vals
    return out


def unpack_add(msg: torch.Tensor, cap: int, into: torch.Tensor) -> None:
    """Scatter-add one message into the dense vector ``into``."""
    ints = msg[: cap + 1].contiguous().view(_INT_OF[msg.dtype])
    k = int(ints[0])
    into.index_add_(0, ints[1:k + 1].long(), msg[cap + 1: cap + 1 + k])


def sparse_allreduce(idx: torch.Tensor, vals: torch.Tensor, numel: int, cap: int, group=None,
                     cost: CostModel | None = None, force: str = "auto", out: torch.Tensor | None = None,
                     zero: bool = True):
    """Sum sparse vectors over all workers; returns ``(future of the dense sum, Decision)``.

    Args:
        idx, vals: this worker's entries (unique indices, at most ``cap``).
        numel: length of the dense vector.
        cap: the most entries any worker sends (the same on every worker).
        group: process group (None: the default group; world size 1 without one).
        cost: the alpha-beta model for the choice (default 50 us, 1 Gbit/s).
        force: ``"auto"``, ``"sparse"`` or ``"dense"``.
        out: a contiguous tensor of length ``numel`` to write the sum into (default: a new one).
        zero: zero ``out`` first (default). ``False`` adds into it as it is: what it holds at the other positions
            is then summed over workers as well in dense mode, and left as it is in sparse mode.

    The future's value is the dense sum (not the mean) over workers, in ``out`` when given.
    """

    def fresh():
        if out is None:
            return torch.zeros(numel, dtype=vals.dtype, device=vals.device)
        return out.zero_() if zero else out

    n = dist.get_world_size(group) if dist.is_initialized() else 1
    dec = choose(numel, cap, vals.element_size(), n, cost or CostModel(), force)
    if n == 1:
        res = fresh()
        res.index_add_(0, idx.long(), vals)
        fut = torch.futures.Future()
        fut.set_result(res)
        return fut, dec
    if dec.mode == "dense":
        dense = fresh()
        dense.index_add_(0, idx.long(), vals)
        fut = dist.all_reduce(dense, group=group, async_op=True).get_future()
        return fut.then(lambda f: dense), dec
    msg = pack(idx, vals, cap)
    outs = [torch.empty_like(msg) for _ in range(n)]
    fut = dist.all_gather(outs, msg, group=group, async_op=True).get_future()

    def decode(_f):
        t0 = time.perf_counter()
        dense = fresh()
        for m in outs:
            unpack_add(m, cap, dense)
        dec.decode_s = time.perf_counter() - t0
        return dense

    return fut.then(decode), dec
