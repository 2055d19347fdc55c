"""Straggler injection and backup workers (Chen et al. 2016), in real gloo processes."""

import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from scalelab.checkpoint import load_latest
from scalelab.config import StragglersConfig, load_config
from scalelab.data import batch_indices, epoch_order, load_dataset, steps_per_epoch
from scalelab.models import build_model
from scalelab.parallel.stragglers import straggler_delay
from scalelab.recipe import build_optimizer, build_schedule


def test_delays_follow_their_definitions():
    fixed = StragglersConfig(dist="fixed", rank=1, delay_s=0.3)
    assert [straggler_delay(fixed, r, 5) for r in range(3)] == [0.0, 0.3, 0.0]
    exp = StragglersConfig(dist="exp", delay_s=0.02, seed=3)
    draws = [straggler_delay(exp, r, s) for r in range(4) for s in range(2000)]
    assert abs(statistics.mean(draws) - 0.02) < 0.002  # exponential with mean delay_s
    assert draws == [straggler_delay(exp, r, s) for r in range(4) for s in range(2000)]  # a pure function
    pareto = StragglersConfig(dist="pareto", delay_s=0.01, shape=1.5, prob=0.5)
    draws = [straggler_delay(pareto, 0, s) for s in range(4000)]
    hit = [d for d in draws if d > 0]
    assert 0.45 < len(hit) / len(draws) < 0.55 and min(hit) >= 0.01
    assert max(hit) > 20 * statistics.median(hit)  # a heavy tail
    assert straggler_delay(StragglersConfig(), 0, 0) == 0.0


BASE = ["data.name=synthetic", "data.n_train=2400", "data.n_test=300", "model.name=mlp", "model.width=32",
        "model.norm=none", "train.batch_size=64", "train.max_steps=30", "train.eval_every=15",
        "recipe.base_lr=0.1", "recipe.base_batch=64", "recipe.warmup_epochs=0", "train.dtype=float64",
        "train.progress=false"]


def test_backup_workers_average_exactly_the_first_n_gradients(tmp_path, cache_dir):
    """3 workers, 1 backup, rank 2 always 0.5 s late: every step uses ranks 0 and 1, and the parameters equal
    a single-process replay that averages exactly those two workers' gradients."""
    out = tmp_path / "backup"
    args = [a for o in BASE + ["parallel.backup_workers=1", "stragglers.dist=fixed", "stragglers.rank=2",
                               "stragglers.delay_s=0.5"] for a in ("--set", o)]
    env = {**os.environ, "SCALELAB_CACHE": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "scalelab", "train", "--nproc", "3", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dropped = {r["step"]: r["dropped"] for r in records if r["kind"] == "backup"}
    assert dropped == {s: [2] for s in range(30)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped_grads"] == 30 and summary["backup_workers"] == 1
    assert summary["train_s"] < 30 * 0.5 / 2  # the late worker never made a step wait for its 0.5 s

    # the replay: the gradient of the mean loss over workers 0 and 1's shares (no BN, so that is their mean)
    cfg = load_config(None, BASE)
    data = load_dataset(cfg.data)
    x, y = data.x_train.double(), data.y_train
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes).double()
    read = 32 * 3
    spe = steps_per_epoch(len(x), read)
    opt = build_optimizer(cfg.recipe, model, spe, global_batch=64)
    sched = build_schedule(cfg.recipe, 64, spe, 30)
    for step in range(30):
        epoch, k = divmod(step, spe)
        order = epoch_order(len(x), cfg.train.seed, epoch)
        idx = torch.cat([batch_indices(order, k, read, r, 3) for r in (0, 1)])
        for g in opt.param_groups:
            g["lr"] = sched(step)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    got = load_latest(out / "checkpoints")["model"]
    for name, p in model.state_dict().items():
        torch.testing.assert_close(got[name], p, rtol=1e-9, atol=1e-12, msg=name)
