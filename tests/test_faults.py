"""Faults in a multi-process job: a worker killed with SIGKILL is restarted by the elastic agent and the job
resumes from the latest checkpoint; the result is the uninterrupted run's, bit for bit."""

import json
import os
import shutil
import subprocess
import sys

import pytest

# no BN and float64, so that runs on different numbers of workers agree to rounding (elastic membership)
RUN = ["--set", "data.name=synthetic", "--set", "data.n_train=4096", "--set", "data.n_test=512", "--set",
       "model.name=mlp", "--set", "model.width=64", "--set", "model.norm=none", "--set", "train.dtype=float64",
       "--set", "train.batch_size=64", "--set", "train.max_steps=80", "--set", "train.checkpoint_every=20",
       "--set", "train.eval_every=40", "--no-progress"]


def _train(out, cache_dir, *extra):
    env = {**os.environ, "SCALELAB_CACHE": str(cache_dir)}
    return subprocess.run([sys.executable, "-m", "scalelab", "train", "--nproc", "2", "--out", str(out), *RUN,
                           *extra], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("faults") / "ref"
    ref = _train(out, cache_dir)
    assert ref.returncode == 0, ref.stderr
    return json.loads((out / "summary.json").read_text())


def test_killed_worker_is_restarted_and_the_run_is_exact(reference, tmp_path, cache_dir):
    proc = _train(tmp_path / "killed", cache_dir, "--max-restarts", "1", "--set", "faults.kill_rank=1",
                  "--set", "faults.kill_step=50")
    assert proc.returncode == 0, proc.stderr
    assert "faults: killing rank 1 at step 50" in proc.stderr
    assert "resumed from step 40" in proc.stdout  # at most one checkpoint interval (20 steps) repeated
    a = reference
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert b["restarts"] == 1 and a["restarts"] == 0
    assert b["params_sha256"] == a["params_sha256"]
    assert b["final_test_acc"] == a["final_test_acc"]


def test_without_restarts_a_dead_worker_fails_the_job_with_one_line(tmp_path, cache_dir):
    proc = _train(tmp_path / "dead", cache_dir, "--set", "faults.kill_rank=1", "--set", "faults.kill_step=30")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("scalelab: error: worker rank 1 was killed by signal SIGKILL after 0 restart(s)")
    assert "--resume --nproc 2" in last
    ckpts = sorted((tmp_path / "dead" / "checkpoints").glob("ckpt-*.pt"))
    assert [p.name for p in ckpts] == ["ckpt-000000020.pt"]  # the last good checkpoint is there to resume from


def test_hung_worker_is_reported_by_rank_not_a_silent_deadlock(tmp_path, cache_dir):
    proc = _train(tmp_path / "hang", cache_dir, "--set", "faults.hang_rank=1", "--set", "faults.hang_step=30",
                  "--set", "parallel.timeout_s=3")
    assert proc.returncode == 1
    assert ("scalelab: error: rank 0: a collective at step 30 failed after waiting up to parallel.timeout_s=3 s: "
            "rank(s) 1 stopped responding (hung or dead)") in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("scalelab: error: worker rank 0 exited with code 1")


@pytest.fixture(scope="module")
def lost_worker(tmp_path_factory, cache_dir):
    """A 2-worker job whose rank 1 died at step 50 for good (no restarts): checkpoints up to step 40."""
    out = tmp_path_factory.mktemp("lost") / "run"
    dead = _train(out, cache_dir, "--set", "faults.kill_rank=1", "--set", "faults.kill_step=50")
    assert dead.returncode == 1
    return out


def _resume_copy(lost_worker, out, cache_dir, *args):
    """Continue a copy of the lost-worker run with ``scalelab train --resume ARGS``."""
    shutil.copytree(lost_worker, out)
    env = {**os.environ, "SCALELAB_CACHE": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "scalelab", "train", "--resume", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads((out / "summary.json").read_text())


def test_resume_on_another_world_size_keeps_the_global_batch(reference, lost_worker, tmp_path, cache_dir):
    """Elastic membership: a 2-worker job loses a worker for good, and the run continues on 4 workers from the
    last checkpoint. Without BN the global batch is the same samples whatever the split, so the result equals
    the uninterrupted 2-worker run (float64, up to summation order)."""
    more, b = _resume_copy(lost_worker, tmp_path / "elastic", cache_dir, "--nproc", "4")
    assert ("world size changed from 2 to 4 workers at restart: keeping the global batch 64 and the recipe; "
            "per-worker batch 32 -> 16") in more.stdout
    assert b["steps"] == reference["steps"] == 80 and b["world_size"] == 4 and b["restarts"] == 1
    assert abs(b["final_test_loss"] - reference["final_test_loss"]) < 1e-9


def test_resume_on_fewer_workers_accumulates_to_keep_the_global_batch(reference, lost_worker, tmp_path, cache_dir):
    """2 workers -> 1: the global batch 64 is kept, the single worker runs 2 micro-batches of 32 (its share before)
    per step, and the run equals the uninterrupted one (no BN, float64)."""
    one, b = _resume_copy(lost_worker, tmp_path / "shrink", cache_dir)
    assert ("world size changed from 2 to 1 workers at restart: keeping the global batch 64 and the recipe; "
            "per-worker batch 32 -> 64 in 2 micro-batches of 32") in one.stdout
    assert b["steps"] == 80 and b["world_size"] == 1 and b["global_batch"] == 64
    assert abs(b["final_test_loss"] - reference["final_test_loss"]) < 1e-9


def test_keep_worker_policy_scales_the_global_batch_and_the_lr(lost_worker, tmp_path, cache_dir):
    """The policy may be chosen when resuming: 2 -> 4 workers keeping each worker's 32 samples."""
    more, b = _resume_copy(lost_worker, tmp_path / "grow", cache_dir, "--nproc", "4",
                           "--set", "parallel.resize=keep_worker")
    # base_lr 0.2 at base_batch 256, linear rule: 0.05 at 64, 0.1 at 128
    assert ("world size changed from 2 to 4 workers at restart: keeping each worker's batch 32; global batch "
            "64 -> 128, peak lr 0.05 -> 0.1 by the linear scaling rule (parallel.resize=keep_worker)") in more.stdout
    assert b["global_batch"] == 128 and b["steps"] == 80 and b["samples_seen"] == 40 * 64 + 40 * 128
    rows = [json.loads(x) for x in (tmp_path / "grow" / "metrics.jsonl").read_text().splitlines()]
    assert {r["batch"] for r in rows if r["kind"] == "train" and r["step"] > 40} == {128}


def test_exit_worker_leaves_the_group_flushes_and_keeps_the_exit_code(tmp_path):
    """A worker ends through exit_worker: buffered output written, the group left, the given code returned
    (without the C++ static destructors that can abort a gloo process after it succeeded)."""
    code = ("import sys, torch.distributed as dist\n"
            "from scalelab.parallel.runtime import exit_worker\n"
            f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
            "sys.stdout.write('written'); sys.stderr.write('reported')\n"
            "exit_worker(3)\n"
            "print('never')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout, p.stderr.strip()) == (3, "written", "reported")
