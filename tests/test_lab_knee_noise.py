"""The knee of steps-to-target curves and the gradient-noise-scale estimators (McCandlish et al. 2018)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scalelab.lab.knee import find_knee, fit_mccandlish, predicted_knee
from scalelab.lab.noise import NoiseMonitor, estimate, shard_norms

BATCHES = [2 ** k for k in range(5, 15)]  # 32 .. 16384


def mccandlish(b_noise: float, s_min: float = 100.0):
    return [s_min * (1 + b_noise / b) for b in BATCHES]


@pytest.mark.parametrize("b_noise", [200.0, 1000.0, 5000.0, 40000.0])
def test_knee_on_mccandlish_curves_matches_the_closed_form(b_noise):
    k = find_knee(BATCHES, mccandlish(b_noise))
    limit = predicted_knee(b_noise, BATCHES[0])
    # the knee is the largest grid batch at or below the closed-form crossing of 1.25x perfect scaling
    assert k.batch == max(b for b in BATCHES if b <= limit)
    assert k.first_off == (min(b for b in BATCHES if b > limit) if limit < BATCHES[-1] else None)
    assert k.ratios[BATCHES[0]] == 1.0
    assert all(k.ratios[b] <= 1.25 for b in BATCHES if b <= k.batch)


def test_knee_perfect_then_flat_and_missing_points():
    steps = [6400 / b * 32 for b in BATCHES[:5]] + [400] * 5   # perfect to 512, then no further gain
    assert find_knee(BATCHES, steps).batch == 512
    # a batch that missed the target ends perfect scaling there, even if larger ones reach it again
    holed = list(steps)
    holed[3] = None
    k = find_knee(BATCHES, holed)
    assert k.batch == 128 and k.first_off == 256 and math.isinf(k.ratios[256])
    # the reference is the smallest batch that reached the target
    k = find_knee(BATCHES, [None] + steps[1:])
    assert k.ref_batch == 64 and k.batch == 512
    assert find_knee(BATCHES, [None] * len(BATCHES)).batch is None
    # a tighter tolerance moves the knee down on a smooth curve
    assert find_knee(BATCHES, mccandlish(5000), tol=1.05).batch < find_knee(BATCHES, mccandlish(5000)).batch


def test_mccandlish_fit_recovers_noise_scale():
    for b_noise in (300.0, 3000.0):
        fit = fit_mccandlish(BATCHES, mccandlish(b_noise, 50.0))
        assert fit is not None
        assert fit[0] == pytest.approx(b_noise, rel=1e-3) and fit[1] == pytest.approx(50.0, rel=1e-3)
    gen = torch.Generator().manual_seed(0)
    noisy = [s * math.exp(0.05 * torch.randn((), generator=gen).item()) for s in mccandlish(2000.0)]
    assert fit_mccandlish(BATCHES, noisy)[0] == pytest.approx(2000.0, rel=0.25)


def test_noise_estimators_are_unbiased_on_a_known_gradient_distribution():
    """Per-example gradients z ~ N(mu, Sigma) with known |mu|^2 and tr(Sigma): averaged over many steps the
    two-batch estimates match them, while the naive |G_B|^2 overestimates |G|^2 by tr(Sigma)/B."""
    gen = torch.Generator().manual_seed(1)
    d, k, b = 20, 8, 4
    mu = torch.randn(d, generator=gen, dtype=torch.float64) * 0.3
    scales = torch.rand(d, generator=gen, dtype=torch.float64) * 2 + 0.5        # Sigma = diag(scales^2) @ rotation
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    true_g2, true_trace = float(mu @ mu), float((scales ** 2).sum())
    reps = 8000
    z = mu + (torch.randn(reps, k, b, d, generator=gen, dtype=torch.float64) * scales) @ q.T
    shard_grads = z.mean(2)                                   # (reps, k, d): each shard's mean gradient
    small = (shard_grads ** 2).sum(-1).mean(-1)
    big = (shard_grads.mean(1) ** 2).sum(-1)
    s0, b0 = shard_norms(shard_grads[0])
    assert s0.item() == pytest.approx(small[0].item()) and b0.item() == pytest.approx(big[0].item())
    g2, trace = estimate(small, big, b, k * b)
    se_g2, se_tr = g2.std().item() / reps ** 0.5, trace.std().item() / reps ** 0.5
    assert abs(g2.mean().item() - true_g2) < 4 * se_g2
    assert abs(trace.mean().item() - true_trace) < 4 * se_tr
    naive_bias = true_trace / (k * b)                          # what ignoring the noise would add to |G|^2
    assert big.mean().item() - true_g2 == pytest.approx(naive_bias, rel=0.1)
    assert naive_bias > 20 * se_g2                             # the test could tell a biased estimator apart
    with pytest.raises(ValueError):
        estimate(1.0, 1.0, 8, 8)


def test_monitor_restores_bn_statistics_and_gives_finite_estimates():
    from scalelab.config import ModelConfig
    from scalelab.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", width=32, depth=2), (16,), 4)
    x, y = torch.randn(512, 16), torch.randint(0, 4, (512,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mon = NoiseMonitor(batch=128, shards=8)
    rec = mon.measure(model, x, y)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert rec["b_small"] == 16 and rec["b_big"] == 128
    assert rec["g_small_sq"] > rec["g_big_sq"] > 0 and math.isfinite(rec["b_simple"])


def test_trainer_logs_noise_curve_and_cli_reports_it(tmp_path):
    from scalelab.cli import main

    out = tmp_path / "noise"
    rc = main(["noise", "--set", "data.name=synthetic", "--set", "data.n_train=2048", "--set", "model.name=mlp",
               "--set", "train.batch_size=128", "--set", "train.epochs=2", "--set", "train.progress=false",
               "--set", "train.threads=1", "--every", "4", "--shards", "4", "--out", str(out)])
    assert rc == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    noise = [r for r in recs if r["kind"] == "noise"]
    assert [r["step"] for r in noise] == list(range(4, 33, 4))
    result = json.loads((out / "noise.json").read_text())
    assert result["measurements"] == 8 and result["batch"] == 128 and result["shards_batch"] == 32
    assert result["method"] == "shards"  # one process: the auto method measures on shards
    assert result["predicted_critical_batch"] > 0 and (out / "noise.png").stat().st_size > 0
    assert main(["noise", str(tmp_path)]) == 2  # a directory without noise records: one-line error
    assert main(["report", str(out)]) == 0  # the run's report draws the noise curve too
    assert (out / "plots" / "noise.png").stat().st_size > 0


def test_knee_from_a_common_reference():
    # an optimizer that is slow at the smallest batch gets a late knee from its own start, not from the common one
    slow = [4000, 2000, 1000, 500, 250, 240]
    assert find_knee(BATCHES[:6], slow).batch == BATCHES[4]
    k = find_knee(BATCHES[:6], slow, ref=(BATCHES[0], 1000))
    assert k.batch is None and k.first_off == BATCHES[0] and k.ratios[BATCHES[0]] == 4
    fast = [1000, 500, 260, 200, 150, 140]
    k = find_knee(BATCHES[:6], fast, ref=(BATCHES[0], 1000))
    assert k.batch == BATCHES[2] and k.first_off == BATCHES[3]


def test_noise_method_takes_the_free_estimator_where_it_can_and_refuses_it_where_it_cannot():
    from scalelab.errors import ConfigError
    from scalelab.lab.noise import noise_method

    assert noise_method("auto", 1) == "shards" and noise_method("auto", 4) == "workers"
    assert noise_method("auto", 4, compress="dgc") == "shards"
    assert noise_method("auto", 4, backup_workers=1) == "shards"
    assert noise_method("shards", 4) == "shards" and noise_method("workers", 2) == "workers"
    for world, kw, why in ((1, {}, "one worker"), (4, {"compress": "topk"}, "compress.method=topk"),
                           (4, {"backup_workers": 1}, "backup workers")):
        with pytest.raises(ConfigError, match=f"noise_method=workers: {why}.*allowed here: shards, auto"):
            noise_method("workers", world, **kw)


NOISE_DP = ["data.name=synthetic", "data.n_train=1024", "data.n_test=256", "model.name=mlp", "model.width=32",
            "model.norm=none", "train.dtype=float64", "train.batch_size=64", "train.max_steps=3",
            "train.eval_every=3", "train.threads=1", "train.progress=false", "recipe.warmup_epochs=0"]


def _first_step_norms(cache_dir, monkeypatch, world):
    """Single-process reference for the first step of a ``world``-worker run of NOISE_DP: each worker's
    gradient over its share of the first batch, at the initial parameters:
    ``(mean_r |g_r|^2, |mean_r g_r|^2)``."""
    from scalelab.config import load_config
    from scalelab.data import epoch_order, load_dataset
    from scalelab.models import build_model

    monkeypatch.setenv("SCALELAB_CACHE", str(cache_dir))
    cfg = load_config(None, NOISE_DP)
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(torch.float64)
    idx = epoch_order(len(data.x_train), cfg.train.seed, 0)[:cfg.train.batch_size]
    x, y = data.x_train[idx].to(torch.float64), data.y_train[idx]
    grads = []
    for xs, ys in zip(x.chunk(world), y.chunk(world)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xs), ys).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    g = torch.stack(grads)
    return (g * g).sum(1).mean().item(), (g.mean(0) ** 2).sum().item()


@pytest.mark.parametrize("world", [2, 4])
def test_noise_scale_from_the_workers_gradients_in_real_gloo_processes(tmp_path, cache_dir, monkeypatch,
                                                                       run_cli, world):
    """``train.noise_method=workers`` (the default with several workers) reads |G_b|^2 and |G_B|^2 from the
    training step itself: each worker's gradient before DDP's all-reduce, averaged over workers, and the
    all-reduced one. At the first step both equal the single-process reference of the same shares; every step
    is measured, with b = the worker's share and B = the global batch. World size 2 through ``scalelab noise
    --nproc``, 4 through ``scalelab train --nproc`` (world size 1 falls back to shards: the test above)."""
    out = tmp_path / "run"
    sets = [a for o in NOISE_DP for a in ("--set", o)]
    if world == 2:
        proc = run_cli("noise", "--nproc", "2", "--every", "1", "--out", out, *sets)
        assert "each worker's share of b=32" in proc.stdout, proc.stdout + proc.stderr
    else:
        proc = run_cli("train", "--nproc", "4", "--out", out, *sets, "--set", "train.noise_every=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    noise = [r for r in recs if r["kind"] == "noise"]
    assert [r["step"] for r in noise] == [1, 2, 3]
    assert all(r["method"] == "workers" and r["b_small"] == 64 // world and r["b_big"] == 64 for r in noise)
    small_sq, big_sq = _first_step_norms(cache_dir, monkeypatch, world)
    assert noise[0]["g_small_sq"] == pytest.approx(small_sq, rel=1e-9)
    assert noise[0]["g_big_sq"] == pytest.approx(big_sq, rel=1e-9)
    assert small_sq > 1.05 * big_sq  # the two batch sizes really differ: a wrong pairing would fail
    g2, trace = estimate(small_sq, big_sq, 64 // world, 64)
    assert noise[0]["g2"] == pytest.approx(g2, rel=1e-6)
    assert noise[0]["trace"] == pytest.approx(trace, rel=1e-6)
