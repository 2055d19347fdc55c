"""Exact resume: SIGKILL a real ``scalelab train`` process, resume it, and compare ``params_sha256``.

Two kill points: in the middle of training (after some checkpoints), and while a checkpoint file is being
written (the process is killed as soon as the temporary checkpoint file appears).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from scalelab.checkpoint import list_checkpoints

# an MLP big enough that a checkpoint takes a visible moment to write (about 20 MB with momentum)
RUN = ["--set", "data.name=synthetic", "--set", "data.input_dim=256", "--set", "data.n_train=4096",
       "--set", "model.name=mlp", "--set", "model.width=768", "--set", "model.depth=3",
       "--set", "train.batch_size=128", "--set", "train.epochs=3", "--set", "train.checkpoint_every=8",
       "--set", "train.eval_every=16", "--set", "train.threads=1", "--no-progress"]


def _start(out, cache_dir, *extra):
    env = {**os.environ, "SCALELAB_CACHE": str(cache_dir)}
    return subprocess.Popen([sys.executable, "-m", "scalelab", "train", *RUN, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(pred, timeout=120.0, poll=0.001):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(poll)
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("ref") / "run"
    p = _start(out, cache_dir)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    return json.loads((out / "summary.json").read_text())


def _resume(out, cache_dir):
    p = _start(out, cache_dir, "--resume")
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert "resumed from step" in stdout
    return json.loads((out / "summary.json").read_text())


def test_sigkill_mid_run_then_resume_is_exact(reference, tmp_path, cache_dir):
    out = tmp_path / "run"
    p = _start(out, cache_dir)
    assert _wait_for(lambda: len(list_checkpoints(out / "checkpoints")) >= 2 or p.poll() is not None)
    time.sleep(0.3)  # somewhere between checkpoints
    assert p.poll() is None, "the run finished before it could be killed; make RUN longer"
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = list_checkpoints(out / "checkpoints")[-1][0]
    assert killed_at < reference["steps"]
    resumed = _resume(out, cache_dir)
    assert resumed["params_sha256"] == reference["params_sha256"]
    assert resumed["steps"] == reference["steps"]
    assert resumed["final_test_acc"] == reference["final_test_acc"]
    # the metrics log reads as one run: no step logged twice
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps))


def test_sigkill_during_checkpoint_write_then_resume_is_exact(reference, tmp_path, cache_dir):
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    p = _start(out, cache_dir)

    def writing_second_checkpoint():
        return (ckdir.is_dir() and len(list_checkpoints(ckdir)) >= 1
                and any(n.startswith(".ckpt-") for n in os.listdir(ckdir))) or p.poll() is not None

    assert _wait_for(writing_second_checkpoint)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    resumed = _resume(out, cache_dir)
    assert resumed["params_sha256"] == reference["params_sha256"]
