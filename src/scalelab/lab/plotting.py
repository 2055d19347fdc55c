"""What every lab plot does last: labels, log axes, grid, legend, save as PNG, close."""

from __future__ import annotations

from pathlib import Path


def finish(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str, xlog: int | None = None,
           ylog: bool = True, legend_size: int = 8) -> Path:
    """Label and save ``fig`` to ``path`` (100 dpi) and close it. ``xlog``: log base of the x axis, or None."""
    import matplotlib.pyplot as plt

    if xlog:
        ax.set_xscale("log", base=xlog)
    if ylog:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
