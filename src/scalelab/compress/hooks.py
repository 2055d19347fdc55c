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

DGC works on the bucket's flat buffer in place: its ``u`` and ``v`` are bucket-sized (``v`` stays zero at the
densely exchanged positions), the sum arrives in the buffer itself, and no full-length temporary is made per step.
With local clipping (``compress.dgc_clip``) the buckets are held back until the last one has arrived, so that the
norm is the one of the whole gradient (the paper's); DGC's traffic is small enough that losing the overlap of
communication with the backward pass costs little.

The compressor state (DGC's ``u``, ``v``, error-feedback residuals, torch's PowerSGD state) lives per DDP bucket
and per parameter inside it: DDP rebuilds its buckets after the first step (and again after a resume), and the
state follows the parameters into the new buckets. :meth:`CompressionHook.state_dict` gives it per parameter for
checkpoints; :meth:`CompressionHook.load_state_dict` puts it back.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from scalelab.compress.compressors import (QSGD, ErrorFeedback, MajoritySign, RandomK, ScaledSign, TernGrad,
                                           TopK, selected_dense)
from scalelab.compress.dgc import DGC, mix_seed, warmup_density
from scalelab.compress.sparse import CostModel, choose, sparse_allreduce


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
    """Positions of a part of a bucket: a plain slice when they are contiguous (no gather copy), else an index;
    ``runs`` are its contiguous pieces as ``(start, stop)``."""

    def __init__(self, idx: torch.Tensor, runs: list[tuple[int, int]]):
        self.idx, self.runs = idx, runs
        self.slice = slice(*runs[0]) if len(runs) == 1 else None

    def numel(self) -> int:
        return self.idx.numel()

    def key(self):
        return self.slice if self.slice is not None else self.idx


def _merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(runs):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class _Layout:
    """Where each parameter of a bucket is: compressed part ``c`` or dense part ``d``, and the whole bucket ``b``.

    ``span(pid, part)`` is the parameter's ``(offset, numel)`` in a flat state of that part (``c``: the compressed
    entries packed together; ``d``: the dense ones; ``b``: bucket positions).
    """

    def __init__(self, bucket, min_numel: int):
        buf = bucket.buffer()
        self.sig = tuple(id(p) for p in bucket.parameters())
        comp, dense = [], []
        self.comp_params: list[tuple[int, int, int]] = []  # (parameter id, bucket offset, numel), compressed
        self.spans: dict[str, dict[int, tuple[int, int]]] = {"c": {}, "d": {}, "b": {}}
        oc = od = 0
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            start, n = g.storage_offset() - buf.storage_offset(), g.numel()
            self.spans["b"][id(p)] = (start, n)
            if p.dim() > 1 and n >= min_numel:
                comp.append((start, start + n))
                self.comp_params.append((id(p), start, n))
                self.spans["c"][id(p)] = (oc, n)
                oc += n
            else:
                dense.append((start, start + n))
                self.spans["d"][id(p)] = (od, n)
                od += n

        def part(runs):
            idx = [torch.arange(a, b, device=buf.device) for a, b in runs]
            return _Part(torch.cat(idx) if idx else torch.empty(0, dtype=torch.long, device=buf.device),
                         _merge(runs))

        self.comp, self.dense = part(comp), part(dense)
        self.sizes = {"c": oc, "d": od, "b": buf.numel()}
        self.state: dict[str, torch.Tensor] = {}

    def span(self, pid: int, part: str) -> tuple[int, int] | None:
        return self.spans[part].get(pid)


# the part of a bucket each kind of state covers: DGC's momentum u and accumulator v are bucket-sized (v is zero
# at the dense positions), error-feedback residuals cover the compressed entries only
STATE_PART = {"u": "b", "v": "b", "e": "c"}


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
        self._home: dict[tuple[str, int], _Layout] = {}  # (state name, parameter id) -> the layout holding it
        self._loaded: dict[tuple[str, int], torch.Tensor] = {}  # from a checkpoint, not yet placed in a layout
        self._held: list = []  # DGC with clipping: buckets held back until the last one (global norm)
        self._index: dict[int, int] = {}  # parameter id -> its index in the model (see bind)
        m = self.method
        self.ef = ErrorFeedback(enabled=(m == "efsign" or (m in ("topk", "randomk") and self.c.error_feedback)))
        self.dgc = DGC(cfg.recipe.momentum, cfg.recipe.nesterov, self.c.dgc_sample, self.c.dgc_clip, self.n)
        self.sparse = {"topk": TopK, "randomk": RandomK}.get(m, lambda d: None)(self.c.density)
        self.quant = {"efsign": ScaledSign(), "signsgd": MajoritySign(),
                      "qsgd": QSGD(self.c.qsgd_levels, generator=self.gen),
                      "terngrad": TernGrad(generator=self.gen)}.get(m)
        self.torch_hook, self.torch_state = None, None
        self._chain = None  # the previous bucket's future in this step (powersgd: buckets run one after another)
        self._psgd_sig: dict[int, tuple] = {}  # bucket index -> the parameters its PowerSGD state was made for
        self._psgd_pieces: dict[int, dict[str, torch.Tensor]] = {}  # parameter id -> its PowerSGD state
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
    def bind(self, params: list) -> None:
        """Tell the hook the model's parameters in their order: a parameter's index keys its state in checkpoints
        and its DGC sampling offset (so neither depends on how DDP groups parameters into buckets)."""
        self._index = {id(p): i for i, p in enumerate(params)}

    def _pindex(self, pid: int) -> int:
        return self._index.setdefault(pid, len(self._index))

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

    def _state(self, lay: _Layout, name: str, like: torch.Tensor) -> torch.Tensor:
        """The flat state ``name`` of a bucket; carried over per parameter when buckets are rebuilt or resumed."""
        t = lay.state.get(name)
        if t is None:
            part = STATE_PART[name]
            t = torch.zeros(lay.sizes[part], dtype=like.dtype, device=like.device)
            for pid, (off, n) in lay.spans[part].items():
                old = self._home.get((name, pid))
                if old is not None and old is not lay and name in old.state:
                    ooff, _ = old.span(pid, part)
                    t[off:off + n] = old.state[name][ooff:ooff + n]
                elif (name, pid) in self._loaded:
                    t[off:off + n] = self._loaded.pop((name, pid)).to(t.dtype)
                self._home[(name, pid)] = lay
            lay.state[name] = t
        return t

    # ---- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self, params: list) -> dict:
        """This worker's compressor state per parameter (index into ``params``, the model's order), for a checkpoint.

        DGC's ``u`` and ``v``, error-feedback residuals, torch's PowerSGD state (error, P, Q per parameter, its
        step count and random state), this hook's random generator and its byte counters.
        """
        per: dict[str, dict[int, torch.Tensor]] = {}
        for i, p in enumerate(params):
            for name in STATE_PART:
                lay = self._home.get((name, id(p)))
                if lay is not None and name in lay.state:
                    off, n = lay.span(id(p), STATE_PART[name])
                    per.setdefault(name, {})[i] = lay.state[name][off:off + n].clone()
                elif (name, id(p)) in self._loaded:
                    per.setdefault(name, {})[i] = self._loaded[(name, id(p))].clone()
        stats = {k: v for k, v in dataclasses.asdict(self.stats).items() if k != "step_decisions"}
        out = {"method": self.method, "world_size": self.n, "state": per, "generator": self.gen.get_state(),
               "stats": stats}
        if self.torch_state is not None:
            out["powersgd"] = self._powersgd_state(params)
        return out

    def load_state_dict(self, state: dict, params: list) -> None:
        """Put back what :meth:`state_dict` gave (before the first step); it is placed when the buckets come."""
        if state.get("method") != self.method or state.get("world_size") != self.n:
            raise ValueError(f"compressor state of {state.get('method')!r} on {state.get('world_size')} workers "
                             f"cannot be loaded into {self.method!r} on {self.n}")
        for name, pieces in state["state"].items():
            for i, t in pieces.items():
                self._loaded[(name, id(params[int(i)]))] = t
        self.gen.set_state(state["generator"])
        for k, v in state["stats"].items():
            setattr(self.stats, k, v)
        if self.torch_state is not None and "powersgd" in state:
            ps = state["powersgd"]
            st = self.torch_state
            st.iter = int(ps["iter"])
            st.rng.set_state(("MT19937", ps["rng_keys"].numpy().astype("uint32"), int(ps["rng_pos"]),
                              int(ps["rng_has_gauss"]), float(ps["rng_gauss"])))
            st.error_dict.clear(), st.p_memory_dict.clear(), st.q_memory_dict.clear()
            self._psgd_sig.clear()
            self._psgd_pieces = {id(params[int(i)]): d for i, d in ps["pieces"].items()}

    # ---- torch's PowerSGD state, per parameter ----------------------------------------------------------
    def _psgd_spans(self, bucket) -> dict[int, dict[str, tuple[int, int]]]:
        """Where each parameter's error, P and Q are in torch's flat per-bucket state (mirrors ``powerSGD_hook``:
        the error is bucket-sized; P and Q are packed by matrix shape in order of first appearance)."""
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

        st, buf = self.torch_state, bucket.buffer()
        spans: dict[int, dict[str, tuple[int, int]]] = {}
        groups: dict[tuple, list] = {}
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            spans[id(p)] = {"e": (g.storage_offset() - buf.storage_offset(), g.numel())}
            rows = g.shape[0] if g.dim() > 0 else 1
            cols = g.numel() // max(rows, 1)
            r = min(rows, cols, st.matrix_approximation_rank)
            if _should_compress(rows, cols, r, st.min_compression_rate)[0]:
                groups.setdefault((rows, cols), []).append((id(p), rows * r, cols * r))
        po = qo = 0
        for members in groups.values():
            for pid, np_, nq in members:
                spans[pid]["p"], spans[pid]["q"] = (po, np_), (qo, nq)
                po, qo = po + np_, qo + nq
        return spans

    def _powersgd_to_pieces(self) -> None:
        """Move torch's per-bucket PowerSGD state into per-parameter pieces (before DDP's new buckets use it)."""
        st = self.torch_state
        dicts = {"e": st.error_dict, "p": st.p_memory_dict, "q": st.q_memory_dict}
        for b, (sig, spans) in self._psgd_sig.items():
            for pid, where in spans.items():
                for key, (off, n) in where.items():
                    if b in dicts[key]:
                        self._psgd_pieces.setdefault(pid, {})[key] = dicts[key][b][off:off + n].clone()
        for d in dicts.values():
            d.clear()
        self._psgd_sig.clear()

    def _powersgd_place(self, bucket) -> None:
        """Before torch's hook runs on ``bucket``: its state must be laid out for this bucket's parameters."""
        sig = tuple(id(p) for p in bucket.parameters())
        b = bucket.index()
        known = self._psgd_sig.get(b)
        if known is not None and known[0] == sig:
            return
        if known is not None:  # DDP rebuilt its buckets: re-slice all of the state per parameter
            self._powersgd_to_pieces()
        spans = self._psgd_spans(bucket)
        self._psgd_sig[b] = (sig, spans)
        st, buf = self.torch_state, bucket.buffer()
        dicts = {"e": st.error_dict, "p": st.p_memory_dict, "q": st.q_memory_dict}
        sizes = {"e": buf.numel(), "p": 0, "q": 0}
        for where in spans.values():
            for key in ("p", "q"):
                if key in where:
                    sizes[key] = max(sizes[key], sum(where[key]))
        for keys in (("e",), ("p", "q")):
            # only a complete state is placed; without one torch's hook starts afresh (zero error, random Q)
            if not all(key in self._psgd_pieces.get(pid, {}) for key in keys for pid, where in spans.items()
                       if key in where):
                continue
            for key in keys:
                t = torch.zeros(sizes[key], dtype=buf.dtype, device=buf.device)
                for pid, where in spans.items():
                    if key in where:
                        off, n = where[key]
                        t[off:off + n] = self._psgd_pieces[pid].pop(key).to(t.dtype)
                dicts[key][b] = t

    def _powersgd_state(self, params: list) -> dict:
        st = self.torch_state
        self._powersgd_to_pieces()  # (re-placed from the pieces when the next bucket comes)
        ids = {id(p): i for i, p in enumerate(params)}
        rng = st.rng.get_state()
        return {"iter": st.iter, "rng_keys": torch.from_numpy(rng[1].astype("int64")), "rng_pos": rng[2],
                "rng_has_gauss": rng[3], "rng_gauss": rng[4],
                "pieces": {ids[pid]: {k: v.clone() for k, v in d.items()}
                           for pid, d in self._psgd_pieces.items() if pid in ids and d}}

    # ---- reports ---------------------------------------------------------------------------------------
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
        if self.method == "dgc":
            if self.in_warmup():
                return self._dgc_warmup(lay, buf, dense_b)
            if self.dgc.clip > 0:
                return self._hold(bucket, lay, buf, dense_b)
            return self._dgc(lay, buf, dense_b, 1.0)
        if self.in_warmup():
            buf.div_(self.n)
            self._count(dense_b, dense_b)
            return self._allreduce(buf)
        t0 = time.perf_counter()
        futs, parts = [], []
        out = torch.empty_like(buf)
        if lay.dense.numel():
            xd = buf[lay.dense.key()]
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
        self._count_dense(dense_b)

        def assemble(_f):
            for f, part in zip(futs, parts):
                v = f.value()
                if part.slice is None or v.data_ptr() != out[part.slice].data_ptr():
                    out[part.key()] = v
            return out

        return torch.futures.collect_all(futs).then(assemble)

    def _count_dense(self, dense_b: int) -> None:
        self.stats.step_dense_bytes += dense_b
        if not self.in_warmup():
            self.stats.dense_bytes += dense_b

    def _allreduce(self, t: torch.Tensor) -> torch.futures.Future:
        if self.n == 1:
            fut = torch.futures.Future()
            fut.set_result(t)
            return fut
        fut = dist.all_reduce(t, group=self.rt.group, async_op=True).get_future()
        return fut.then(lambda f: t)

    # ---- DGC -------------------------------------------------------------------------------------------
    def _dgc_warmup(self, lay: _Layout, buf: torch.Tensor, dense_b: int) -> torch.futures.Future:
        """Plain warm-up steps: the momentum (in the compressor) keeps running, the velocity is all-reduced,
        which is dense momentum SGD."""
        self.dgc.velocity_(buf, self._state(lay, "u", buf))
        buf.div_(self.n)
        self._count(dense_b, dense_b)
        return self._allreduce(buf)

    def _hold(self, bucket, lay: _Layout, buf: torch.Tensor, dense_b: int) -> torch.futures.Future:
        """Local clipping needs the norm of the whole gradient: hold the buckets until the last one, then clip all
        of them by one factor and send them (in bucket order, as DDP would)."""
        fut = torch.futures.Future()
        self._held.append((lay, buf, dense_b, fut))
        if not bucket.is_last():
            return fut
        held, self._held = self._held, []
        t0 = time.perf_counter()
        sq = {self._pindex(pid): float(torch.linalg.vector_norm(b[a:a + n])) ** 2
              for lay_i, b, _, _ in held for pid, (a, n) in lay_i.spans["b"].items()}
        norm = math.sqrt(sum(sq[i] for i in sorted(sq)))  # summed in model order: the same in any bucketing
        self.stats.encode_s += time.perf_counter() - t0
        scale = self.dgc.clip_scale(norm)
        for lay_i, buf_i, dense_i, fut_i in held:
            self._dgc(lay_i, buf_i, dense_i, scale).add_done_callback(
                lambda f, out=fut_i: _forward(f, out))
        return fut

    def _dgc(self, lay: _Layout, buf: torch.Tensor, dense_b: int, scale: float) -> torch.futures.Future:
        """One bucket of DGC, in place: clip, momentum correction and accumulation, select, mask, exchange.

        The densely exchanged positions send their velocity (all-reduced); the compressed ones go through the
        sparse all-reduce, whose sum is written back into ``buf`` (DDP copies it to the gradients)."""
        t0 = time.perf_counter()
        n, elem, numel = self.n, buf.element_size(), buf.numel()
        u, v = self._state(lay, "u", buf), self._state(lay, "v", buf)
        if scale != 1.0:
            buf.mul_(scale)
        for a, b in lay.dense.runs:
            self.dgc.velocity_(buf[a:b], u[a:b]).div_(n)
        # LR-weighted accumulation (compress.dgc_lr_weighted): v holds sum_t lr_t u_t, and the values sent are
        # divided by this step's LR, which the optimizer multiplies back; at LR 0 nothing is sent (it would be lost)
        lr = getattr(self.rt, "lr", None)
        w = lr if self.c.dgc_lr_weighted and lr is not None else 1.0
        for a, b in lay.comp.runs:
            self.dgc.accumulate(buf[a:b], u[a:b], v[a:b], w)
            buf[a:b].zero_()  # the gradient is in v now; the sum of the messages is added here
        m = lay.comp.numel()
        density = self.density()
        kmin = self.c.dgc_min_entries  # a floor per tensor: small tensors would send a handful of entries
        dens = {pid: max(density, min(1.0, kmin / nt)) for pid, _, nt in lay.comp_params}
        # at most k entries of each tensor (the selection's bound), known to every worker in advance
        cap = sum(min(nt, max(1, math.ceil(dens[pid] * nt))) for pid, _, nt in lay.comp_params)
        futs, buf_d = [], None
        if m and choose(numel, cap, elem, n, self.cost).mode == "sparse" and lay.dense.numel():
            # the sparse messages carry the compressed positions only: the dense ones get their own all-reduce
            buf_d = buf[lay.dense.key()]  # a view when contiguous, else a (small) copy
            futs.append(self._allreduce(buf_d))
            self._count(ring_allreduce_bytes(buf_d.numel() * elem, n), 0)
        if m:
            # per tensor, as the reference code does: each tensor sends its own share, whatever the bucketing
            idxs, vals = [], []
            for pid, a, nt in lay.comp_params:
                off = mix_seed(self.seed, self.rt.rank, self.step, self._pindex(pid))
                if w > 0:
                    i, x = self.dgc.select_and_mask(u[a:a + nt], v[a:a + nt], dens[pid], offset=off)
                else:
                    i, x = torch.zeros(0, dtype=torch.long, device=buf.device), buf.new_zeros(0)
                idxs.append(i.add_(a))
                vals.append(x)
            idx, vals = torch.cat(idxs), torch.cat(vals).div_(n * w)  # average: divide the k values, not the sum
            # into the bucket as it is (zero at the compressed positions, the dense velocity elsewhere): in dense
            # mode the whole bucket is one all-reduce, in sparse mode the messages are added at their positions
            futs.append(self._sparse(idx, vals, numel, cap, into=buf, zero=False, entries=m))
        else:
            futs.append(self._allreduce(buf))
            self._count(dense_b, 0)
        self.stats.encode_s += time.perf_counter() - t0
        self._count_dense(dense_b)
        dense_key, copied = lay.dense.key(), lay.dense.slice is None

        def assemble(_f):
            for f in futs:
                f.value()  # raise what a collective raised
            if buf_d is not None and copied:
                buf[dense_key] = buf_d
            return buf

        return torch.futures.collect_all(futs).then(assemble)

    # ---- the other compressors -------------------------------------------------------------------------
    def _compressed(self, lay: _Layout, bucket, x: torch.Tensor, elem: int,
                    into: torch.Tensor | None = None) -> torch.futures.Future:
        n, numel = self.n, x.numel()
        if self.sparse is not None:
            e = self._state(lay, "e", x)
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
            return self._sparse(idx, vals / n, numel, self.sparse.capacity(numel), into, entries=numel)
        # quantizers: all-gather the payloads
        e = self._state(lay, "e", x) if self.ef.enabled else None
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

    def _sparse(self, idx, vals, numel, cap, into=None, zero=True, entries=None) -> torch.futures.Future:
        """Sparse all-reduce of this worker's (already averaged) values; ``entries``: the compressed entries."""
        fut, dec = sparse_allreduce(idx, vals, numel, cap, group=self.rt.group, cost=self.cost, out=into,
                                    zero=zero)
        self._count(dec.bytes_sent, 0, idx.numel(), numel if entries is None else entries)
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

            def run():
                self._powersgd_place(bucket)
                return self.torch_hook(self.torch_state, bucket)

            return self._serialized(run, bucket)
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
                try:
                    run().add_done_callback(lambda g: _forward(g, fut))
                except Exception as e:  # noqa: BLE001 - handed to DDP through the future
                    fut.set_exception(e)

            prev.add_done_callback(start)
        self._chain = None if bucket.is_last() else fut
        return fut


def _forward(src: torch.futures.Future, dst: torch.futures.Future) -> None:
    """Complete ``dst`` with what ``src`` completed with (value or exception)."""
    try:
        dst.set_result(src.value())
    except Exception as e:  # noqa: BLE001 - handed to DDP through the future
        dst.set_exception(e)


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


def gather_state(rt, params: list) -> list | None:
    """Every worker's compressor state, in rank order, on rank 0 (None elsewhere and without compression).

    A collective when there are several workers: every worker calls it (the trainer does, before a checkpoint).
    """
    hook = rt.compress
    if hook is None:
        return None
    mine = hook.state_dict(params)
    if rt.world_size == 1:
        return [mine]
    got = [None] * rt.world_size if rt.rank == 0 else None
    dist.gather_object(mine, got, dst=0, group=rt.group)
    return got


def restore_state(rt, checkpoint: dict | None, params: list) -> str:
    """Bind the hook to the model's parameters and, when resuming, load this worker's saved compressor state.

    Returns a line for the log ("" when there is nothing to say). A checkpoint written by another number of
    workers (an elastic resize) holds states that belong to no worker of this run: they start at zero.
    """
    hook = rt.compress
    hook.bind(params)
    if checkpoint is None:
        return ""
    saved = checkpoint.get("compress")
    if not saved:
        return f"compressor state ({hook.method}): none in the checkpoint, starts at zero"
    if len(saved) != rt.world_size or saved[rt.rank].get("method") != hook.method:
        return (f"compressor state ({hook.method}): saved by {len(saved)} workers for "
                f"{saved[0].get('method')!r}, now {rt.world_size} workers: starts at zero")
    hook.load_state_dict(saved[rt.rank], params)
    return f"compressor state ({hook.method}) restored for {rt.world_size} workers"


def compress_hook(state: CompressionHook, bucket):  # no annotations on the bucket: DDP inspects them
    """The DDP comm hook: ``ddp.register_comm_hook(CompressionHook(rt, cfg, spe), compress_hook)``."""
    return state(bucket)
