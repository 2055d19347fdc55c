"""Asynchronous, bounded-staleness, hybrid and local SGD training (issue 8), in real gloo processes.

- async with one worker is sequential SGD, bit for bit;
- every pushed gradient is applied exactly once (counted by the workers and by the servers), with 1 and 2 servers;
- staleness-aware LR divides each gradient's LR by its staleness;
- SSP never lets a worker run more than s clocks ahead of the slowest (from the logs), and async without the
  bound does, under the same straggler (so the check is not vacuous);
- local SGD with H = 1 equals synchronous data parallelism at 1, 2 and 4 workers; post-local SGD is sync,
  then local (and differs from sync);
- hybrid with a single group equals synchronous data parallelism;
- a dead worker does not stop an async job (it rejoins); a dead server stops it with one line, and the job
  resumes from the checkpoint it left.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from scalelab.checkpoint import load_latest
from scalelab.config import load_config
from scalelab.errors import ConfigError
from scalelab.parallel.ps import shard_owners
from scalelab.train import Trainer

BASE = ["data.name=synthetic", "data.n_train=1024", "data.n_test=256", "model.name=mlp", "model.width=32",
        "model.norm=none", "train.batch_size=48", "train.max_steps=20", "train.eval_every=10",
        "train.log_every=5", "train.checkpoint_every=10", "recipe.base_lr=0.1", "recipe.base_batch=48",
        "recipe.warmup_epochs=0", "train.dtype=float64", "train.progress=false", "train.threads=1"]

_RUNS: dict[tuple, tuple] = {}


def _run(tmp_path, cache_dir, nproc, overrides, check=True):
    """A real ``scalelab train --nproc N`` job; the same (nproc, overrides) runs once per session."""
    key = (nproc, tuple(overrides))
    if key in _RUNS and check:
        return _RUNS[key]
    out = tmp_path / f"run{len(_RUNS)}-{nproc}"
    args = [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "SCALELAB_CACHE": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "scalelab", "train", "--nproc", str(nproc), "--out", str(out),
                           *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        _RUNS[key] = (out, proc)
    return out, proc


def _params(out):
    return {k: v for k, v in load_latest(out / "checkpoints")["model"].items()}


def _records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_shards_are_balanced_whole_tensors():
    assert shard_owners([100, 10, 60, 50], 2) == [0, 0, 1, 1]  # 100 + 10 | 60 + 50
    assert shard_owners([5, 5, 5], 1) == [0, 0, 0]


def test_bad_layouts_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="parallel.mode"):
        load_config(None, ["parallel.mode=bogus"])
    with pytest.raises(ConfigError, match="parallel.backup_workers"):
        load_config(None, ["parallel.mode=async", "parallel.backup_workers=1"])
    from scalelab.train import workers_used

    with pytest.raises(ConfigError, match="leave no worker"):
        workers_used(load_config(None, ["parallel.mode=async", "parallel.servers=2"]), 2)
    with pytest.raises(ConfigError, match="parallel.group_size"):
        workers_used(load_config(None, ["parallel.mode=hybrid", "parallel.group_size=2"]), 4)


def test_async_with_one_worker_is_sequential_sgd(tmp_path, cache_dir):
    """1 server + 1 worker: each gradient is computed on the parameters the previous update produced (staleness
    0), so the run is the single-process sync run, bit for bit (BN buffers included)."""
    over = BASE + ["model.norm=bn"]
    out, _ = _run(tmp_path, cache_dir, 2, over + ["parallel.mode=async"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["staleness_hist"] == [20] and summary["steps"] == 20
    threads = torch.get_num_threads()
    try:
        os.environ["SCALELAB_CACHE"] = str(cache_dir)
        Trainer(load_config(None, over), tmp_path / "seq").run()
    finally:
        torch.set_num_threads(threads)
    seq = _params(tmp_path / "seq")
    got = _params(out)
    for name, p in seq.items():
        assert torch.equal(got[name], p), name
    assert summary["params_sha256"] == json.loads((tmp_path / "seq" / "summary.json").read_text())["params_sha256"]


SLOW = ["stragglers.dist=fixed", "stragglers.rank=1", "stragglers.delay_s=0.05"]


def _check_exactly_once(out, workers, updates):
    s = json.loads((out / "summary.json").read_text())
    assert s["pushed_by_worker"] == s["applied_by_worker"]  # counted by the workers and by the server
    assert len(s["applied_by_worker"]) == workers and sum(s["applied_by_worker"]) == updates == s["steps"]
    assert sum(s["staleness_hist"]) == updates * s["servers"]  # every server measures every gradient
    if s["servers"] == 1:  # the log's last histogram (server 0's) is the summary's
        assert _records(out, "staleness")[-1]["hist"] == s["staleness_hist"]
    return s


SHORT = ["train.max_steps=10", "train.eval_every=5"]


def test_ssp_never_exceeds_its_bound_and_async_does(tmp_path, cache_dir):
    """Worker 1 sleeps 50 ms per gradient. SSP with s = 1 and 3 workers: the log's per-interval maximum of
    (clock - slowest clock) never exceeds 1. Async with 2 workers (and 2 servers holding the shards) runs far
    ahead."""
    ssp_out, _ = _run(tmp_path, cache_dir, 4, BASE + SHORT + SLOW + ["parallel.mode=ssp",
                                                                     "parallel.staleness_bound=1"])
    s = _check_exactly_once(ssp_out, 3, 30)
    ahead = [r["ssp_ahead_max"] for r in _records(ssp_out, "train")]
    assert ahead and max(ahead) <= 1 and s["ssp_max_ahead"] <= 1
    assert max(ahead) == 1  # the bound is reached, so it is what holds the fast workers back
    from scalelab.lab.report import report_run

    text = report_run(ssp_out)  # `scalelab report` shows the staleness histogram
    assert "staleness of 30 applied gradients" in text and (ssp_out / "plots" / "staleness.png").exists()

    async_out, _ = _run(tmp_path, cache_dir, 4, BASE + SHORT + SLOW + ["parallel.mode=async", "parallel.servers=2"])
    a = _check_exactly_once(async_out, 2, 20)
    assert a["ssp_max_ahead"] > 3 and a["applied_by_worker"][1] < a["applied_by_worker"][0]
    # both shards were trained and gathered into the checkpoint: every tensor moved from its initial value
    from scalelab.data import load_dataset
    from scalelab.models import build_model

    cfg = load_config(None, BASE)
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model, data.input_shape, data.num_classes).double().state_dict()
    got = _params(async_out)
    assert all((got[n] - p).abs().max() > 1e-6 for n, p in init.items())


def _sync(tmp_path, cache_dir):
    """The sync data-parallel reference, computed in this process: without BN, N workers with B/N each train
    exactly like one process with the global batch B (the contract tests/test_parallel_parity.py checks on real
    workers), so one in-process run is the reference for every N."""
    out = tmp_path / "sync"
    if not out.exists():
        os.environ["SCALELAB_CACHE"] = str(cache_dir)
        threads = torch.get_num_threads()
        try:
            Trainer(load_config(None, BASE), out).run()
        finally:
            torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_local_sgd_with_h1_is_sync_data_parallel(tmp_path, cache_dir, nproc):
    """Averaging the models after every local step of SGD with momentum (linear in the gradient) gives the
    parameters of averaging the gradients: sync DP up to rounding."""
    sync = _params(_sync(tmp_path, cache_dir))
    if nproc == 1:
        os.environ["SCALELAB_CACHE"] = str(cache_dir)
        Trainer(load_config(None, BASE + ["parallel.mode=localsgd", "parallel.local_period=1"]),
                tmp_path / "l1").run()
        local = _params(tmp_path / "l1")
    else:
        local = _params(_run(tmp_path, cache_dir, nproc, BASE + ["parallel.mode=localsgd",
                                                                 "parallel.local_period=1"])[0])
    for name, p in sync.items():
        torch.testing.assert_close(local[name], p, rtol=1e-9, atol=1e-12, msg=name)


def test_post_local_sgd_is_sync_then_local(tmp_path, cache_dir):
    """Post-local SGD switching at step 10 with H = 4: at step 10 (synchronous phase) the parameters are sync's;
    at step 20 the workers have drifted apart between 2 averagings and the result differs from sync (so the H = 1
    equality above is not vacuous)."""
    sync_dir = _sync(tmp_path, cache_dir)
    out, _ = _run(tmp_path, cache_dir, 2, BASE + ["parallel.mode=localsgd", "parallel.local_period=4",
                                                  "parallel.local_start_step=10"])
    at10 = torch.load(out / "checkpoints" / "ckpt-000000010.pt", weights_only=True)["model"]
    sync10 = torch.load(sync_dir / "checkpoints" / "ckpt-000000010.pt", weights_only=True)["model"]
    for name, p in sync10.items():
        torch.testing.assert_close(at10[name], p, rtol=1e-9, atol=1e-12, msg=name)
    sync, post = _params(sync_dir), _params(out)
    assert max((post[n] - p).abs().max().item() for n, p in sync.items()) > 1e-4
    assert json.loads((out / "summary.json").read_text())["averagings"] == 2


def test_hybrid_with_one_group_is_sync_data_parallel(tmp_path, cache_dir):
    """1 server + one group of 2 workers: the group's all-reduced gradient is the sync gradient of B, applied at
    staleness 0."""
    sync = _params(_sync(tmp_path, cache_dir))
    out, _ = _run(tmp_path, cache_dir, 3, BASE + ["parallel.mode=hybrid", "parallel.group_size=2"])
    hyb = _params(out)
    for name, p in sync.items():
        torch.testing.assert_close(hyb[name], p, rtol=1e-9, atol=1e-12, msg=name)
    assert json.loads((out / "summary.json").read_text())["staleness_hist"] == [20]


def test_dead_worker_does_not_stop_async_and_rejoins(tmp_path, cache_dir):
    # every worker sleeps ~50 ms per gradient, so the job lasts long enough for the restarted worker to rejoin
    out, proc = _run(tmp_path, cache_dir, 3, BASE + ["parallel.mode=async", "faults.kill_rank=2",
                                                     "faults.kill_step=6", "stragglers.dist=exp",
                                                     "stragglers.delay_s=0.05", "parallel.timeout_s=60",
                                                     "parallel.staleness_lr=true", "recipe.schedule=constant"],
                     check=False)
    assert proc.returncode == 0, proc.stderr
    assert "faults: killing rank 2" in proc.stderr
    assert "worker rank 2 died (SIGKILL); the job goes on without it; restarting it to rejoin" in proc.stderr
    assert "the other 1 worker(s) go on" in proc.stdout and "rejoined" in proc.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["worker_deaths"] == 1 and s["worker_rejoins"] == 1
    assert s["steps"] == 40 and sum(s["applied_by_worker"]) == 40  # the lost batch was handed to another
    assert _records(out, "worker_lost") and _records(out, "rejoin")
    # staleness-aware LR (Zhang et al. 2016): each logged LR is the peak divided by a staleness max(tau, 1)
    peak = 0.1 * 24 / 48  # base_lr at base_batch 48, linearly scaled to updates of 48 / 2 workers
    lrs = [r["lr"] for r in _records(out, "train")]
    ks = [peak / lr for lr in lrs]
    assert lrs and all(abs(k - round(k)) < 1e-9 and round(k) >= 1 for k in ks) and max(ks) > 1.5


def test_dead_server_stops_the_job_with_one_line(tmp_path, cache_dir):
    out, proc = _run(tmp_path, cache_dir, 3, BASE + ["parallel.mode=async", "faults.kill_rank=0",
                                                     "faults.kill_step=25", "train.checkpoint_every=5"],
                     check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("scalelab: error: parameter server rank 0 was killed by signal SIGKILL: "
                           "parallel.mode=async cannot go on"), last
    assert "ckpt-000000020.pt" in last and "--resume --nproc 3" in last
    state = load_latest(out / "checkpoints")
    assert state["counters"]["step"] == 20
    env = {**os.environ, "SCALELAB_CACHE": str(cache_dir)}
    more = subprocess.run([sys.executable, "-m", "scalelab", "train", "--nproc", "3", "--resume", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert more.returncode == 0, more.stderr
    assert "resumed from step 20" in more.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 40 and s["restarts"] == 1 and sum(s["applied_by_worker"]) == 20  # this session's
