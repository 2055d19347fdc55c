"""End to end through the real command line: a reduced default run, its files, replay, target stop, errors."""

import json

import numpy as np
import pytest

SMALL = ["--set", "data.n_train=5000", "--set", "data.n_test=1000", "--set", "train.epochs=4",
         "--set", "train.threads=1", "--no-progress"]

SUMMARY_KEYS = ["final_test_acc", "best_test_acc", "final_test_loss", "steps", "epochs", "samples_seen", "wall_s",
                "train_samples_per_s", "target_acc", "steps_to_target", "time_to_target_s", "world_size",
                "global_batch", "comm_bytes", "peak_rss_mb", "params_sha256"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, cache_dir):
    """The default recipe on a reduced MNIST-1D, run once through the CLI for the tests below."""
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("runs") / "default"
    env = {**os.environ, "SCALELAB_CACHE": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "scalelab", "train", *SMALL, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_default_run_writes_the_run_directory(default_run):
    out, proc = default_run
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert summary["steps"] == 4 * (5000 // 256) and summary["global_batch"] == 256
    assert summary["samples_seen"] == summary["steps"] * 256
    assert summary["world_size"] == 1 and summary["comm_bytes"] == 0
    assert summary["final_test_acc"] > 0.8  # 4 short epochs on 5000 samples (about 0.9 measured)
    assert summary["target_acc"] is None and summary["time_to_target_s"] is None
    assert len(summary["params_sha256"]) == 64
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"train", "eval", "summary"} <= kinds
    assert all("step" in r for r in records)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert list((out / "checkpoints").glob("ckpt-*.pt"))
    assert "final_test_acc" in proc.stdout and "run directory" in proc.stdout  # the summary table


def test_replay_from_saved_config_is_exact(default_run, run_cli, tmp_path):
    out, _ = default_run
    proc = run_cli("train", "--config", out / "config.toml", "--out", tmp_path / "replay", "--no-progress",
                   check=True)
    a = json.loads((out / "summary.json").read_text())
    b = json.loads((tmp_path / "replay" / "summary.json").read_text())
    assert a["params_sha256"] == b["params_sha256"], proc.stdout


def test_report_writes_plots(default_run, run_cli):
    out, _ = default_run
    proc = run_cli("report", out, check=True)
    assert "final_test_acc" in proc.stdout
    for name in ("curves.png", "lr.png"):
        png = out / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_target_acc_stops_and_records(run_cli, tmp_path):
    out = tmp_path / "target"
    run_cli("train", "--set", "data.name=synthetic", "--set", "model.name=mlp", "--set", "train.epochs=20",
            "--set", "train.target_acc=0.6", "--set", "train.eval_every=5", "--no-progress", "--out", out,
            check=True)
    s = json.loads((out / "summary.json").read_text())
    assert s["stopped"] == "target"
    assert s["final_test_acc"] >= 0.6 and s["best_test_acc"] >= 0.6
    assert s["steps_to_target"] == s["steps"] and s["steps"] % 5 == 0
    assert s["steps"] < 20 * (10000 // 256)
    assert 0 < s["time_to_target_s"] <= s["train_s"] < s["wall_s"]


@pytest.mark.parametrize("args, message", [
    (["--set", "train.batchsize=3"], "scalelab: error: unknown config key 'train.batchsize'"),
    (["--set", "train.epochs=-1"], "scalelab: error: train.epochs: -1.0 is out of range; allowed: > 0.0"),
    (["--set", "data.name=imagenet"], "scalelab: error: unknown dataset 'imagenet'; known: cifar10, digits"),
    (["--set", "model.name=vgg"], "scalelab: error: unknown model 'vgg'; known:"),
    (["--resume"], "scalelab: error: --resume needs --out DIR"),
])
def test_bad_input_exits_2_with_one_line(run_cli, tmp_path, args, message):
    out = tmp_path / "bad"
    proc = run_cli("train", *args, *(["--out", out] if "--resume" not in args else []))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not (out / "checkpoints").exists()


def test_corrupt_npz_is_one_line(run_cli, tmp_path):
    bad = tmp_path / "mine.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    proc = run_cli("train", "--set", "data.name=npz", "--set", f"data.root={bad}", "--out", tmp_path / "r")
    assert proc.returncode == 2
    assert proc.stderr.startswith("scalelab: error:") and "mine.npz" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_npz_user_data_trains(run_cli, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "mine.npz", x_train=x[:500], y_train=y[:500], x_test=x[500:], y_test=y[500:])
    out = tmp_path / "npzrun"
    run_cli("train", "--set", "data.name=npz", "--set", f"data.root={tmp_path / 'mine.npz'}", "--set",
            "model.name=mlp", "--set", "train.batch_size=50", "--set", "train.epochs=5", "--no-progress",
            "--out", out, check=True)
    assert json.loads((out / "summary.json").read_text())["final_test_acc"] > 0.9


def test_existing_run_is_not_overwritten(default_run, run_cli):
    out, _ = default_run
    before = (out / "summary.json").read_text()
    proc = run_cli("train", "--out", out, *SMALL)
    assert proc.returncode == 2 and "already holds a run; add --resume" in proc.stderr
    assert (out / "summary.json").read_text() == before


def test_resume_with_other_config_is_refused(default_run, run_cli):
    out, _ = default_run
    proc = run_cli("train", "--out", out, "--resume", "--set", "recipe.base_lr=0.5")
    assert proc.returncode == 2
    assert "was written with a different config: recipe.base_lr (checkpoint 0.2, now 0.5)" in proc.stderr


DIVERGE = ["--set", "data.name=synthetic", "--set", "data.n_train=1024", "--set", "data.n_test=256", "--set",
           "model.name=mlp", "--set", "model.norm=none", "--set", "recipe.base_lr=1e12", "--set",
           "recipe.momentum=0", "--set", "recipe.nesterov=false", "--no-progress"]


def test_nan_loss_stops_naming_the_step_and_keeps_checkpoint(run_cli, tmp_path):
    out = tmp_path / "nan"
    proc = run_cli("train", *DIVERGE, "--set", "train.checkpoint_every=1", "--out", out)
    assert proc.returncode == 3, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("scalelab: error: loss is") and "at step" in err and "last good checkpoint" in err
    step = int(err.split("at step ")[1].split()[0])
    ckpts = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts and int(ckpts[-1].stem.split("-")[1]) <= step
    run_cli("train", *DIVERGE, "--set", "train.on_nan=skip", "--set", "train.epochs=1", "--out", tmp_path / "skip",
            check=True)
    assert json.loads((tmp_path / "skip" / "summary.json").read_text())["skipped_steps"] > 0


def test_divergence_on_two_workers_stops_both_with_one_decision(run_cli, tmp_path):
    """Every worker sees the same all-reduced gradients, so all stop at the same step (exit 3, not a restart)."""
    proc = run_cli("train", "--nproc", "2", *DIVERGE, "--out", tmp_path / "nan2")
    assert proc.returncode == 3, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("scalelab: error:")]
    steps = {x.split("at step ")[1].split()[0] for x in errors[:-1]}
    assert len(errors) == 3 and len(steps) == 1, errors  # both workers, same step, then the launcher
    assert "are not finite" in errors[0] or "loss is nan" in errors[0] or "loss is inf" in errors[0]
    assert errors[-1].startswith("scalelab: error: the training diverged (worker rank")


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2:1"], "--nnodes '2:1': expected N or MIN:MAX with 1 <= MIN <= MAX"),
    (["--nnodes", "1:2"], "--nnodes with more than one node needs --rdzv-endpoint HOST:PORT, --rdzv-id ID"),
    (["--nnodes", "1:2", "--rdzv-endpoint", "node1", "--rdzv-id", "j"], "--rdzv-endpoint 'node1': expected HOST:PORT"),
])
def test_bad_multinode_arguments_are_one_line_and_create_nothing(run_cli, tmp_path, args, message):
    proc = run_cli("train", *args, "--out", tmp_path / "run")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"scalelab: error: {message}")
    assert not (tmp_path / "run").exists()
