"""The batch plan: batch-size schedules (Smith et al. 2017), gradient accumulation, and the data position."""

import json
import math

import pytest
import torch

from scalelab.config import load_config
from scalelab.data import batch_indices, epoch_order, steps_per_epoch
from scalelab.errors import ConfigError
from scalelab.recipe.batch import BatchPlan
from scalelab.train import Trainer


def _walk(plan, steps):
    """(epoch, pos, B) of the first ``steps`` steps."""
    epoch, pos, out = 0, 0, []
    for _ in range(steps):
        epoch, pos, B = plan.start(epoch, pos)
        out.append((epoch, pos, B))
        pos += plan.read(B)
    return out


def test_constant_batch_reads_what_the_step_indexed_sampler_reads():
    n, B, world = 1000, 96, 4
    plan = BatchPlan(B, n, used=world, world=world)
    spe = steps_per_epoch(n, B)
    assert plan.ref_steps_per_epoch == spe == 10
    for step, (epoch, pos, b) in enumerate(_walk(plan, 3 * spe)):
        e, k = divmod(step, spe)
        assert (epoch, pos, b) == (e, k * B, B)
        assert plan.ref_step(epoch, pos) == step  # the LR schedule sees the step number
        order = epoch_order(n, 0, epoch)
        for rank in range(world):
            share = plan.share(b)
            assert torch.equal(order[pos + rank * share:pos + (rank + 1) * share],
                               batch_indices(order, k, B, rank, world))
        assert plan.epoch_ends(epoch, pos + B) == (k == spe - 1)
    assert plan.count_steps(0, 0, total_ref=25) == 25


def test_batch_grows_at_the_milestones_and_the_schedule_runs_over_the_same_epochs():
    n = 1024
    plan = BatchPlan(64, n, milestones=(1.0, 2.0), growth=2.0)
    walk = _walk(plan, 16 + 8 + 4)
    assert [b for _, _, b in walk] == [64] * 16 + [128] * 8 + [256] * 4
    assert [e for e, _, _ in walk] == [0] * 16 + [1] * 8 + [2] * 4
    # reference steps advance by B / B0 per step: the LR schedule still ends after 3 epochs
    refs = [plan.ref_step(e, p) for e, p, _ in walk]
    assert refs[16:18] == [16, 18] and refs[24:26] == [32, 36]
    assert plan.count_steps(0, 0, total_ref=3 * 16) == 28  # instead of 48 at a constant batch
    assert plan.micro_batches(256) == 1 and BatchPlan(64, n, micro=48).micro_batches(64) == 2


def test_a_batch_the_workers_cannot_split_is_one_line_error():
    with pytest.raises(ConfigError, match=r"global batch 160 \(after 1 batch_milestones\) is not divisible by the "
                                          r"3 workers"):
        BatchPlan(96, 10_000, used=3, world=3, milestones=(1.0,), growth=5 / 3)
    with pytest.raises(ConfigError, match="a step would read 2048 samples .* the training set has 1000"):
        BatchPlan(256, 1000, milestones=(2.0,), growth=8.0)
    with pytest.raises(ConfigError, match="recipe.batch_milestones"):
        load_config(None, ["recipe.batch_milestones=3,1"])
    with pytest.raises(ConfigError, match="does not combine with train.micro_batch"):
        load_config(None, ["parallel.emulate_workers=2", "train.micro_batch=16"])


BASE = ["data.name=synthetic", "data.n_train=1024", "data.n_test=256", "model.name=mlp", "model.width=32",
        "train.batch_size=64", "train.epochs=3", "train.log_every=4", "recipe.base_batch=64",
        "recipe.warmup_epochs=0", "train.progress=false", "train.dtype=float64"]


def _run(cache_dir, out, *extra):
    cfg = load_config(None, BASE + [f"data.cache_dir={cache_dir}", *extra])
    return Trainer(cfg, out).run()


def _params(out):
    return torch.load(sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)["model"]


@pytest.mark.parametrize("norm", ["none", "ghost"])
def test_accumulated_micro_batches_give_the_full_batch_gradient(cache_dir, tmp_path, norm):
    """Micro-batches of 16 (ghost BN of 16 too, so the statistics are the same groups) step exactly as one pass.

    The parameters agree; BN running averages do not (each pass updates them), so they are not compared."""
    extra = [f"model.norm={norm}", "model.ghost_batch=16"]
    one = _run(cache_dir, tmp_path / "one", *extra)
    acc = _run(cache_dir, tmp_path / "acc", *extra, "train.micro_batch=16")
    assert acc["steps"] == one["steps"] == 48
    a, b = _params(tmp_path / "one"), _params(tmp_path / "acc")
    params = [k for k in a if not k.rsplit(".", 1)[-1].startswith(("running_", "num_batches"))]
    assert len(params) >= 6
    for k in params:
        assert torch.allclose(a[k], b[k], rtol=1e-10, atol=1e-12), k
    if norm == "none":
        assert math.isclose(acc["final_test_loss"], one["final_test_loss"], rel_tol=1e-10)


def test_smith_schedule_reaches_the_end_with_fewer_updates(cache_dir, tmp_path):
    """Doubling the batch at epochs 1 and 2 replaces LR decay: 16 + 8 + 4 updates instead of 48."""
    s = _run(cache_dir, tmp_path / "smith", "recipe.batch_milestones=1,2", "recipe.batch_growth=2",
             "recipe.schedule=constant")
    assert s["steps"] == 28 and s["last_global_batch"] == 256 and s["global_batch"] == 64
    assert s["samples_seen"] == 16 * 64 + 8 * 128 + 4 * 256
    assert s["epochs"] == pytest.approx(3.0)
    lines = [json.loads(x) for x in (tmp_path / "smith" / "metrics.jsonl").read_text().splitlines()]
    batches = {r["step"]: r["batch"] for r in lines if r["kind"] == "train"}
    assert batches[4] == 64 and batches[20] == 128 and batches[28] == 256
    evals = [r["step"] for r in lines if r["kind"] == "eval"]
    assert evals == [16, 24, 28]  # one evaluation at the end of every epoch


def test_killed_during_a_batch_schedule_resumes_exactly(run_cli, tmp_path):
    args = ["--no-progress", *[a for kv in BASE for a in ("--set", kv)], "--set", "recipe.batch_milestones=1,2",
            "--set", "recipe.batch_growth=2", "--set", "train.checkpoint_every=5", "--set", "train.micro_batch=32"]
    ref = run_cli("train", "--out", tmp_path / "ref", *args, check=True)
    assert ref.returncode == 0
    dead = run_cli("train", "--out", tmp_path / "killed", *args, "--set", "faults.kill_rank=0",
                   "--set", "faults.kill_step=21")
    assert dead.returncode != 0 and "faults: killing rank 0 at step 21" in dead.stderr
    run_cli("train", "--out", tmp_path / "killed", "--resume", "--no-progress", check=True)
    a = json.loads((tmp_path / "ref" / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert b["params_sha256"] == a["params_sha256"] and b["steps"] == a["steps"] == 28
