"""Faults in a multi-process job: a worker killed with SIGKILL is restarted by the elastic agent and the job
resumes from the latest checkpoint; the result is the uninterrupted run's, bit for bit."""

import json
import os
import subprocess
import sys

RUN = ["--set", "data.name=synthetic", "--set", "data.n_train=4096", "--set", "data.n_test=512", "--set",
       "model.name=mlp", "--set", "model.width=64", "--set", "train.batch_size=64", "--set", "train.max_steps=120",
       "--set", "train.checkpoint_every=25", "--set", "train.eval_every=60", "--no-progress"]


def _train(out, cache_dir, *extra):
    env = {**os.environ, "SCALELAB_CACHE": str(cache_dir)}
    return subprocess.run([sys.executable, "-m", "scalelab", "train", "--nproc", "2", "--out", str(out), *RUN,
                           *extra], capture_output=True, text=True, env=env, timeout=300)


def test_killed_worker_is_restarted_and_the_run_is_exact(tmp_path, cache_dir):
    ref = _train(tmp_path / "ref", cache_dir)
    assert ref.returncode == 0, ref.stderr
    proc = _train(tmp_path / "killed", cache_dir, "--max-restarts", "1", "--set", "faults.kill_rank=1",
                  "--set", "faults.kill_step=60")
    assert proc.returncode == 0, proc.stderr
    assert "faults: killing rank 1 at step 60" in proc.stderr
    assert "resumed from step 50" in proc.stdout  # at most one checkpoint interval (25 steps) repeated
    a = json.loads((tmp_path / "ref" / "summary.json").read_text())
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
    assert [p.name for p in ckpts] == ["ckpt-000000025.pt"]  # the last good checkpoint is there to resume from


def test_hung_worker_is_reported_by_rank_not_a_silent_deadlock(tmp_path, cache_dir):
    proc = _train(tmp_path / "hang", cache_dir, "--set", "faults.hang_rank=1", "--set", "faults.hang_step=30",
                  "--set", "parallel.timeout_s=3")
    assert proc.returncode == 1
    assert ("scalelab: error: rank 0: a collective at step 30 failed after waiting up to parallel.timeout_s=3 s: "
            "rank(s) 1 stopped responding (hung or dead)") in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("scalelab: error: worker rank 0 exited with code 1")
