"""DDP communication hooks built from the compressors, with byte accounting and per-step logs.

:class:`CompressionHook` is the state DDP passes to :func:`compress_hook` for every gradient bucket; it is
registered by :meth:`scalelab.parallel.runtime.Runtime.wrap` when ``compress.method`` is not ``none``. Per bucket:

* the first ``compress.warmup_steps`` steps are a plain averaging all-reduce (DGC keeps its momentum through them:
  it all-reduces the local velocity, which equals dense momentum SGD);
* parameters that are 1-D or smaller than ``compress.min_numel`` are all-reduced densely (as the DGC reference
  code does); the rest of the bucket is compressed as one flat vector;
* ``dgc``, ``topk``: sparse all-reduce (:mod:`scalelab.compress.sparse`), sparse or dense by the cost model;
  ``randomk``: shared random indices, the k values all-reduced; ``signsgd``, ``efsign``, ``qsgd``,
  ``terngrad``: the encoded payloads are all-gathered and decoded; ``powersgd``, ``fp16``, ``bf16``: torch's own
  hooks, unchanged (only counted).

Byte model (what this worker sends, per collective): ring all-reduce of S bytes ``2 (n-1)/n S``; ring all-gather
of p bytes per worker ``(n-1) p``. ``dense_bytes`` is what the plain all-reduce of the same bucket would have sent,
so ``compression_ratio = dense_bytes / bytes`` over the steps after the warm-up.

The compressor state (DGC's ``u``, ``v``, error-feedback residuals) lives per DDP bucket and per parameter inside
it: DDP rebuilds its buckets after the first step, and the state follows the parameters into the new buckets.
It is not checkpointed: a resumed run restarts it at zero.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from scalelab.compress.compressors import (QSGD, ErrorFeedback, MajoritySign, RandomK, ScaledSign, TernGrad,
                                           TopK, selected_dense)
from scalelab.compress.dgc import DGC, warmup_density
from scalelab.compress.sparse import CostModel, sparse_allreduce


def ring_allreduce_bytes(nbytes: int, n: int) -> int:
    return 0 if n <= 1 else (2 * (n - 1) * nbytes) // n


def ring_allgather_bytes(nbytes: int, n: int) -> int:
    return 0 if n <= 1 else (n - 1) * nbytes


@dataclass
class CompressStats:
    """Totals of one worker's gradient communication under compression (after the warm-up unless noted)."""

    bytes_total: int = 0          # every gradient byte sent, warm-up included
    bytes: int = 0                # after the warm-up
    dense_bytes: int = 0          # what plain all-reduce would have sent for the same buckets (after warm-up)
    sent_entries: int = 0         # entries sent by sparse methods (after warm-up)
    compressed_entries: int = 0   # entries of the compressed part of the buckets (after warm-up)
    encode_s: float = 0.0
    decode_s: float = 0.0
    sparse_calls: int = 0
    dense_calls: int = 0
    # this step, for the per-step log
    step: int = -1
    step_bytes: int = 0
    step_dense_bytes: int = 0
    step_sent: int = 0
    step_entries: int = 0
    step_decisions: list = field(default_factory=list)

    def ratio(self) -> float | None:
        return self.dense_bytes / self.bytes if self.bytes else None


class _Part:
    """Positions of a part of a bucket: a plain slice when they are contiguous (no gather copy), else an index."""

    def __init__(self, idx: torch.Tensor):
        self.idx = idx
        n = idx.numel()
        self.slice = (slice(int(idx[0]), int(idx[0]) + n)
                      if n and int(idx[-1]) - int(idx[0]) + 1 == n else None)

    def numel(self) -> int:
        return self.idx.numel()

    def key(self):
        return self.slice if self.slice is not None else self.idx


class _Layout:
    """Where each parameter of a bucket is: compressed part ``c`` or dense part ``d``, with offsets."""

    def __init__(self, bucket, min_numel: int):
        buf = bucket.buffer()
        self.sig = tuple(id(p) for p in bucket.parameters())
        comp, dense = [], []
        self.where: dict[int, tuple[str, int, int]] = {}
        oc = od = 0
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            start, n = g.storage_offset() - buf.storage_offset(), g.numel()
            r = torch.arange(start, start + n, device=buf.device)
            if p.dim() > 1 and n >= min_numel:
                comp.append(r)
                self.where[id(p)] = ("c", oc, n)
                oc += n
            else:
                dense.append(r)
                self.where[id(p)] = ("d", od, n)
                od += n
        empty = torch.empty(0, dtype=torch.long, device=buf.device)
        self.comp = _Part(torch.cat(comp) if comp else empty)
        self.dense = _Part(torch.cat(dense) if dense else empty)
        self.sizes = {"c": oc, "d": od}
        self.state: dict[tuple[str, str], torch.Tensor] = {}


class CompressionHook:
    """The state of the compression comm hook of one worker (see the module docstring).

    Args:
        rt: the :class:`~scalelab.parallel.runtime.Runtime` (group, world size, comm counters, current step).
        cfg: the run config (``compress`` section; ``recipe.momentum``/``nesterov`` for DGC).
        steps_per_epoch: for DGC's sparsity warm-up in epochs.
    """

    def __init__(self, rt, cfg, steps_per_epoch: int = 1):
        self.rt, self.c = rt, cfg.compress
        self.method = self.c.method
        self.n = rt.world_size
        self.spe = max(1, steps_per_epoch)
        self.cost = CostModel(self.c.alpha_s, self.c.link_gbit * 1e9 / 8)
        self.stats = CompressStats()
        self.gen = torch.Generator().manual_seed(1_000_003 * (cfg.train.seed + 1) + rt.rank)
        self.seed = cfg.train.seed
        self._layouts: dict[int, _Layout] = {}
        self._home: dict[int, _Layout] = {}  # parameter id -> the layout holding its state
        m = self.method
        self.ef = ErrorFeedback(enabled=(m == "efsign" or (m in ("topk", "randomk") and self.c.error_feedback)))
        self.dgc = DGC(cfg.recipe.momentum, cfg.recipe.nesterov, self.c.dgc_sample, self.c.dgc_clip, self.n)
        self.sparse = {"topk": TopK, "randomk": RandomK}.get(m, lambda d: None)(self.c.density)
        self.quant = {"efsign": ScaledSign(), "signsgd": MajoritySign(),
                      "qsgd": QSGD(self.c.qsgd_levels, generator=self.gen),
                      "terngrad": TernGrad(generator=self.gen)}.get(m)
        self.torch_hook, self.torch_state = None, None
        self._chain = None  # the previous bucket's future in this step (powersgd: buckets run one after another)
        if m in ("fp16", "bf16", "powersgd"):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
            if m == "powersgd":
                self.torch_state = powerSGD_hook.PowerSGDState(
                    process_group=rt.group, matrix_approximation_rank=self.c.powersgd_rank,
                    start_powerSGD_iter=self.c.warmup_steps, use_error_feedback=True, warm_start=True,
                    random_seed=cfg.train.seed)
                self.torch_hook = powerSGD_hook.powerSGD_hook
            else:
                self.torch_hook = default_hooks.fp16_compress_hook if m == "fp16" else default_hooks.bf16_compress_hook

    # ---- bookkeeping -----------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return getattr(self.rt, "step", 0)

    def in_warmup(self) -> bool:
        return self.step < self.c.warmup_steps

    def density(self) -> float:
        if self.method == "dgc":
            return warmup_density(self.step / self.spe, self.c.density, self.c.dgc_warmup_epochs)
        return self.c.density

    def _count(self, sent: int, dense: int, entries: int = 0, numel: int = 0) -> None:
        s = self.stats
        if s.step != self.step:
            s.step, s.step_bytes, s.step_dense_bytes, s.step_sent, s.step_entries = self.step, 0, 0, 0, 0
            s.step_decisions = []
        s.bytes_total += sent
        s.step_bytes += sent
        s.step_dense_bytes += dense
        s.step_sent += entries
        s.step_entries += numel
        if not self.in_warmup():
            s.bytes += sent
            s.dense_bytes += dense
            s.sent_entries += entries
            s.compressed_entries += numel
        self.rt.comm.bytes_sent += sent
        self.rt.comm.calls += 1
        self.rt.comm.last_launch = time.perf_counter()

    def _layout(self, bucket) -> _Layout:
        sig = tuple(id(p) for p in bucket.parameters())
        lay = self._layouts.get(bucket.index())
        if lay is None or lay.sig != sig:
            lay = _Layout(bucket, self.c.min_numel)
            self._layouts[bucket.index()] = lay
        return lay

    def _state(self, lay: _Layout, name: str, part: str, like: torch.Tensor) -> torch.Tensor:
        """The flat state ``name`` of a bucket part; carried over per parameter when buckets are rebuilt."""
        key = (name, part)
        t = lay.state.get(key)
        if t is None:
            t = torch.zeros(lay.sizes[part], dtype=like.dtype, device=like.device)
            for pid, (pt, off, n) in lay.where.items():
                old = self._home.get(pid)
                if pt == part and old is not None and old is not lay and key in old.state:
                    _, ooff, _ = old.where[pid]
                    t[off:off + n] = old.state[key][ooff:ooff + n]
                if pt == part:
                    self._home[pid] = lay
            lay.state[key] = t
        return t

    def summary(self) -> dict:
        s, ratio = self.stats, self.stats.ratio()
        return {"compress_method": self.method, "compression_ratio": ratio,
                "compress_bytes_after_warmup": s.bytes, "compress_dense_bytes_after_warmup": s.dense_bytes,
                "compress_grad_bytes_total": s.bytes_total,
                "compress_density": (s.sent_entries / s.compressed_entries) if s.compressed_entries else None,
                "compress_encode_s": s.encode_s, "compress_decode_s": s.decode_s,
                "compress_sparse_calls": s.sparse_calls, "compress_dense_calls": s.dense_calls}

    def step_record(self) -> dict:
        """The last step's figures, for ``metrics.jsonl`` (kind ``compress``)."""
        s = self.stats
        return {"method": self.method, "warmup": self.in_warmup(), "bytes": s.step_bytes,
                "dense_bytes": s.step_dense_bytes, "density": self.density() if self.sparse or
                self.method == "dgc" else None,
                "sent_entries": s.step_sent, "entries": s.step_entries, "decisions": s.step_decisions,
                "encode_s": s.encode_s, "decode_s": s.decode_s}

    # ---- the hook --------------------------------------------------------------------------------------
    def __call__(self, bucket) -> torch.futures.Future:
        buf = bucket.buffer()
        elem, numel = buf.element_size(), buf.numel()
        dense_b = ring_allreduce_bytes(numel * elem, self.n)
        if self.torch_hook is not None:
            return self._torch(bucket, buf, dense_b)
        lay = self._layout(bucket)
        if self.in_warmup():
            return self._warmup(lay, buf, dense_b)
        t0 = time.perf_counter()
        if self.method == "dgc":
            self.dgc.clip_(buf)
        futs, parts = [], []
        out = torch.empty_like(buf)
        if lay.dense.numel():
            xd = buf[lay.dense.key()]
            if self.method == "dgc":
                xd = self.dgc.velocity(xd, self._state(lay, "u", "d", buf))
            xd.div_(self.n)
            futs.append(self._allreduce(xd))
            parts.append(lay.dense)
            self._count(ring_allreduce_bytes(xd.numel() * elem, self.n), 0)
        if lay.comp.numel():
            xc = buf[lay.comp.key()]
            # sparse results are written straight into their slice of the output (no extra copy)
            into = out[lay.comp.slice] if lay.comp.slice is not None else None
            futs.append(self._compressed(lay, bucket, xc, elem, into))
            parts.append(lay.comp)
        self.stats.encode_s += time.perf_counter() - t0
        self.stats.step_dense_bytes += dense_b
        if not self.in_warmup():
            self.stats.dense_bytes += dense_b

        def assemble(_f):
            for f, part in zip(futs, parts):
                v = f.value()
                if part.slice is None or v.data_ptr() != out[part.slice].data_ptr():
                    out[part.key()] = v
            return out

        return torch.futures.collect_all(futs).then(assemble)

    def _allreduce(self, t: torch.Tensor) -> torch.futures.Future:
        if self.n == 1:
            fut = torch.futures.Future()
            fut.set_result(t)
            return fut
        fut = dist.all_reduce(t, group=self.rt.group, async_op=True).get_future()
        return fut.then(lambda f: t)

    def _warmup(self, lay: _Layout, buf: torch.Tensor, dense_b: int) -> torch.futures.Future:
        if self.method == "dgc":  # keep the momentum (in the compressor) running through the dense warm-up
            full = torch.empty_like(buf)
            if lay.comp.numel():
                full[lay.comp.key()] = self.dgc.velocity(buf[lay.comp.key()], self._state(lay, "u", "c", buf))
            if lay.dense.numel():
                full[lay.dense.key()] = self.dgc.velocity(buf[lay.dense.key()], self._state(lay, "u", "d", buf))
            buf = full
        buf.div_(self.n)
        self._count(dense_b, dense_b)
        return self._allreduce(buf)

    def _compressed(self, lay: _Layout, bucket, x: torch.Tensor, elem: int,
                    into: torch.Tensor | None = None) -> torch.futures.Future:
        n, numel, m = self.n, x.numel(), self.method
        if m == "dgc":
            u, v = self._state(lay, "u", "c", x), self._state(lay, "v", "c", x)
            density = self.density()
            idx, vals = self.dgc.step(x, u, v, density, generator=self.gen)
            cap = math.ceil(1.3 * max(1, math.ceil(density * numel)))
            return self._sparse(idx, vals, numel, min(cap, numel), into)
        if self.sparse is not None:
            e = self._state(lay, "e", "c", x)
            p = self.ef.add(x, e)
            seed = (self.seed * 7919 + self.step) * 1009 + bucket.index()
            idx, vals = self.sparse.select(p, seed=seed)
            self.ef.keep(e, p, selected_dense(p, idx))
            if self.sparse.shared_indices:  # random-k: same indices everywhere, all-reduce the values only
                vals = vals / n
                self._count(ring_allreduce_bytes(vals.numel() * elem, n), 0, idx.numel(), numel)

                def scatter(f):
                    t1 = time.perf_counter()
                    out = torch.zeros(numel, dtype=x.dtype, device=x.device)
                    out[idx] = f.value()
                    self.stats.decode_s += time.perf_counter() - t1
                    return out

                return self._allreduce(vals).then(scatter)
            return self._sparse(idx, vals, numel, self.sparse.capacity(numel), into)
        # quantizers: all-gather the payloads
        e = self._state(lay, "e", "c", x) if self.ef.enabled else None
        p = self.ef.add(x, e) if e is not None else x
        payload = self.quant.encode(p)
        if e is not None:
            self.ef.keep(e, p, self.quant.decode(payload, numel, x.dtype))
        self._count(ring_allgather_bytes(payload.numel(), n), 0, 0, numel)
        q = self.quant
        if n == 1:
            fut = torch.futures.Future()
            fut.set_result([payload])
            outs = [payload]
        else:
            outs = [torch.empty_like(payload) for _ in range(n)]
            fut = dist.all_gather(outs, payload, group=self.rt.group, async_op=True).get_future()

        def decode(_f):
            t1 = time.perf_counter()
            r = q.combine([q.decode(o, numel, x.dtype) for o in outs])
            self.stats.decode_s += time.perf_counter() - t1
            return r

        return fut.then(decode)

    def _sparse(self, idx, vals, numel, cap, into=None) -> torch.futures.Future:
        n = self.n
        vals = vals / n  # average: divide the k values before sending instead of the dense sum after
        fut, dec = sparse_allreduce(idx, vals, numel, cap, group=self.rt.group, cost=self.cost, out=into)
        self._count(dec.bytes_sent, 0, idx.numel(), numel)
        s = self.stats
        if dec.mode == "sparse":
            s.sparse_calls += 1
        else:
            s.dense_calls += 1
        s.step_decisions.append({"mode": dec.mode, "cap": cap, "numel": numel, "sparse_s": dec.sparse_s,
                                 "dense_s": dec.dense_s, "union_density_bound": dec.union_density_bound})

        def account(f):
            self.stats.decode_s += dec.decode_s
            return f.value()

        return fut.then(account)

    def _torch(self, bucket, buf, dense_b) -> torch.futures.Future:
        n, m = self.n, self.method
        if m == "powersgd":
            # torch's hook counts its own steps (start_powerSGD_iter = compress.warmup_steps), as ours do
            self._count(powersgd_bytes(self.torch_state, bucket, n), dense_b)
            return self._serialized(lambda: self.torch_hook(self.torch_state, bucket), bucket)
        if self.in_warmup():
            buf.div_(n)
            self._count(dense_b, dense_b)
            return self._allreduce(buf)
        self._count(ring_allreduce_bytes(buf.numel() * 2, n), dense_b)
        return self.torch_hook(self.rt.group, bucket)


    def _serialized(self, run, bucket) -> torch.futures.Future:
        """Start ``run()`` (a hook) only after the previous bucket's hook has finished.

        torch's PowerSGD hook launches its second and third all-reduce from future callbacks (a gloo thread),
        while DDP launches the next bucket's hook from the autograd thread: which collective comes first then
        differs between ranks, and gloo pairs mismatched collectives ("Received data size doesn't match
        expected size", seen with torch 2.13 on gloo). Chaining the buckets gives every rank the same order.
        """
        prev = self._chain
        if prev is None or prev.done():
            fut = run()
        else:
            fut = torch.futures.Future()

            def start(_f):
                def finish(g):
                    try:
                        fut.set_result(g.value())
                    except Exception as e:  # noqa: BLE001 - handed to DDP through the future
                        fut.set_exception(e)

                try:
                    run().add_done_callback(finish)
                except Exception as e:  # noqa: BLE001
                    fut.set_exception(e)

            prev.add_done_callback(start)
        self._chain = None if bucket.is_last() else fut
        return fut


def powersgd_bytes(state, bucket, n: int) -> int:
    """Bytes this worker sends in torch's ``powerSGD_hook`` for this bucket (before the hook runs).

    Mirrors the hook: plain all-reduce before ``start_powerSGD_iter``; then one all-reduce of the tensors it does
    not compress (1-D, or where ``_should_compress`` says no), one of all P factors (n_i x r) and one of all Q
    factors (m_i x r). Vogels, Karimireddy, Jaggi 2019, "PowerSGD: Practical Low-Rank Gradient Compression for
    Distributed Optimization", NeurIPS, arXiv 1905.13727.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    buf = bucket.buffer()
    e = buf.element_size()
    if state.iter < state.start_powerSGD_iter:
        return ring_allreduce_bytes(buf.numel() * e, n)
    unc = ps = qs = 0
    for t in bucket.gradients():
        rows = t.shape[0] if t.dim() > 0 else 1
        cols = t.numel() // max(rows, 1)
        r = min(rows, cols, state.matrix_approximation_rank)
        if _should_compress(rows, cols, r, state.min_compression_rate)[0]:
            ps += rows * r
            qs += cols * r
        else:
            unc += t.numel()
    return sum(ring_allreduce_bytes(k * e, n) for k in (unc, ps, qs) if k)


def compress_hook(state: CompressionHook, bucket):  # no annotations on the bucket: DDP inspects them
    """The DDP comm hook: ``ddp.register_comm_hook(CompressionHook(rt, cfg, spe), compress_hook)``."""
    return state(bucket)
