"""Device sweeps: predicted time-to-train against devices, where it stops falling, and a plot."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from scalelab.errors import ConfigError
from scalelab.perf.catalog import Catalog
from scalelab.perf.project import Projection, Setup, project


def parse_devices(spec: str) -> list[int]:
    """``64`` -> [64]; ``1..4096`` -> powers of two from 1 to 4096 (ends included); ``8,16,24`` -> those."""
    spec = spec.strip()
    try:
        if ".." in spec:
            lo, hi = (int(v) for v in spec.split(".."))
            if lo < 1 or hi < lo:
                raise ValueError
            out, n = [], lo
            while n < hi:
                out.append(n)
                n *= 2
            return out + [hi]
        values = [int(v) for v in spec.split(",")]
        if min(values) < 1:
            raise ValueError
        return values
    except ValueError:
        raise ConfigError(f"bad --devices {spec!r}; expected N, LO..HI (powers of two) or N,M,...") from None


def sweep(base: Setup, devices: list[int], per_device_batch: int, catalog: Catalog | None = None,
          max_batch: int | None = None) -> list[Projection]:
    """Project ``base`` at each device count with global batch = per_device_batch x devices (weak scaling),
    capped at ``max_batch`` (beyond it, more devices share a fixed batch)."""
    out = []
    for n in devices:
        batch = per_device_batch * n if not max_batch else min(per_device_batch * n, max_batch)
        per_node = min(base.per_node, n) if base.per_node else None
        out.append(project(replace(base, devices=n, batch=max(batch, 1), per_node=per_node), catalog))
    return out


def fastest(projections: list[Projection]) -> Projection:
    """The projection with the shortest total (where adding devices stops paying)."""
    return min(projections, key=lambda p: p.total_s)


def plot(series: dict[str, list[Projection]], path: str | Path, title: str,
         hline: float | None = None) -> Path:
    """Predicted time-to-train against devices, one line per label, log-log, saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ps in series.items():
        ax.plot([p.setup["devices"] for p in ps], [p.total_s for p in ps], marker="o", ms=3, label=label)
    if hline:
        ax.axhline(hline, color="grey", ls="--", lw=1)
        first = min(p.setup["devices"] for ps in series.values() for p in ps)
        ax.text(first, hline * 1.08, f"{hline:g} s", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("devices")
    ax.set_ylabel("predicted time-to-train (s)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
