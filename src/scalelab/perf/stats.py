"""Statistical efficiency: how many optimizer steps a run needs at global batch B.

* Given epochs E over N samples: ``steps = E * N / B`` (the records' recipes; perfect scaling by construction).
* McCandlish et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv 1812.06162), eq. 2.11:
  ``S = S_min (1 + B_noise / B)`` and ``E = E_min (1 + B / B_noise)`` samples, with the gradient noise scale
  B_noise (about B_simple = tr(Sigma)/|G|^2). Below B_noise, doubling B halves the steps (perfect scaling); above
  it the steps approach S_min and more devices stop helping (Shallue et al. 2018 see the same three regimes).
"""

from __future__ import annotations

from dataclasses import dataclass

from scalelab.errors import ConfigError


@dataclass(frozen=True)
class Steps:
    """Steps needed at a batch: ``epochs`` given, or the McCandlish model with ``noise_scale``, ``min_steps``."""

    epochs: float | None = None
    noise_scale: float | None = None
    min_steps: float | None = None

    def __post_init__(self) -> None:
        if self.epochs is None and (self.noise_scale is None or self.min_steps is None):
            raise ConfigError("give --epochs, or both --noise-scale and --min-steps (McCandlish model)")
        for name in ("epochs", "noise_scale", "min_steps"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {v}")

    def steps(self, batch: float, dataset_size: int) -> float:
        if batch <= 0:
            raise ConfigError(f"batch must be > 0, got {batch}")
        if self.epochs is not None:
            return self.epochs * dataset_size / batch
        return mccandlish_steps(batch, self.noise_scale, self.min_steps)

    def describe(self) -> str:
        if self.epochs is not None:
            return f"{self.epochs:g} epochs given"
        return f"McCandlish S = {self.min_steps:g} (1 + {self.noise_scale:g}/B)"


def mccandlish_steps(batch: float, noise_scale: float, min_steps: float) -> float:
    """S = S_min (1 + B_noise / B) (McCandlish et al. 2018, eq. 2.11)."""
    return min_steps * (1 + noise_scale / batch)


def mccandlish_samples(batch: float, noise_scale: float, min_samples: float) -> float:
    """E = E_min (1 + B / B_noise) (McCandlish et al. 2018, eq. 2.11)."""
    return min_samples * (1 + batch / noise_scale)
