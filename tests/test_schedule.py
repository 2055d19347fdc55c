"""LR scaling rules (Goyal; Hoffer) and schedules (gradual warm-up, step, cosine, poly), values by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scalelab.config import RecipeConfig
from scalelab.errors import ConfigError
from scalelab.recipe import SGD, LRSchedule, build_schedule, peak_lr


def recipe(**kw) -> RecipeConfig:
    kw.setdefault("base_lr", 0.1)
    kw.setdefault("base_batch", 256)
    return RecipeConfig(**kw)


@pytest.mark.parametrize("scaling,batch,expected", [
    ("none", 1024, 0.1),
    ("linear", 1024, 0.4),       # 0.1 * 1024 / 256
    ("linear", 128, 0.05),
    ("sqrt", 1024, 0.2),         # 0.1 * sqrt(4)
    ("sqrt", 64, 0.05),          # 0.1 * sqrt(1/4)
])
def test_scaling_rules(scaling, batch, expected):
    assert peak_lr(recipe(scaling=scaling), batch) == pytest.approx(expected, rel=1e-15)


def test_unknown_scaling_rule():
    cfg = recipe()
    cfg.scaling = "cubic"
    with pytest.raises(ConfigError, match="unknown recipe.scaling rule 'cubic'; known: linear, none, sqrt"):
        peak_lr(cfg, 256)


def test_goyal_gradual_warmup():
    # B = 1024: peak 0.4, k = 4; 2 epochs of 10 steps: lr_t = 0.1 + 0.3 t / 20
    sched = build_schedule(recipe(warmup_epochs=2, schedule="constant"), 1024, steps_per_epoch=10,
                           total_steps=100)
    assert sched.warmup_steps == 20 and sched.warmup_divisor == 4
    assert sched(0) == pytest.approx(0.1)
    assert sched(10) == pytest.approx(0.25)
    assert sched(19) == pytest.approx(0.385)
    assert sched(20) == pytest.approx(0.4)
    assert sched(99) == pytest.approx(0.4)


def test_warmup_divisor_and_small_batches():
    # explicit k = 2: start at 0.4 / 2
    sched = build_schedule(recipe(warmup_epochs=1, warmup_divisor=2, schedule="constant"), 1024, 10, 50)
    assert sched(0) == pytest.approx(0.2) and sched(5) == pytest.approx(0.3)
    # B < base_batch: Goyal's k = max(1, 0.5) = 1, so the "warm-up" is flat at the peak 0.05
    sched = build_schedule(recipe(warmup_epochs=1, schedule="constant"), 128, 10, 50)
    assert [sched(t) for t in (0, 5, 10)] == pytest.approx([0.05] * 3)
    # fractional warm-up epochs: round(0.3 * 10) = 3 steps
    assert build_schedule(recipe(warmup_epochs=0.3), 256, 10, 50).warmup_steps == 3


def test_step_schedule():
    # peak 1 (B = base), milestones at epochs 3 and 6 of 10 steps: x0.1 from step 30, x0.01 from step 60
    sched = build_schedule(recipe(base_lr=1.0, schedule="step", milestones=[3, 6], gamma=0.1), 256, 10, 100)
    values = [sched(t) for t in (0, 29, 30, 59, 60, 99, 150)]
    assert values == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.01])
    # with 1 epoch of warm-up (k = 2), the warm-up comes first; milestones still count from step 0
    sched = build_schedule(recipe(base_lr=1.0, schedule="step", milestones=[3], warmup_epochs=1,
                                  warmup_divisor=2), 256, 10, 100)
    assert [sched(t) for t in (0, 5, 10, 29, 30)] == pytest.approx([0.5, 0.75, 1.0, 1.0, 0.1])


def test_cosine_schedule():
    # peak 1, 10 warm-up steps, 100 decay steps, final 0.1: lr = 0.1 + 0.9 (1 + cos(pi p)) / 2
    sched = build_schedule(recipe(base_lr=1.0, schedule="cosine", warmup_epochs=1, warmup_divisor=10,
                                  final_lr_frac=0.1), 256, 10, 110)
    assert sched(0) == pytest.approx(0.1)
    assert sched(10) == pytest.approx(1.0)                                   # p = 0
    assert sched(35) == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2)   # p = 1/4
    assert sched(60) == pytest.approx(0.55)                                  # p = 1/2
    assert sched(110) == pytest.approx(0.1)                                  # p = 1
    assert sched(500) == pytest.approx(0.1)                                  # clamped


def test_poly_schedule():
    # You et al.: peak (1 - p)^2, peak 2, no warm-up, 100 steps
    sched = build_schedule(recipe(base_lr=2.0, schedule="poly", poly_power=2.0, warmup_epochs=0), 256, 10, 100)
    assert [sched(t) for t in (0, 50, 90, 100)] == pytest.approx([2.0, 0.5, 0.02, 0.0])
    # power 1 with a floor: final + (peak - final) (1 - p), final = 0.5 * 2
    cfg = recipe(base_lr=2.0, schedule="poly", poly_power=1.0, final_lr_frac=0.5, warmup_epochs=0)
    sched = build_schedule(cfg, 256, 10, 100)
    assert sched(50) == pytest.approx(1.5)


def test_constant_without_warmup_and_invalid_input():
    sched = LRSchedule(peak=0.3, total_steps=10)
    assert sched(0) == sched(9) == 0.3
    with pytest.raises(ValueError):
        sched(-1)
    with pytest.raises(ConfigError, match="unknown recipe.schedule 'linear'"):
        LRSchedule(peak=0.3, total_steps=10, decay="linear")


@pytest.mark.parametrize("initial_lr", [None, 1.0])
def test_lambda_lr_matches_the_schedule(initial_lr):
    sched = build_schedule(recipe(warmup_epochs=1, schedule="cosine", final_lr_frac=0.01), 1024, 5, 30)
    model = nn.Linear(2, 1)
    lr = sched.peak if initial_lr is None else initial_lr
    opt = SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": lr / 2}], lr=lr)
    lambda_lr = sched.as_lambda_lr(opt)
    for t in range(30):
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([sched(t)] * 2, rel=1e-12)
        opt.step()
        lambda_lr.step()


def test_repr_is_readable():
    cfg = recipe(warmup_epochs=1, schedule="step", milestones=[3.0, 6.0])
    text = repr(build_schedule(cfg, 1024, 10, 100))
    assert text == ("LRSchedule(peak=0.4, warmup 10 steps from 0.1 (k=4), step x0.1 at epochs [3, 6] "
                    "(steps [30, 60]), total 100 steps)")
    assert "cosine to 0 over 90 steps" in repr(build_schedule(recipe(warmup_epochs=1), 256, 10, 100))
    assert "poly power 2" in repr(build_schedule(recipe(schedule="poly"), 256, 10, 100))


def test_schedule_drives_an_optimizer_the_trainer_way():
    # B = 512: warm up from 0.1 to 0.2 over 2 steps
    sched = build_schedule(recipe(warmup_epochs=1, schedule="constant"), 512, 2, 10)
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SGD([w], lr=sched.peak, momentum=0.0)
    for step in range(3):
        for g in opt.param_groups:
            g["lr"] = sched(step)
        w.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
    assert w.item() == pytest.approx(-(0.1 + 0.15 + 0.2))
