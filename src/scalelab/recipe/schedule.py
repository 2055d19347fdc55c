"""Learning-rate scaling rules and schedules: gradual warm-up, then constant, step, cosine or poly decay."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from scalelab.config import RecipeConfig
from scalelab.errors import ConfigError, unknown_name

# LR multiplier as a function of B / base_batch.
SCALING_RULES = {
    "none": lambda ratio: 1.0,
    "linear": lambda ratio: ratio,           # Goyal et al. 2017, arXiv 1706.02677
    "sqrt": math.sqrt,                       # Hoffer et al. 2017, arXiv 1705.08741; Krizhevsky 2014
}

DECAYS = ("constant", "step", "cosine", "poly")


def peak_lr(cfg: RecipeConfig, global_batch: int) -> float:
    """The LR after warm-up: ``cfg.base_lr`` scaled from ``cfg.base_batch`` to ``global_batch``.

    ``none``: ``base_lr``; ``linear``: ``base_lr * B / base_batch`` (Goyal et al., arXiv 1706.02677);
    ``sqrt``: ``base_lr * sqrt(B / base_batch)`` (Hoffer, Hubara, Soudry, arXiv 1705.08741; Krizhevsky 2014,
    arXiv 1404.5997).

    Example:
        >>> from scalelab.config import RecipeConfig
        >>> peak_lr(RecipeConfig(base_lr=0.1, base_batch=256, scaling="linear"), 1024)
        0.4
    """
    if cfg.scaling not in SCALING_RULES:
        raise ConfigError(unknown_name("recipe.scaling rule", cfg.scaling, SCALING_RULES))
    return cfg.base_lr * SCALING_RULES[cfg.scaling](global_batch / cfg.base_batch)


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate as a pure function of the 0-based global step: gradual warm-up, then a decay.

    Warm-up (Goyal et al., arXiv 1706.02677), for ``t < warmup_steps``: linear from ``peak / k`` at ``t = 0``
    towards ``peak`` at ``t = warmup_steps``: ``lr_t = peak / k + (peak - peak / k) * t / warmup_steps``.

    Then, with ``p = (t - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1] and
    ``final = final_lr_frac * peak``:

    - ``constant``: ``peak``;
    - ``step``: ``peak * gamma ** n``, ``n`` the milestones passed; milestones are epochs counted from step 0,
      so milestone ``e`` takes effect at step ``round(e * steps_per_epoch)``;
    - ``cosine``: ``final + (peak - final) * (1 + cos(pi p)) / 2`` (Loshchilov & Hutter, arXiv 1608.03983);
    - ``poly``: ``final + (peak - final) * (1 - p) ** poly_power`` (You et al., arXiv 1708.03888, power 2).

    ``final`` is reached at ``t = total_steps``, one step after the last update of a run of ``total_steps``.

    Args:
        peak: the LR after warm-up (see :func:`peak_lr`).
        total_steps: steps of the whole run, warm-up included.
        warmup_steps: length of the warm-up; 0 for none.
        warmup_divisor: ``k``, warm up from ``peak / k`` (>= 1 in Goyal's recipe, ``k = B / base_batch``).
        decay: ``constant``, ``step``, ``cosine`` or ``poly``.
        steps_per_epoch: to place the ``step`` milestones.
        milestones: epochs of the ``step`` decay.
        gamma: factor of the ``step`` decay.
        poly_power: power of the ``poly`` decay.
        final_lr_frac: end LR of ``cosine`` and ``poly`` as a fraction of ``peak``.

    Example:
        >>> sched = LRSchedule(peak=0.4, total_steps=100, warmup_steps=10, warmup_divisor=4, decay="cosine")
        >>> sched(0), sched(5), sched(10), sched(100)
        (0.1, 0.25, 0.4, 0.0)
    """

    peak: float
    total_steps: int
    warmup_steps: int = 0
    warmup_divisor: float = 1.0
    decay: str = "constant"
    steps_per_epoch: int = 1
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    poly_power: float = 2.0
    final_lr_frac: float = 0.0
    _milestone_steps: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ConfigError(unknown_name("recipe.schedule", self.decay, DECAYS))
        bad = min(self.warmup_steps, self.total_steps) < 0 or self.warmup_divisor <= 0
        if bad or self.steps_per_epoch < 1:
            raise ValueError(f"invalid schedule: warmup_steps={self.warmup_steps}, "
                             f"total_steps={self.total_steps}, warmup_divisor={self.warmup_divisor}, "
                             f"steps_per_epoch={self.steps_per_epoch}")
        object.__setattr__(self, "milestones", tuple(self.milestones))
        object.__setattr__(self, "_milestone_steps",
                           tuple(round(m * self.steps_per_epoch) for m in self.milestones))

    def __call__(self, step: int) -> float:
        """The LR to use for the update at global step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            start = self.peak / self.warmup_divisor
            return start + (self.peak - start) * step / self.warmup_steps
        if self.decay == "constant":
            return self.peak
        if self.decay == "step":
            return self.peak * self.gamma ** sum(step >= s for s in self._milestone_steps)
        p = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        final = self.final_lr_frac * self.peak
        if self.decay == "cosine":
            return final + (self.peak - final) * (1.0 + math.cos(math.pi * p)) / 2.0
        return final + (self.peak - final) * (1.0 - p) ** self.poly_power

    def as_lambda_lr(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A ``LambdaLR`` that sets every group's LR to ``self(step)``; call its ``step()`` after each update.

        LambdaLR multiplies each group's initial LR by a factor, so the factor is ``self(step) / initial_lr``
        (the values agree with ``self(step)`` up to rounding). Groups with an initial LR of 0 stay at 0.
        """
        def factor(base: float):
            return lambda step: self(step) / base if base else 0.0
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, [factor(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups])

    def __repr__(self) -> str:
        parts = [f"peak={self.peak:g}"]
        if self.warmup_steps:
            parts.append(f"warmup {self.warmup_steps} steps from {self.peak / self.warmup_divisor:g} "
                         f"(k={self.warmup_divisor:g})")
        decay_steps = max(0, self.total_steps - self.warmup_steps)
        if self.decay == "step":
            epochs = ", ".join(f"{m:g}" for m in self.milestones)
            parts.append(f"step x{self.gamma:g} at epochs [{epochs}] "
                         f"(steps {list(self._milestone_steps)})")
        elif self.decay in ("cosine", "poly"):
            power = f" power {self.poly_power:g}" if self.decay == "poly" else ""
            final = self.final_lr_frac * self.peak
            parts.append(f"{self.decay}{power} to {final:g} over {decay_steps} steps")
        else:
            parts.append("constant")
        parts.append(f"total {self.total_steps} steps")
        return f"LRSchedule({', '.join(parts)})"


def build_schedule(cfg: RecipeConfig, global_batch: int, steps_per_epoch: int,
                   total_steps: int) -> LRSchedule:
    """The :class:`LRSchedule` of a recipe at a global batch size.

    ``peak = peak_lr(cfg, global_batch)``, ``warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)``, and
    ``k = cfg.warmup_divisor``, or Goyal's ``max(1, global_batch / cfg.base_batch)`` when it is 0.

    Example:
        >>> from scalelab.config import RecipeConfig
        >>> cfg = RecipeConfig(base_lr=0.1, warmup_epochs=1, schedule="constant")
        >>> build_schedule(cfg, global_batch=1024, steps_per_epoch=10, total_steps=100)
        LRSchedule(peak=0.4, warmup 10 steps from 0.1 (k=4), constant, total 100 steps)
    """
    k = cfg.warmup_divisor or max(1.0, global_batch / cfg.base_batch)
    return LRSchedule(peak=peak_lr(cfg, global_batch), total_steps=total_steps,
                      warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), warmup_divisor=k,
                      decay=cfg.schedule, steps_per_epoch=steps_per_epoch, milestones=tuple(cfg.milestones),
                      gamma=cfg.gamma, poly_power=cfg.poly_power, final_lr_frac=cfg.final_lr_frac)
