"""Statistical efficiency: how many optimizer steps a run needs at global batch B.

* Given epochs E over N samples: ``steps = E * N / B`` (the records' recipes; perfect scaling by
  construction).
* Measured: a table of (batch, steps-to-target) pairs, e.g. from a batch-size sweep (Shallue et al. 2018,
  arXiv 1811.03600), interpolated linearly in log-log space; below the smallest batch it scales perfectly
  (steps x 2 when the batch halves), above the largest it stays at the last measured steps (the table shows no
  further gain). ``read_steps_table`` reads a CSV with ``batch`` and ``steps`` columns, or the
  ``steps_<optimizer>.csv`` of a ``scalelab sweep`` output directory.
* McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv 1812.06162), eq. 2.11:
  ``S = S_min (1 + B_noise / B)`` and ``E = E_min (1 + B / B_noise)`` samples, with the gradient noise scale
  B_noise (about B_simple = tr(Sigma)/|G|^2). Below B_noise, doubling B halves the steps (perfect scaling);
  above it the steps approach S_min and more devices stop helping (Shallue et al. 2018 see the same three
  regimes).
"""

from __future__ import annotations

import bisect
import csv
import math
from dataclasses import dataclass
from pathlib import Path

from scalelab.errors import ConfigError, DataError


@dataclass(frozen=True)
class Steps:
    """Steps needed at a batch: ``epochs`` given, McCandlish (``noise_scale``, ``min_steps``) or a table."""

    epochs: float | None = None
    noise_scale: float | None = None
    min_steps: float | None = None
    table: tuple[tuple[float, float], ...] | None = None   # sorted (batch, steps)

    def __post_init__(self) -> None:
        if self.table is not None:
            return
        if self.epochs is None and (self.noise_scale is None or self.min_steps is None):
            raise ConfigError("give --epochs, or both --noise-scale and --min-steps (McCandlish model)")
        for name in ("epochs", "noise_scale", "min_steps"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {v}")

    def steps(self, batch: float, dataset_size: int) -> float:
        if batch <= 0:
            raise ConfigError(f"batch must be > 0, got {batch}")
        if self.table is not None:
            return table_steps(batch, self.table)
        if self.epochs is not None:
            return self.epochs * dataset_size / batch
        return mccandlish_steps(batch, self.noise_scale, self.min_steps)

    def describe(self) -> str:
        if self.table is not None:
            lo, hi = self.table[0][0], self.table[-1][0]
            return f"measured steps at {len(self.table)} batch sizes ({lo:g}..{hi:g})"
        if self.epochs is not None:
            return f"{self.epochs:g} epochs given"
        return f"McCandlish S = {self.min_steps:g} (1 + {self.noise_scale:g}/B)"


def mccandlish_steps(batch: float, noise_scale: float, min_steps: float) -> float:
    """S = S_min (1 + B_noise / B) (McCandlish et al. 2018, eq. 2.11)."""
    return min_steps * (1 + noise_scale / batch)


def mccandlish_samples(batch: float, noise_scale: float, min_samples: float) -> float:
    """E = E_min (1 + B / B_noise) (McCandlish et al. 2018, eq. 2.11)."""
    return min_samples * (1 + batch / noise_scale)


def table_steps(batch: float, table: tuple[tuple[float, float], ...]) -> float:
    """Steps at ``batch`` from sorted (batch, steps) pairs: log-log interpolation, perfect scaling below the
    table, no further gain above it."""
    batches = [b for b, _ in table]
    if batch <= batches[0]:
        return table[0][1] * batches[0] / batch
    if batch >= batches[-1]:
        return table[-1][1]
    i = bisect.bisect_right(batches, batch)
    (b0, s0), (b1, s1) = table[i - 1], table[i]
    w = (math.log(batch) - math.log(b0)) / (math.log(b1) - math.log(b0))
    return math.exp(math.log(s0) + w * (math.log(s1) - math.log(s0)))


def read_steps_table(path: str | Path) -> Steps:
    """A CSV with columns ``batch`` and ``steps`` (steps to the target at that global batch), or a ``scalelab
    sweep`` directory: its ``steps_<optimizer>.csv`` if it swept one optimizer; with several, the error names
    the files to choose from."""
    path = Path(path)
    if path.is_dir():
        path = _sweep_steps_file(path)
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
    except FileNotFoundError:
        raise DataError(f"steps table {path} not found") from None
    pairs = {}
    for lineno, row in enumerate(rows, start=2):
        try:
            b, s = float(row["batch"]), float(row["steps"])
        except KeyError:
            raise DataError(f"{path}: needs columns batch,steps") from None
        except (TypeError, ValueError):
            raise DataError(f"{path}:{lineno}: batch and steps must be numbers, got {row}") from None
        if b <= 0 or s <= 0:
            raise DataError(f"{path}:{lineno}: batch and steps must be > 0")
        pairs[b] = s
    if not pairs:
        raise DataError(f"{path}: no rows (a sweep writes only the batches that reached the target)")
    return Steps(table=tuple(sorted(pairs.items())))


def _sweep_steps_file(run: Path) -> Path:
    files = sorted(run.glob("steps_*.csv"))
    if not files:
        raise DataError(f"{run} is a directory without steps_<optimizer>.csv: give a scalelab sweep output "
                        "directory or a CSV with columns batch,steps")
    if len(files) > 1:
        names = ", ".join(str(f) for f in files)
        raise DataError(f"{run} has steps for {len(files)} optimizers: give one of {names}")
    return files[0]
