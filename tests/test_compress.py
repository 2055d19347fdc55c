"""Gradient compression (issue 4): each compressor against its definition, error feedback, DGC, sparse all-reduce.

Compressors and DGC are checked on tiny tensors against the formulas in their papers (docstrings of
scalelab.compress). The sparse all-reduce runs in real gloo process groups (separate processes) at world sizes 2
and 4, and alone, and must equal a dense all-reduce of the same vectors, in both of its modes. The hooks train a
small model to accuracy with 2 real workers through ``scalelab train --nproc 2``.
"""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalelab.compress import (DGC, QSGD, CostModel, ErrorFeedback, MajoritySign, RandomK, ScaledSign, TernGrad,
                               TopK, choose, pack_bits, sampled_threshold_select, selected_dense, sparse_allreduce,
                               unpack_bits, warmup_density)
from scalelab.config import load_config
from scalelab.errors import ConfigError


# ---- compressors against their definitions ------------------------------------------------------------------
def test_bits_roundtrip():
    bits = torch.rand(37) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    assert torch.equal(unpack_bits(packed, 37), bits)


def test_topk_picks_largest_magnitudes():
    x = torch.tensor([0.1, -5.0, 0.3, 4.0, -0.2, 0.0])
    idx, vals = TopK(density=0.34).select(x)  # k = ceil(0.34 * 6) = 3
    assert sorted(idx.tolist()) == [1, 2, 3]
    assert torch.equal(vals, x[idx])


def test_randomk_same_indices_for_same_seed_and_k_entries():
    x = torch.randn(1000)
    a, _ = RandomK(0.01).select(x, seed=7)
    b, _ = RandomK(0.01).select(x * 3, seed=7)
    c, _ = RandomK(0.01).select(x, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.numel() == 10 and a.unique().numel() == 10


def test_scaled_sign_is_l1_scale_times_sign():
    x = torch.tensor([1.0, -2.0, 0.5, -0.5, 0.0])
    q = ScaledSign()
    p = q.encode(x)
    assert p.numel() == q.payload_bytes(5) == 5
    expect = x.abs().mean() * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])  # sign(0) = +1
    torch.testing.assert_close(q.decode(p, 5), expect)


def test_majority_sign_vote():
    q = MajoritySign()
    a, b, c = (torch.tensor(v) for v in ([1.0, 1.0, -1.0], [1.0, -2.0, -1.0], [-3.0, -1.0, -1.0]))
    dec = [q.decode(q.encode(t), 3) for t in (a, b, c)]
    out = q.combine(dec)
    scale = torch.stack([t.abs().mean() for t in (a, b, c)]).mean()
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, -1.0]) * scale)


def test_qsgd_levels_and_unbiased():
    torch.manual_seed(0)
    x = torch.randn(40)
    q = QSGD(levels=4, chunk=16, generator=torch.Generator().manual_seed(1))
    dec = q.decode(q.encode(x), 40)
    # every entry is norm(chunk) * l / s with an integer level l in [-s, s]
    for c in range(3):
        part, d = x[16 * c:16 * (c + 1)], dec[16 * c:16 * (c + 1)]
        lev = d / part.norm() * 4
        torch.testing.assert_close(lev, lev.round(), atol=1e-5, rtol=0)
        assert lev.abs().max() <= 4
        assert torch.all((torch.sign(d) == torch.sign(part)) | (d == 0))
    mean = torch.stack([q.decode(q.encode(x), 40) for _ in range(1500)]).mean(0)
    torch.testing.assert_close(mean, x, atol=0.08, rtol=0)  # E Q(x) = x
    assert q.payload_bytes(40) == 40 + 4 * 3


def test_terngrad_ternary_and_unbiased():
    x = torch.tensor([0.5, -1.0, 0.25, 0.0, 2.0, -0.75])
    q = TernGrad(chunk=4, clip_sigmas=0, generator=torch.Generator().manual_seed(0))
    dec = q.decode(q.encode(x), 6)
    s0, s1 = x[:4].abs().max(), x[4:].abs().max()
    assert set(dec[:4].abs().tolist()) <= {0.0, s0.item()} and set(dec[4:].abs().tolist()) <= {0.0, s1.item()}
    mean = torch.stack([q.decode(q.encode(x), 6) for _ in range(1500)]).mean(0)
    torch.testing.assert_close(mean, x, atol=0.06, rtol=0)
    assert q.payload_bytes(6) == 2 + 4 * 2


@pytest.mark.parametrize("make", [lambda: TopK(0.1), lambda: RandomK(0.1), lambda: ScaledSign()],
                         ids=["topk", "randomk", "efsign"])
def test_error_feedback_conserves_the_gradient_sum(make):
    torch.manual_seed(0)
    comp, ef = make(), ErrorFeedback()
    e = torch.zeros(50)
    total_g, total_sent = torch.zeros(50), torch.zeros(50)
    for t in range(30):
        g = torch.randn(50)
        p = ef.add(g, e)
        if isinstance(comp, ScaledSign):
            sent = comp.decode(comp.encode(p), 50)
        else:
            idx, _ = comp.select(p, seed=t)
            sent = selected_dense(p, idx)
        ef.keep(e, p, sent)
        total_g += g
        total_sent += sent
    torch.testing.assert_close(total_sent + e, total_g, atol=1e-4, rtol=0)
    assert e.abs().sum() > 0  # something was held back (the check is not vacuous)


# ---- DGC ----------------------------------------------------------------------------------------------------
def test_dgc_warmup_schedule_is_the_papers():
    assert [warmup_density(e, 0.001, 4) for e in range(6)] == [0.25, 0.0625, 0.015625, 0.00390625, 0.001, 0.001]
    assert [1 - warmup_density(e, 0.001, 4) for e in (0, 1, 2)] == [0.75, 0.9375, 0.984375]
    assert warmup_density(0.3, 0.001, 0) == 0.001


def test_sampled_threshold_select_is_the_exact_top_k():
    """The sampled threshold only speeds the search up: the result is the top-k of ``|x|`` (both paths: low
    density through the group maxima, high density through the full compare; a sample whose threshold is far too
    high, and a tensor with fewer non-zeros than k)."""
    torch.manual_seed(0)
    x = torch.randn(200_000)
    for density in (0.001, 0.01, 0.05):
        k = math.ceil(density * x.numel())
        for seed in range(3):
            idx = sampled_threshold_select(x, density, generator=torch.Generator().manual_seed(seed))
            assert idx.tolist() == torch.topk(x.abs(), k).indices.sort().values.tolist()
    spiky = torch.zeros(100_000)
    spiky[::1000] = 1e6  # the sampled threshold lands at 1e6, ten 0.8 steps stay far above the rest: full top-k
    spiky[1::7] = torch.rand(len(spiky[1::7]), generator=torch.Generator().manual_seed(0)) + 1
    idx = sampled_threshold_select(spiky, 0.01, offset=0)
    assert idx.tolist() == torch.topk(spiky.abs(), 1000).indices.sort().values.tolist()
    few = torch.zeros(100_000)
    few[:50] = torch.arange(1.0, 51.0)
    assert sampled_threshold_select(few, 0.01, offset=0).tolist() == list(range(50))  # zeros are never sent


@pytest.mark.parametrize("nesterov", [False, True])
def test_dgc_residual_plus_sent_is_the_momentum_corrected_gradient(nesterov):
    torch.manual_seed(0)
    m, n = 0.9, 400
    d = DGC(momentum=m, nesterov=nesterov)
    u, v = torch.zeros(n), torch.zeros(n)
    ur, vr = torch.zeros(n), torch.zeros(n)  # reference, written from the paper's formulas
    total_in, total_sent = torch.zeros(n), torch.zeros(n)
    for _ in range(25):
        g = torch.randn(n)
        if nesterov:
            ur = m * (ur + g)
            incr = ur + g
        else:
            ur = m * ur + g
            incr = ur
        vr = vr + incr
        total_in += incr
        idx, vals = d.step(g, u, v, density=0.02, generator=torch.Generator().manual_seed(1))
        sent = torch.zeros(n)
        sent[idx] = vals
        torch.testing.assert_close(v + sent, vr)  # accumulated residual + sent = momentum-corrected accumulation
        assert torch.all(v[idx] == 0) and torch.all(u[idx] == 0)  # momentum factor masking of both
        total_sent += sent
        vr[idx], ur[idx] = 0.0, 0.0
        torch.testing.assert_close(u, ur)
    torch.testing.assert_close(total_sent + v, total_in, atol=1e-4, rtol=0)  # nothing lost over the steps


def test_dgc_local_clipping_uses_n_to_the_minus_half():
    d = DGC(clip=2.0, world=4)
    g = torch.full((4,), 10.0)
    d.clip_(g)
    torch.testing.assert_close(g.norm(), torch.tensor(1.0), atol=1e-5, rtol=0)  # 2 / sqrt(4)


# ---- sparse all-reduce ----------------------------------------------------------------------------------------
def test_cost_model_switches_to_dense_when_the_union_fills_in():
    cost = CostModel(alpha_s=5e-5, beta=1.25e8)
    D = 1_000_000
    assert choose(D, D // 1000, 4, 2, cost).mode == "sparse"  # 99.9% sparsity, 2 workers
    assert choose(D, D // 4, 4, 8, cost).mode == "dense"      # 75% sparsity on 8 workers
    assert choose(D, D // 4, 4, 2, cost).mode == "sparse"
    dec = choose(D, D // 1000, 4, 4, cost)
    assert dec.bytes_sent == 3 * (2 * 1000 + 1) * 4  # ring all-gather: (n-1) blocks of (2 cap + 1) entries


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sparse_worker(rank, world, port, q):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        pair = dist.new_group([0, 1])  # world size 2 inside the same 4 processes (every rank creates it)
        results = {}
        for size, group in ((world, None), (2, pair)):
            if rank >= size:
                continue
            g = torch.Generator().manual_seed(100 + rank)
            for dtype in (torch.float32, torch.float64):
                numel, cap = 1000, 60
                k = 20 + 13 * rank  # different counts per worker, overlapping supports
                idx = torch.randperm(numel, generator=g)[:k]
                vals = torch.randn(k, generator=g, dtype=dtype)
                dense = torch.zeros(numel, dtype=dtype)
                dense[idx] = vals
                ref = dense.clone()
                dist.all_reduce(ref, group=group)
                for force in ("sparse", "dense", "auto"):
                    fut, dec = sparse_allreduce(idx, vals, numel, cap, group=group, force=force)
                    out = fut.wait()
                    results[(size, str(dtype), force)] = (torch.allclose(out, ref, rtol=1e-6, atol=1e-6), dec.mode,
                                                          float((out - ref).abs().max()), bool((ref != 0).sum() > k))
        q.put((rank, results))
    finally:
        dist.destroy_process_group()


def _worker_entry(target, rank, world, port, q, *args):
    """One worker: ``target``, then leave as scalelab's own workers do (``exit_worker``): after work that
    succeeded, gloo's static destructors sometimes abort the process (SIGABRT), which would fail the test."""
    from scalelab.parallel.runtime import exit_worker

    code = 1
    try:
        target(rank, world, port, q, *args)
        code = 0
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        q.close()
        q.join_thread()  # what was put must reach the pipe before os._exit
        exit_worker(code)


def _run_workers(target, world, *args):
    """Run ``target(rank, world, port, queue, *args)`` in ``world`` processes; their results by rank."""
    ctx = mp.get_context("forkserver")  # torch is imported once, in the server, not in each worker
    ctx.set_forkserver_preload(["torch", "torch.distributed", "scalelab.compress"])
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker_entry, args=(target, r, world, port, q, *args)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


def test_sparse_allreduce_equals_dense_allreduce_in_real_processes_at_2_and_4():
    sizes = set()
    for rank, results in _run_workers(_sparse_worker, 4).items():
        for (size, dtype, force), (ok, mode, err, union_grew) in results.items():
            sizes.add(size)
            assert ok, f"rank {rank} world {size} {dtype} {force}: max error {err}"
            assert union_grew  # the sum really combines several workers' supports
            if force != "auto":
                assert mode == force
    assert sizes == {2, 4}


def test_sparse_allreduce_alone_and_pack_capacity():
    idx, vals = torch.tensor([3, 1]), torch.tensor([2.0, -1.0])
    fut, dec = sparse_allreduce(idx, vals, 5, cap=2)
    assert torch.equal(fut.wait(), torch.tensor([0.0, -1.0, 0.0, 2.0, 0.0]))
    assert dec.bytes_sent == 0
    from scalelab.compress.sparse import pack
    with pytest.raises(ValueError):
        pack(idx, vals, cap=1)


# ---- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sets, words", [
    (["compress.method=zip"], "choose one of"),
    (["compress.density=0"], "out of range"),
    (["compress.method=powersgd"], "at least 2"),
    (["compress.method=dgc", "recipe.optimizer=lamb"], "recipe.optimizer=sgd"),
    (["compress.qsgd_levels=300"], "out of range"),
])
def test_config_errors_are_one_line(sets, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert words in str(e.value) and "\n" not in str(e.value)


# ---- hooks train a model with 2 real gloo workers; their state survives a kill and a resume -------------------
BASE = ["data.name=digits", "model.name=mlp", "model.width=128", "model.depth=2", "train.batch_size=64",
        "train.epochs=6", "recipe.base_lr=0.1", "recipe.base_batch=64", "recipe.warmup_epochs=0.5",
        "train.threads=1", "compress.warmup_steps=10", "compress.min_numel=256", "train.log_every=5"]
RUNS = {
    # float64 and checkpoints: the DGC run is also the reference of the resume test below
    "dgc": BASE + ["compress.method=dgc", "compress.density=0.01", "compress.dgc_warmup_epochs=1",
                   "compress.dgc_clip=1", "train.dtype=float64", "train.checkpoint_every=40"],
}
_done: dict = {}


def _train(out, cache_dir, method, *extra):
    env = {**os.environ, "SCALELAB_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    sets = [a for s in RUNS[method] for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "scalelab", "train", "--nproc", "2", "--out", str(out),
                           "--no-progress", *sets, *extra], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """One uninterrupted run per method, made when a test first asks for it."""

    def get(method):
        if method not in _done:
            out = tmp_path_factory.mktemp(method) / "run"
            _done[method] = (out, _train(out, cache_dir, method)[1])
        return _done[method]

    return get


@pytest.mark.parametrize("method", ["dgc"])
def test_hooks_train_to_accuracy_with_two_workers(uninterrupted, method):
    out, s = uninterrupted(method)
    assert s["world_size"] == 2 and s["compress_method"] == method
    assert s["final_test_acc"] >= 0.9, s["final_test_acc"]  # digits: dense training reaches ~0.95-0.97 here
    assert s["compression_ratio"] >= 10, s["compression_ratio"]
    assert s["comm_bytes"] >= s["compress_grad_bytes_total"] > s["compress_bytes_after_warmup"] > 0
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    comp = [r for r in recs if r["kind"] == "compress"]
    assert comp and comp[0]["warmup"] and not comp[-1]["warmup"]
    if method == "dgc":
        assert all(d["mode"] in ("sparse", "dense") and "sparse_s" in d for r in comp[2:] for d in r["decisions"])
        assert comp[-1]["density"] == 0.01


@pytest.mark.parametrize("method, kill, resumed_from", [("dgc", 100, 80)])
def test_compressor_state_survives_a_kill_and_resume(uninterrupted, tmp_path, cache_dir, method, kill,
                                                     resumed_from):
    """Rank 1 is SIGKILLed, the elastic agent restarts both workers, they resume from the last checkpoint with
    their compressor state (DGC's u and v), and end where the uninterrupted run ends, bit for bit (float64,
    gloo). DDP groups the parameters differently in the first step after a resume (before it rebuilds its
    buckets): the result must not depend on that. (PowerSGD: the test after this one, at the hook.)"""
    _, ref = uninterrupted(method)
    proc, s = _train(tmp_path / "killed", cache_dir, method, "--max-restarts", "1",
                     "--set", "faults.kill_rank=1", "--set", f"faults.kill_step={kill}")
    assert f"resumed from step {resumed_from}" in proc.stdout
    assert f"compressor state ({method}) restored for 2 workers" in proc.stdout
    assert s["restarts"] == 1 and ref["restarts"] == 0
    assert s["params_sha256"] == ref["params_sha256"]
    assert s["final_test_acc"] == ref["final_test_acc"]


# ---- hook internals with a stand-in bucket (one process) --------------------------------------------------------
class _Bucket:
    """What DDP hands a comm hook: a flat buffer, its parameters, per-parameter views, an index."""

    def __init__(self, params, index=0, fill=None, last=True):
        self.params, self._index, self._last = params, index, last
        self.buf = torch.cat([(fill(p) if fill else torch.randn(p.numel())).view(-1) for p in params])

    def buffer(self):
        return self.buf

    def parameters(self):
        return self.params

    def gradients(self):
        out, off = [], 0
        for p in self.params:
            out.append(self.buf[off:off + p.numel()].view(p.shape))
            off += p.numel()
        return out

    def index(self):
        return self._index

    def is_last(self):
        return self._last


def _hook(method, step, extra=()):
    from types import SimpleNamespace

    from scalelab.compress import CompressionHook
    from scalelab.parallel.runtime import CommStats
    cfg = load_config(None, [f"compress.method={method}", "compress.min_numel=16", *extra])
    rt = SimpleNamespace(world_size=1, rank=0, group=None, comm=CommStats(), step=step)
    return CompressionHook(rt, cfg, steps_per_epoch=10), rt


def test_dgc_state_follows_parameters_when_ddp_rebuilds_buckets():
    w1, w2, b = (torch.nn.Parameter(torch.zeros(s)) for s in ((8, 4), (4, 8), (8,)))
    h, rt = _hook("dgc", step=0, extra=["compress.density=0.1", "recipe.momentum=0.5", "recipe.nesterov=false"])
    torch.manual_seed(0)
    first = _Bucket([w1, b, w2])
    g = first.buf.clone()
    out = h(first).wait()
    torch.testing.assert_close(out[32:40], g[32:40])  # the bias is exchanged densely: its velocity is g
    comp = torch.cat([out[:32], out[40:]])
    assert (comp != 0).sum() == 2 * math.ceil(0.1 * 32)  # the weights travel sparse: k entries of each
    lay = h._layouts[0]
    u_before = {id(p): _piece(lay, "u", p).clone() for p in (w1, w2)}
    rt.step = 1
    rebuilt = _Bucket([w2, w1, b], fill=lambda p: torch.zeros(p.numel()))  # new order, zero gradients
    h(rebuilt).wait()
    lay2 = h._layouts[0]
    assert lay2 is not lay
    for p in (w1, w2):
        # u <- m u + 0 = 0.5 u for the entries not sent at step 0: the momentum moved with its parameter
        # (entries sent at step 1 are masked to zero: compare the others, most of them)
        after = _piece(lay2, "u", p)
        kept = after != 0
        assert kept.sum() >= p.numel() - 2 * 4
        torch.testing.assert_close(after[kept], 0.5 * u_before[id(p)][kept])


def test_dgc_min_entries_is_a_floor_per_tensor():
    """``compress.dgc_min_entries``: a small tensor sends about that many entries (its largest), a large one
    its density."""
    big, small = torch.nn.Parameter(torch.zeros(100, 40)), torch.nn.Parameter(torch.zeros(10, 8))
    h, _ = _hook("dgc", step=0, extra=["compress.density=0.01", "compress.dgc_min_entries=20",
                                        "recipe.momentum=0", "recipe.nesterov=false"])
    torch.manual_seed(0)
    bk = _Bucket([big, small])
    g = bk.buf.clone()
    out = h(bk).wait()
    sent = out[4000:] != 0
    assert sent.sum() == 20  # 80 entries at density 0.01 would send 1
    assert g[4000:].abs()[sent].min() >= g[4000:].abs()[~sent].max()  # the largest ones
    assert (out[:4000] != 0).sum() == 40  # density 0.01 of 4000 (above the floor)


def _piece(lay, name, p):
    from scalelab.compress.hooks import STATE_PART
    off, n = lay.span(id(p), STATE_PART[name])
    return lay.state[name][off:off + n]


def test_dgc_local_clipping_takes_the_norm_of_all_buckets():
    """The paper clips the worker's whole gradient to thr / sqrt(N): the hook holds the buckets until the last."""
    w1, w2 = torch.nn.Parameter(torch.zeros(6, 4)), torch.nn.Parameter(torch.zeros(4, 5))
    h, rt = _hook("dgc", step=0, extra=["compress.density=1.0", "compress.dgc_clip=2", "recipe.momentum=0",
                                        "recipe.nesterov=false"])
    b0, b1 = _Bucket([w1], index=0, last=False), _Bucket([w2], index=1)
    g0, g1 = b0.buf.clone(), b1.buf.clone()
    f0 = h(b0)
    assert not f0.done()  # held until the norm of the whole gradient is known
    f1 = h(b1)
    scale = 2.0 / torch.cat([g0, g1]).norm()  # world 1: the limit is 2 / sqrt(1)
    assert scale < 1  # (the gradient is larger than the limit: clipping acts)
    # momentum 0 and density 1: what is sent is the clipped gradient itself, one factor for both buckets
    torch.testing.assert_close(f0.wait(), g0 * scale)
    torch.testing.assert_close(f1.wait(), g1 * scale)


def test_error_feedback_state_survives_a_checkpoint_and_new_buckets():
    """state_dict / load_state_dict keep each parameter's residual, whatever bucket it comes back in."""
    w1, w2, b = (torch.nn.Parameter(torch.zeros(s)) for s in ((8, 4), (4, 8), (8,)))
    params = [w1, w2, b]
    h, _ = _hook("topk", step=0, extra=["compress.density=0.1"])
    torch.manual_seed(0)
    h(_Bucket([w1, b, w2])).wait()
    saved = h.state_dict(params)
    e1 = {id(p): _piece(h._layouts[0], "e", p).clone() for p in (w1, w2)}
    assert all(e.abs().sum() > 0 for e in e1.values())
    h2, _ = _hook("topk", step=1, extra=["compress.density=0.1"])
    h2.load_state_dict(saved, params)
    rebuilt = _Bucket([w2, b, w1], fill=lambda p: torch.zeros(p.numel()))  # new order, zero gradients
    out = h2(rebuilt).wait()
    for p in (w1, w2):
        start = next(g.storage_offset() for q, g in zip(rebuilt.params, rebuilt.gradients()) if q is p)
        sent = out[start:start + p.numel()]
        # residual before = what is sent now + residual after: nothing lost across the checkpoint
        torch.testing.assert_close(sent + _piece(h2._layouts[0], "e", p), e1[id(p)])
    with pytest.raises(ValueError, match="cannot be loaded"):
        _hook("dgc", step=0)[0].load_state_dict(saved, params)


def _dgc_vs_momentum_sgd(rank, world, nesterov, warmup=4, steps=7, lr_weighted=False):
    """DGC through the hook and the optimizer as the trainer builds them, against the paper's math (one worker).

    Stand-in buckets hold a weight (compressed) and a bias (dense path); every worker has its own gradient
    sequence, which does not depend on the weights, and the LR changes from step to step. Returns the largest
    differences: during the plain warm-up both tensors against ``torch.optim.SGD`` (momentum, Nesterov, weight
    decay on the weight) on the averaged gradients, i.e. dense momentum SGD; after it (density 1: everything is
    sent) the bias still against that, and the weight against the paper's per-worker formulas: ``u_k <- m u_k +
    g_k`` (Nesterov ``u_k <- m (u_k + g_k)``, sending ``u_k + g_k``), ``v_k <- v_k + u_k``, send ``v_k``, then
    ``u_k``, ``v_k`` masked to 0; the weight decay with its own momentum buffer, never sparsified. With
    ``lr_weighted`` (``compress.dgc_lr_weighted``) the same: at density 1 nothing waits, so weighting ``v`` by the LR
    and dividing the sent values by it must change nothing."""
    from types import SimpleNamespace

    from scalelab.compress import CompressionHook, dgc_optimizer
    from scalelab.parallel.runtime import CommStats
    from scalelab.recipe import SGD
    m, wd, lrs = 0.9, 0.05, [0.1, 0.3, 0.3, 0.2, 0.05, 0.4, 0.1]
    cfg = load_config(None, ["compress.method=dgc", "compress.density=1.0", f"compress.warmup_steps={warmup}",
                             "compress.min_numel=16", f"recipe.momentum={m}", f"recipe.nesterov={nesterov}",
                             f"recipe.weight_decay={wd}", f"compress.dgc_lr_weighted={str(lr_weighted).lower()}"])
    init = torch.Generator().manual_seed(5)
    w, b = (torch.nn.Parameter(torch.randn(s, generator=init, dtype=torch.float64)) for s in ((8, 6), (6,)))
    wr, br, wp = (x.detach().clone().requires_grad_() for x in (w, b, w))  # dense reference; paper's DGC weight
    rt = SimpleNamespace(world_size=world, rank=rank, group=dist.group.WORLD, comm=CommStats(), step=0)
    hook = CompressionHook(rt, cfg, steps_per_epoch=100)
    hook.bind([w, b])
    opt = dgc_optimizer(SGD([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}], lr=0.1,
                            momentum=m, nesterov=nesterov), cfg, world)
    ref = torch.optim.SGD([{"params": [wr], "weight_decay": wd}, {"params": [br], "weight_decay": 0.0}], lr=0.1,
                          momentum=m, nesterov=nesterov)
    uk = [torch.zeros(48, dtype=torch.float64) for _ in range(world)]  # the paper's per-worker u (weight)
    uw = torch.zeros(48, dtype=torch.float64)  # its weight-decay momentum
    err = {"warmup": 0.0, "bias": 0.0, "weight": 0.0}
    for s, lr in enumerate(lrs):
        gs = [torch.randn(54, generator=torch.Generator().manual_seed(100 * s + k), dtype=torch.float64)
              for k in range(world)]
        bk = _Bucket([w, b], fill=lambda p: gs[rank][:48] if p is w else gs[rank][48:])
        rt.step, rt.lr = s, lr
        hook(bk).wait()
        w.grad, b.grad = (x.view(p.shape).clone() for x, p in zip(bk.gradients(), (w, b)))
        gbar = sum(gs) / world
        wr.grad, br.grad = gbar[:48].view(8, 6).clone(), gbar[48:].clone()
        for o in (opt, ref):
            for grp in o.param_groups:
                grp["lr"] = lr
        sent = []
        for k in range(world):  # the paper's DGC on the weight (the warm-up sends the velocity unmasked)
            g = gs[k][:48]
            if nesterov:
                uk[k] = m * (uk[k] + g)
                sent.append(uk[k] + g)
            else:
                uk[k] = m * uk[k] + g
                sent.append(uk[k].clone())
            if s >= warmup:
                uk[k] = torch.zeros(48, dtype=torch.float64)  # density 1: every entry sent and masked
        wflat = wp.detach().view(-1)
        uw = m * uw + wd * wflat
        step_wd = wd * wflat + m * uw if nesterov else uw
        with torch.no_grad():
            wp -= (lr * (sum(sent) / world + step_wd)).view(8, 6)
        opt.step()
        ref.step()
        with torch.no_grad():
            if s < warmup:
                err["warmup"] = max(err["warmup"], float((w - wr).abs().max()), float((b - br).abs().max()))
            err["bias"] = max(err["bias"], float((b - br).abs().max()))
            err["weight"] = max(err["weight"], float((w - wp).abs().max()))
    return err


def _hooks_worker(rank, world, port, q):
    import io
    from types import SimpleNamespace

    from scalelab.compress import CompressionHook
    from scalelab.parallel.runtime import CommStats
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = load_config(None, ["compress.method=powersgd", "compress.warmup_steps=2", "compress.powersgd_rank=2"])
        w1, w2, b = (torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in ((16, 12), (12, 16), (12,)))
        params = [w1, w2, b]
        first, rebuilt = [w1, b, w2], [w2, b, w1]  # DDP's first layout, and its rebuilt one

        def hook():
            rt = SimpleNamespace(world_size=world, rank=rank, group=dist.group.WORLD, comm=CommStats(), step=0)
            h = CompressionHook(rt, cfg, steps_per_epoch=10)
            h.bind(params)
            return h, rt

        def step(h, rt, s, order):  # the same gradients in both runs; different on each rank
            g = torch.Generator().manual_seed(1000 * s + rank)
            grads = {id(p): torch.randn(p.numel(), generator=g, dtype=torch.float64) for p in params}
            bk = _Bucket(order, fill=lambda p: grads[id(p)])
            rt.step = s
            h(bk).wait()
            return [next(x for q_, x in zip(order, bk.gradients()) if q_ is p).clone() for p in params]

        h, rt = hook()
        whole = [step(h, rt, s, first if s == 0 else rebuilt) for s in range(8)]
        h, rt = hook()
        for s in range(5):
            step(h, rt, s, first if s == 0 else rebuilt)
        f = io.BytesIO()
        torch.save(h.state_dict(params), f)  # through a checkpoint file's format (weights_only on load)
        f.seek(0)
        h, rt = hook()  # a new process would start with DDP's first layout again
        h.load_state_dict(torch.load(f, weights_only=True), params)
        resumed = [step(h, rt, s, first if s == 5 else rebuilt) for s in range(5, 8)]
        same = all(torch.equal(a, b_) for s in range(3) for a, b_ in zip(whole[5 + s], resumed[s]))
        iters = h.torch_state.iter
        # EF-sign through the hook: the weights travel as scaled signs (all-gathered, averaged), the bias densely
        cfg_e = load_config(None, ["compress.method=efsign", "compress.min_numel=16"])
        rt = SimpleNamespace(world_size=world, rank=rank, group=dist.group.WORLD, comm=CommStats(), step=0)
        h = CompressionHook(rt, cfg_e, steps_per_epoch=10)
        w, bias = torch.nn.Parameter(torch.zeros(8, 6)), torch.nn.Parameter(torch.zeros(6))
        bk = _Bucket([w, bias], fill=lambda p: torch.randn(p.numel(), generator=torch.Generator().manual_seed(
            7 + rank + p.numel())))
        mine = bk.buf.clone()
        out = h(bk).wait()
        both = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(both, mine)
        expect = torch.cat([sum(x[:48].abs().mean() * torch.where(x[:48] >= 0, 1.0, -1.0) for x in both) / world,
                            sum(x[48:] for x in both) / world])
        efsign_ok = torch.allclose(out, expect, atol=1e-6) and h.stats.bytes < 48 * 4
        dgc_err = max(max(_dgc_vs_momentum_sgd(rank, world, nesterov, lr_weighted=lrw).values())
                      for nesterov in (False, True) for lrw in (False, True))
        q.put((rank, (same, iters, efsign_ok, dgc_err < 1e-12)))
    finally:
        dist.destroy_process_group()


def test_hooks_in_two_real_workers_powersgd_resume_efsign_and_dgc_momentum():
    """2 gloo workers, the hook on stand-in buckets. torch's PowerSGD state (error, P, Q per bucket, step, random
    state), saved per parameter and restored after the buckets changed (a resumed DDP starts with its first
    layout), continues bit for bit. EF-sign's exchange equals the mean of the workers' scaled signs. DGC with the
    trainer's optimizer is dense momentum SGD with weight decay during its warm-up, keeps momentum SGD on the
    densely exchanged bias after it, and follows the paper's formulas on the weight (:func:`_dgc_vs_momentum_sgd`),
    heavy ball and Nesterov."""
    got = _run_workers(_hooks_worker, 2)
    assert got == {0: (True, 8, True, True), 1: (True, 8, True, True)}


def _dgc_worker(rank, world, port, q):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        q.put((rank, max(max(_dgc_vs_momentum_sgd(rank, world, nesterov, lr_weighted=lrw).values())
                         for nesterov in (False, True) for lrw in (False, True))))
    finally:
        dist.destroy_process_group()


def test_dgc_follows_the_papers_formulas_at_world_size_4():
    """:func:`_dgc_vs_momentum_sgd` in 4 gloo processes (world size 2 is in the test above; alone, a process has
    no hook and its optimizer keeps the momentum: the single-process reference is ``torch.optim.SGD`` itself)."""
    got = _run_workers(_dgc_worker, 4)
    assert max(got.values()) < 1e-12, got


def test_powersgd_bytes_mirror_the_torch_hook():
    from types import SimpleNamespace

    from scalelab.compress import powersgd_bytes
    w, b = torch.nn.Parameter(torch.zeros(64, 32)), torch.nn.Parameter(torch.zeros(32))
    bucket = _Bucket([w, b])
    state = SimpleNamespace(iter=0, start_powerSGD_iter=2, matrix_approximation_rank=2, min_compression_rate=2)
    assert powersgd_bytes(state, bucket, 2) == (2080 * 4)  # plain all-reduce before start_powerSGD_iter
    state.iter = 5
    # bias not compressed (32 x 1), P = 64 x 2, Q = 32 x 2; ring all-reduce at n = 2 sends each once
    assert powersgd_bytes(state, bucket, 2) == 32 * 4 + 64 * 2 * 4 + 32 * 2 * 4
    assert powersgd_bytes(state, bucket, 4) == (2 * 3 * (32 * 4)) // 4 + (2 * 3 * 512) // 4 + (2 * 3 * 256) // 4


def test_dgc_lr_weighted_applies_each_step_its_own_lr():
    """``compress.dgc_lr_weighted``: an entry held back in ``v`` is applied with the LR of the steps its gradients
    came from (Stich et al. 2018's memory of LR-scaled updates), not with the LR of the step that sends it; at LR 0
    nothing is sent and ``v`` keeps everything. Momentum 0, one worker: what the optimizer applies at step t is
    ``lr_t * sent_t``."""
    w = torch.nn.Parameter(torch.zeros(10, 10))  # 2-D: compressed (1-D tensors are exchanged densely)
    lrs, held = [0.5, 0.0, 0.25], 7  # entry 7 is small at steps 0 and 1 and the largest at step 2

    def grads(s):
        g = torch.zeros(100)
        g[s] = 10.0  # one large entry per step: density 0.01 sends exactly it
        g[held] = (1.0, 2.0, 100.0)[s]
        return g

    for weighted, expect in ((True, 0.5 * 1.0 + 0.0 * 2.0 + 0.25 * 100.0), (False, 0.25 * 103.0)):
        h, rt = _hook("dgc", step=0, extra=["compress.density=0.01", "recipe.momentum=0", "recipe.nesterov=false",
                                            f"compress.dgc_lr_weighted={str(weighted).lower()}"])
        applied = torch.zeros(100)
        for s, lr in enumerate(lrs):
            rt.step, rt.lr = s, lr
            bk = _Bucket([w], fill=lambda p: grads(s))
            out = h(bk).wait()
            if weighted and lr == 0:
                assert not out.any()  # nothing sent at LR 0 ...
                assert h._state(h._layouts[0], "v", out)[s] == 0  # ... and v holds 0 * g for this step
            applied += lr * out
        assert applied[held].item() == pytest.approx(expect)
        assert applied[0].item() == pytest.approx(0.5 * 10.0)  # sent at once: the same either way
