"""Elastic membership with real elastic agents: nodes join and leave a running job.

Two ``scalelab train --nnodes 1:2`` processes are two nodes of one job (each an elastic agent of torch's launcher
with one worker, meeting at a c10d rendezvous on this machine). Node A starts alone; node B joins mid-run, so the
agents stop their workers and the job continues on 2 workers from the last checkpoint; then node B dies (agent and
worker SIGKILLed), and A's agent restarts on 1 worker from the last checkpoint. The global batch is kept
throughout (``parallel.resize=keep_global``: on one worker, two micro-batches), so without BN and in float64 the
result equals an uninterrupted single-process run up to summation order.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from scalelab.config import load_config
from scalelab.parallel.launch import free_port
from scalelab.train import Trainer

STEPS = 300
RUN = ["data.name=synthetic", "data.n_train=4096", "data.n_test=512", "model.name=mlp", "model.width=32",
       "model.norm=none", "train.dtype=float64", "train.batch_size=64", f"train.max_steps={STEPS}",
       "train.checkpoint_every=10", "train.eval_every=100", "parallel.timeout_s=10", "train.threads=1"]
# slow every step down (rank 0 sleeps; the others wait for it), so that the membership changes happen mid-run
SLOW = ["stragglers.dist=fixed", "stragglers.rank=0", "stragglers.delay_s=0.05"]


def _node(out: Path, port: int, cache_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "SCALELAB_CACHE": str(cache_dir)}
    args = [sys.executable, "-m", "scalelab", "train", "--nproc", "1", "--nnodes", "1:2", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", "elastic-test", "--max-restarts", "3", "--out", str(out),
            "--no-progress", *[a for kv in RUN + SLOW for a in ("--set", kv)]]
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _latest_step(out: Path) -> int:
    steps = [int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("ckpt-*.pt")]
    return max(steps, default=-1)


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_nodes_join_and_leave_a_running_job(tmp_path, cache_dir):
    ref = Trainer(load_config(None, RUN + ["train.progress=false", f"data.cache_dir={cache_dir}"])).run()

    out, port = tmp_path / "run", free_port()
    a = _node(out, port, cache_dir, tmp_path / "a.log")
    b = None
    try:
        _wait_for(lambda: _latest_step(out) >= 20, 120, "node A to train alone")
        b = _node(out, port, cache_dir, tmp_path / "b.log")
        joined = lambda: "world size changed from 1 to 2" in (tmp_path / "a.log").read_text() + (
            tmp_path / "b.log").read_text()
        _wait_for(joined, 120, "node B to join")
        at_join = _latest_step(out)
        _wait_for(lambda: _latest_step(out) >= at_join + 30, 120, "the two nodes to train together")
        for pid in _children(b.pid) + [b.pid]:  # node B dies: its agent and its worker
            os.kill(pid, signal.SIGKILL)
        b.wait()
        assert a.wait(timeout=180) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)

    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert ("world size changed from 1 to 2 workers at restart: keeping the global batch 64 and the recipe; "
            "per-worker batch 64 -> 32") in logs
    assert ("world size changed from 2 to 1 workers at restart: keeping the global batch 64 and the recipe; "
            "per-worker batch 32 -> 64 in 2 micro-batches of 32") in logs
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == STEPS and s["world_size"] == 1 and s["restarts"] == 2
    assert abs(s["final_test_loss"] - ref["final_test_loss"]) < 1e-9
    # the metrics log was cut back to each resumed checkpoint: one record per step, in order
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
