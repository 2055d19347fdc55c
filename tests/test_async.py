"""Asynchronous, bounded-staleness, hybrid and local SGD training (issue 8), in real gloo processes.

- async with one worker is sequential SGD, bit for bit, before a dead server stops it and after ``--resume``;
  a dead server stops the job with one line and leaves the last checkpoint intact;
- every pushed gradient is applied exactly once (counted by the workers and by the servers), with 2 servers (SSP)
  and with 1 (one worker; one hybrid group);
- SSP never lets a worker run more than s clocks ahead of the slowest (from the logs), and async without the
  bound does, under the same straggler (so the check is not vacuous);
- staleness-aware LR divides each gradient's LR by its staleness;
- local SGD with H = 1 equals synchronous data parallelism; post-local SGD with 2 workers is sync up to its switch,
  then exactly local SGD as computed by hand on 2 model copies (and differs from sync);
- hybrid with a single group equals synchronous data parallelism;
- a dead worker does not stop an async job (it rejoins), nor a hybrid one (its group restarts and rejoins while
  the other group goes on).

Every job is a real ``scalelab train --nproc N`` through the real CLI and launcher (torch's elastic agent starting
``python -m scalelab`` worker processes), called in this process to save one interpreter start per job.
"""

import json
import signal

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
_SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]


@pytest.fixture
def cli(capfd, monkeypatch, cache_dir):
    """``scalelab ARGS`` through the CLI in this process; returns (exit code, stdout, stderr), the workers' output
    included (they write to this process's file descriptors)."""
    from scalelab.cli import main

    monkeypatch.setenv("SCALELAB_CACHE", str(cache_dir))
    # what the launcher sets for its workers; restored after the test
    monkeypatch.setenv("SCALELAB_LAUNCHER", "1")
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")

    def run(*args):
        handlers = {s: signal.getsignal(s) for s in _SIGNALS}  # torch's agent installs its own
        capfd.readouterr()
        try:
            code = main([str(a) for a in args])
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        out, err = capfd.readouterr()
        return code, out, err

    return run


def _train(cli, tmp_path, nproc, overrides, check=True):
    """A real ``scalelab train --nproc N`` job; the same (nproc, overrides) runs once per session."""
    key = (nproc, tuple(overrides))
    if key in _RUNS and check:
        return _RUNS[key]
    out = tmp_path / f"run{len(_RUNS)}-{nproc}"
    code, stdout, stderr = cli("train", "--nproc", nproc, "--out", out,
                                    *[a for o in overrides for a in ("--set", o)])
    if check:
        assert code == 0, stdout + stderr
        _RUNS[key] = (out, code, stdout, stderr)
    return out, code, stdout, stderr


def _in_process(cache_dir, overrides, out):
    """A single-process run in this process (the sequential and sync references)."""
    import os

    if not out.exists():
        os.environ["SCALELAB_CACHE"] = str(cache_dir)
        threads = torch.get_num_threads()
        try:
            Trainer(load_config(None, overrides), out).run()
        finally:
            torch.set_num_threads(threads)
    return out


def _params(out, step=None):
    if step is None:
        return load_latest(out / "checkpoints")["model"]
    return torch.load(out / "checkpoints" / f"ckpt-{step:09d}.pt", weights_only=True)["model"]


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _assert_same(got, ref, exact=False):
    for name, p in ref.items():
        if exact:
            assert torch.equal(got[name], p), name
        else:
            torch.testing.assert_close(got[name], p, rtol=1e-9, atol=1e-12, msg=name)


def test_shards_are_balanced_whole_tensors():
    assert shard_owners([100, 10, 60, 50], 2) == [0, 0, 1, 1]  # 100 + 10 | 60 + 50
    assert shard_owners([5, 5, 5], 1) == [0, 0, 0]


def test_bad_layouts_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="parallel.mode"):
        load_config(None, ["parallel.mode=bogus"])
    with pytest.raises(ConfigError, match="parallel.backup_workers"):
        load_config(None, ["parallel.mode=async", "parallel.backup_workers=1"])
    # the noise-scale monitor lives in the sync loop: refused, not silently left out
    with pytest.raises(ConfigError, match="noise_every: built for parallel.mode=sync; parallel.mode=ssp"):
        load_config(None, ["parallel.mode=ssp", "train.noise_every=10"])
    from scalelab.train import workers_used

    with pytest.raises(ConfigError, match="leave no worker"):
        workers_used(load_config(None, ["parallel.mode=async", "parallel.servers=2"]), 2)
    with pytest.raises(ConfigError, match="parallel.group_size"):
        workers_used(load_config(None, ["parallel.mode=hybrid", "parallel.group_size=2"]), 4)


def test_async_with_one_worker_is_sequential_sgd_and_a_dead_server_stops_it(cli, tmp_path, cache_dir):
    """1 server + 1 worker: each gradient is computed on the parameters the previous update produced (staleness
    0), so the run is the single-process sync run, bit for bit (BN buffers included). The server is killed at
    step 12: the job stops with one line naming the last checkpoint (step 10), which is intact (sequential SGD's
    step 10, bit for bit); ``--resume`` continues from it to sequential SGD's step 20, bit for bit."""
    over = BASE + ["model.norm=bn"]
    seq = _in_process(cache_dir, over, tmp_path / "seq")
    out, code, stdout, stderr = _train(cli, tmp_path, 2, over + [
        "parallel.mode=async", "faults.kill_rank=0", "faults.kill_step=12", "train.checkpoint_every=5"], check=False)
    assert code == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("scalelab: error: parameter server rank 0 was killed by signal SIGKILL: "
                           "parallel.mode=async cannot go on"), last
    assert "ckpt-000000010.pt" in last and "--resume --nproc 2" in last
    state = load_latest(out / "checkpoints")
    assert state["counters"]["step"] == 10
    _assert_same(state["model"], _params(seq, 10), exact=True)
    assert _records(out, "staleness")[-1]["hist"] == [10]

    code, stdout, stderr = cli("train", "--nproc", 2, "--resume", "--out", out)
    assert code == 0, stdout + stderr
    assert "resumed from step 10" in stdout
    s = _summary(out)
    assert s["steps"] == 20 and s["restarts"] == 1
    assert s["staleness_hist"] == [10] and s["applied_by_worker"] == s["pushed_by_worker"] == [10]  # this session
    _assert_same(_params(out), _params(seq), exact=True)
    assert s["params_sha256"] == _summary(seq)["params_sha256"]


SLOW = ["stragglers.dist=fixed", "stragglers.rank=1", "stragglers.delay_s=0.05"]
SHORT = ["train.max_steps=10", "train.eval_every=5"]


def _check_exactly_once(out, workers, updates):
    s = _summary(out)
    assert s["pushed_by_worker"] == s["applied_by_worker"]  # counted by the workers and by the server
    assert len(s["applied_by_worker"]) == workers and sum(s["applied_by_worker"]) == updates == s["steps"]
    assert sum(s["staleness_hist"]) == updates * s["servers"]  # every server measures every gradient
    return s


def test_ssp_never_exceeds_its_bound_with_two_servers(cli, tmp_path, cache_dir):
    """Worker 1 sleeps 50 ms per gradient. SSP with s = 1, 2 servers holding the shards and 2 workers: the log's
    per-interval maximum of (clock - slowest clock) never exceeds 1, and reaches it; every gradient is applied
    once by each server; both shards were trained and gathered into the checkpoint. (That async without the bound
    runs far ahead under the same straggler is checked in the async fault test below.)"""
    out = _train(cli, tmp_path, 4, BASE + SHORT + SLOW + ["parallel.mode=ssp", "parallel.staleness_bound=1",
                                                                "parallel.servers=2"])[0]
    s = _check_exactly_once(out, 2, 20)
    ahead = [r["ssp_ahead_max"] for r in _records(out, "train")]
    assert ahead and max(ahead) <= 1 and s["ssp_max_ahead"] <= 1
    assert max(ahead) == 1  # the bound is reached, so it is what holds the fast worker back
    from scalelab.lab.report import report_run

    text = report_run(out)  # `scalelab report` shows the staleness histogram (server 0's: one per update)
    assert "staleness of 20 applied gradients" in text
    assert (out / "plots" / "staleness.png").exists()
    from scalelab.data import load_dataset
    from scalelab.models import build_model

    cfg = load_config(None, BASE)
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model, data.input_shape, data.num_classes).double().state_dict()
    got = _params(out)
    assert all((got[n] - p).abs().max() > 1e-6 for n, p in init.items())


def _sync(tmp_path, cache_dir):
    """The sync data-parallel reference, computed in this process: without BN, N workers with B/N each train
    exactly like one process with the global batch B (the contract tests/test_parallel_parity.py checks on real
    workers), so one in-process run is the reference for every N."""
    return _in_process(cache_dir, BASE, tmp_path / "sync")


def test_local_sgd_with_h1_is_sync_data_parallel(tmp_path, cache_dir):
    """Averaging the models after every local step of SGD with momentum (linear in the gradient) gives the
    parameters of averaging the gradients: sync DP up to rounding (the emulation below checks 2 workers)."""
    sync = _params(_sync(tmp_path, cache_dir))
    local = _in_process(cache_dir, BASE + ["parallel.mode=localsgd", "parallel.local_period=1"], tmp_path / "l1")
    _assert_same(_params(local), sync)
    cfg = load_config(None, BASE)
    _assert_same(_local_sgd_by_hand(cfg, workers=2, H=1, t0=0), sync)


def test_runs_stopped_part_way_keep_their_schedule(cli, tmp_path, cache_dir):
    """``train.schedule_steps``: a local-SGD run and an async (parameter-server) run stopped at step 10 of a
    20-step cosine schedule have the parameters of the sequential 20-step run at its step 10."""
    seq = _in_process(cache_dir, BASE, tmp_path / "seq")
    cut = ["train.max_steps=10", "train.schedule_steps=20"]
    local = _in_process(cache_dir, BASE + ["parallel.mode=localsgd", "parallel.local_period=1"] + cut,
                        tmp_path / "local")
    _assert_same(_params(local), _params(seq, 10))
    out, *_ = _train(cli, tmp_path, 2, BASE + ["parallel.mode=async"] + cut)
    assert _summary(out)["steps"] == 10
    _assert_same(_params(out), _params(seq, 10), exact=True)
    short = _in_process(cache_dir, BASE + ["train.max_steps=10"], tmp_path / "short")   # its own 10-step cosine
    assert not torch.equal(next(iter(_params(short).values())), next(iter(_params(seq, 10).values())))


def _local_sgd_by_hand(cfg, workers: int, H: int, t0: int) -> dict:
    """Post-local SGD as Lin et al. 2020 write it, on ``workers`` model copies in this process: every copy takes
    its B / N share of each global batch and steps with its own optimizer; for the first ``t0`` steps the
    gradients are averaged (sync SGD), then the models are averaged every ``H`` steps. Returns the average model."""
    import copy

    import torch.nn.functional as F

    from scalelab.data import batch_indices, epoch_order, load_dataset, steps_per_epoch
    from scalelab.models import build_model
    from scalelab.recipe import build_optimizer, build_schedule

    data = load_dataset(cfg.data)
    x, y, B, steps = data.x_train.double(), data.y_train, cfg.train.batch_size, cfg.train.max_steps
    spe = steps_per_epoch(len(x), B)
    torch.manual_seed(cfg.train.seed)
    models = [build_model(cfg.model, data.input_shape, data.num_classes).double()]
    models += [copy.deepcopy(models[0]) for _ in range(workers - 1)]
    opts = [build_optimizer(cfg.recipe, m, spe, global_batch=B) for m in models]
    sched = build_schedule(cfg.recipe, B, spe, steps)

    def average(tensors):
        mean = sum(t.detach() for t in tensors) / workers
        for t in tensors:
            t.data.copy_(mean)

    for step in range(steps):
        epoch, k = divmod(step, spe)
        order = epoch_order(len(x), cfg.train.seed, epoch)
        for r, (m, opt) in enumerate(zip(models, opts)):
            idx = batch_indices(order, k, B, r, workers)
            for g in opt.param_groups:
                g["lr"] = sched(step)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x[idx]), y[idx]).backward()
        if step < t0:
            for ps in zip(*(m.parameters() for m in models)):
                average([p.grad for p in ps])
        for opt in opts:
            opt.step()
        if step + 1 > t0 and (step + 1 - t0) % H == 0:
            for ps in zip(*(m.parameters() for m in models)):
                average(list(ps))
    for ps in zip(*(m.parameters() for m in models)):
        average(list(ps))
    return {k: v.detach().clone() for k, v in models[0].state_dict().items()}


def test_post_local_sgd_is_sync_then_local(cli, tmp_path, cache_dir):
    """Post-local SGD with 2 workers, switching at step 10, H = 4: at step 10 (synchronous phase) the parameters
    are sync's; at step 20 they are those of post-local SGD computed by hand (2 averagings, at steps 14 and 18, and
    the average of the 2 drifted models at 20), which differ from sync's (so the H = 1 equality is not vacuous)."""
    sync_dir = _sync(tmp_path, cache_dir)
    over = BASE + ["parallel.mode=localsgd", "parallel.local_period=4", "parallel.local_start_step=10"]
    out = _train(cli, tmp_path, 2, over)[0]
    _assert_same(_params(out, 10), _params(sync_dir, 10))
    post = _params(out)
    _assert_same(post, _local_sgd_by_hand(load_config(None, over), workers=2, H=4, t0=10))
    assert max((post[n] - p).abs().max().item() for n, p in _params(sync_dir).items()) > 1e-4
    assert _summary(out)["averagings"] == 2


def test_hybrid_with_one_group_is_sync_data_parallel(cli, tmp_path, cache_dir):
    """1 server + one group of 2 workers: the group's all-reduced gradient is the sync gradient of B, applied at
    staleness 0, each exactly once."""
    sync = _params(_sync(tmp_path, cache_dir))
    out = _train(cli, tmp_path, 3, BASE + ["parallel.mode=hybrid", "parallel.group_size=2"])[0]
    _assert_same(_params(out), sync)
    assert _check_exactly_once(out, 1, 20)["staleness_hist"] == [20]


def test_dead_worker_does_not_stop_async_and_rejoins(cli, tmp_path):
    """Worker 1 sleeps 100 ms per gradient; worker 0 is killed at step 6. The job goes on with worker 1, worker 0
    rejoins and finishes the run with it; every update is made once (the lost ticket is handed out again).
    Without a bound, the fast worker runs far ahead of the slow one (more than SSP's bound above)."""
    out, code, stdout, stderr = _train(cli, tmp_path, 3, BASE + [
        "parallel.mode=async", "faults.kill_rank=1", "faults.kill_step=6", "stragglers.dist=fixed",
        "stragglers.rank=1", "stragglers.delay_s=0.1", "parallel.timeout_s=60", "parallel.staleness_lr=true",
        "recipe.schedule=constant"], check=False)
    assert code == 0, stdout + stderr
    assert "faults: killing rank 1" in stderr
    assert "worker rank 1 died (SIGKILL); the job goes on without it; restarting it to rejoin" in stderr
    assert "worker 0 (rank 1) is gone at step" in stdout and "the other 1 worker(s) go on" in stdout
    assert "worker 0 (rank 1) rejoined" in stdout
    s = _summary(out)
    assert s["worker_deaths"] == 1 and s["worker_rejoins"] == 1
    assert s["steps"] == 40 and sum(s["applied_by_worker"]) == 40  # the lost batch was handed to another
    assert _records(out, "worker_lost") and _records(out, "rejoin")
    assert s["ssp_max_ahead"] > 3 and s["applied_by_worker"][1] < s["applied_by_worker"][0]
    # staleness-aware LR (Zhang et al. 2016): each gradient's LR is the peak divided by max(tau, 1), so the smallest
    # LR of each logging interval is the peak divided by the interval's largest staleness
    peak = 0.1 * 24 / 48  # base_lr at base_batch 48, linearly scaled to updates of 48 / 2 workers
    train = _records(out, "train")
    assert train and all(abs(r["lr_min"] * max(r["staleness_max"], 1) - peak) < 1e-12 for r in train)
    assert all(abs(r["lr"] * round(peak / r["lr"]) - peak) < 1e-12 for r in train)  # the last one: peak / tau
    assert max(r["staleness_max"] for r in train) >= 2  # so the division is not by 1 throughout


def test_dead_worker_restarts_its_hybrid_group_and_the_other_goes_on(cli, tmp_path):
    """2 groups of 2; rank 2 (group 0's second member) is killed with SIGKILL at step 6. Its group's leader sees
    its all-reduce fail and the group restarts (the killed member restarted by its supervisor, both joining a new
    formation from the server's parameters), while group 1 goes on; the job completes every update."""
    out, code, stdout, stderr = _train(cli, tmp_path, 5, BASE + [
        "parallel.mode=hybrid", "parallel.group_size=2", "faults.kill_rank=2", "faults.kill_step=6",
        "stragglers.dist=exp", "stragglers.delay_s=0.05", "parallel.timeout_s=60"], check=False)
    assert code == 0, stdout + stderr
    assert "faults: killing rank 2" in stderr
    assert "worker rank 2 died (SIGKILL); the other groups go on; restarting it to rejoin with its group" in stderr
    assert "worker rank 1: group 0 lost a member at formation 0" in stderr  # the survivor restarts with it
    assert "group 0 (ranks 1-2) is gone at step" in stdout and "the other 1 group(s) go on" in stdout
    assert "group 0 (ranks 1-2) rejoined" in stdout
    s = _summary(out)
    assert s["worker_deaths"] == 1 and s["worker_rejoins"] == 1
    assert s["steps"] == 40 and sum(s["applied_by_worker"]) == 40  # the lost ticket was handed out again
    assert _records(out, "worker_lost") and _records(out, "rejoin")
    # both groups trained after the restart (pushes are counted per life: group 0's are those since it)
    assert s["pushed_by_worker"][0] > 0 and s["applied_by_worker"][0] >= s["pushed_by_worker"][0]
    assert s["pushed_by_worker"][1] == s["applied_by_worker"][1] > 0
