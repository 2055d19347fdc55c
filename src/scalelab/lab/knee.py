"""Where steps-to-target stops halving when the batch doubles: the knee of a batch-size sweep.

Shallue et al. 2018 ("Measuring the Effects of Data Parallelism on Neural Network Training", arXiv 1811.03600)
find three regimes in the steps needed to reach a goal as the batch grows: perfect scaling (doubling B halves the
steps), diminishing returns, and maximal data parallelism (more B buys nothing). McCandlish et al. 2018 ("An
Empirical Model of Large-Batch Training", arXiv 1812.06162, eq. 2.11) model the curve as
``S = S_min (1 + B_noise / B)``.

The knee, as defined here:

    Take the smallest batch b0 that reached the target, with S0 steps. Perfect scaling predicts
    ``S_perfect(B) = S0 * b0 / B``. The knee is the largest batch B_k such that every measured batch
    b0 <= B <= B_k reached the target with ``S(B) <= tol * S_perfect(B)`` (tol = 1.25 by default).
    A batch that did not reach the target counts as off perfect scaling.

Under McCandlish's model the ratio ``S(B) / S_perfect(B)`` is ``(B + B_noise) / (b0 + B_noise)``, so the knee
with tolerance ``tol`` sits at ``B = tol * b0 + (tol - 1) * B_noise`` (``B_noise / 4 + 1.25 b0`` for 1.25):
:func:`predicted_knee` turns a measured noise scale into that prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Knee:
    """The result of :func:`find_knee`.

    Attributes:
        batch: the knee B_k (None when no batch reached the target).
        ref_batch: b0, the smallest batch that reached the target.
        ref_steps: S0, its steps.
        tol: the tolerance used.
        ratios: per batch, measured steps / perfect-scaling steps (``inf`` for a batch that missed the target).
        first_off: the smallest batch above b0 that is off perfect scaling (None if none is).
    """

    batch: float | None
    ref_batch: float | None
    ref_steps: float | None
    tol: float
    ratios: dict[float, float] = field(default_factory=dict)
    first_off: float | None = None

    def to_dict(self) -> dict:
        return {"batch": self.batch, "ref_batch": self.ref_batch, "ref_steps": self.ref_steps, "tol": self.tol,
                "first_off": self.first_off,
                "ratios": {str(int(b) if float(b).is_integer() else b): (r if math.isfinite(r) else None)
                           for b, r in self.ratios.items()}}


def find_knee(batches: Sequence[float], steps: Sequence[float | None], tol: float = 1.25,
              ref: tuple[float, float] | None = None) -> Knee:
    """The knee of a steps-to-target curve (see the module docstring for the definition).

    Args:
        batches: batch sizes (any order).
        steps: steps to the target at each batch; None (or inf/nan) where the target was not reached.
        tol: how far above the perfect-scaling line a point may lie and still count as perfect scaling.
        ref: ``(b0, S0)`` to measure perfect scaling from instead of the curve's own smallest batch, e.g. the
            fastest of several optimizers at the smallest batch (a common reference: an optimizer that is slow
            at small batches does not get a high knee from its own slow start). The knee is then None when the
            curve is off the line already at b0.

    Example:
        >>> k = find_knee([32, 64, 128, 256, 512], [1000, 500, 260, 170, 150])
        >>> k.batch, k.first_off
        (128, 256)
    """
    if tol < 1:
        raise ValueError(f"tol must be >= 1, got {tol}")
    if len(batches) != len(steps):
        raise ValueError("batches and steps differ in length")
    pts = sorted(zip(batches, steps), key=lambda p: p[0])
    ok = [(b, s) for b, s in pts if s is not None and math.isfinite(s) and s > 0]
    if not ok and ref is None:
        return Knee(None, None, None, tol)
    b0, s0 = ref if ref is not None else ok[0]
    knee, first_off, on = (None if ref is not None else b0), None, True
    ratios: dict[float, float] = {}
    for b, s in pts:
        if b < b0:
            continue
        r = s / (s0 * b0 / b) if s is not None and math.isfinite(s) and s > 0 else math.inf
        ratios[b] = r
        if on and r <= tol:
            knee = b
        elif on:
            on, first_off = False, b
    return Knee(knee, b0, s0, tol, ratios, first_off)


def predicted_knee(noise_scale: float, ref_batch: float, tol: float = 1.25) -> float:
    """The knee McCandlish's model predicts from a noise scale: ``tol * b0 + (tol - 1) * B_noise``.

    From ``S = S_min (1 + B_noise / B)``: ``S(B) / S_perfect(B) = (B + B_noise) / (b0 + B_noise)``; setting it
    to ``tol`` gives the batch. (McCandlish et al. 2018, arXiv 1812.06162, eq. 2.11.)

    Example:
        >>> predicted_knee(1000.0, 32)
        290.0
    """
    return tol * ref_batch + (tol - 1) * noise_scale


def fit_mccandlish(batches: Sequence[float], steps: Sequence[float | None]) -> tuple[float, float] | None:
    """Least-squares fit of ``S = S_min (1 + B_noise / B)`` in log space; returns (B_noise, S_min).

    ``B_noise`` fitted this way is the measured critical batch (McCandlish et al. 2018, eq. 2.11: at
    ``B = B_noise`` a run takes twice the minimum steps and twice the minimum examples). Needs at least two
    batches that reached the target; returns None otherwise.
    """
    import numpy as np

    pts = [(float(b), float(s)) for b, s in zip(batches, steps) if s is not None and math.isfinite(s) and s > 0]
    if len(pts) < 2:
        return None
    b = np.array([p[0] for p in pts])
    log_s = np.log(np.array([p[1] for p in pts]))

    # For a fixed B_noise the best log S_min is the mean residual; scan log B_noise on a fine grid, then refine.
    def losses(log_bn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # one row per candidate log B_noise
        resid = log_s - np.log1p(np.exp(log_bn)[:, None] / b)
        log_smin = resid.mean(1)
        return ((resid - log_smin[:, None]) ** 2).sum(1), log_smin

    grid = np.linspace(math.log(b.min() / 100), math.log(b.max() * 100), 801)
    best = grid[int(np.argmin(losses(grid)[0]))]
    step = grid[1] - grid[0]
    for _ in range(40):  # halving refinement around the best grid point
        cands = np.array([best - step, best, best + step])
        best = cands[int(np.argmin(losses(cands)[0]))]
        step /= 2
    return float(math.exp(best)), float(math.exp(losses(np.array([best]))[1][0]))
