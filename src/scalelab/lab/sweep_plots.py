"""The plots of a batch-size sweep (see :mod:`scalelab.lab.sweep`), as in Shallue et al. 2018 (arXiv 1811.03600).

* ``steps_to_target.png``: best steps-to-target against batch on log-log axes, one line per optimizer, each with
  its perfect-scaling line (slope -1 through the smallest batch that reached the target) and its knee marked;
  where a noise-scale measurement exists, the knee it predicts is drawn as a vertical line.
* ``examples_to_target.png``: examples (steps x batch) to the target against batch; flat under perfect scaling.
* ``best_lr.png``: the fastest learning rate against batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def _series(summary: dict[str, Any], opt: str, key: str):
    rows = [r for r in summary["best"] if r["optimizer"] == opt and r.get(key) is not None]
    return [r["batch"] for r in rows], [r[key] for r in rows]


def plot_sweep(summary: dict[str, Any], out: Path, predicted: dict[str, float] | None = None) -> list[Path]:
    """Write the sweep's PNG plots into ``out``; ``predicted`` maps a label to a predicted knee batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = summary["spec"]
    title = f"{spec['base']['data']['name']} / {spec['base']['model']['name']}: target test acc {spec['target_acc']:g}"
    paths = []

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for i, opt in enumerate(spec["optimizers"]):
        c = COLORS[i % len(COLORS)]
        b, s = _series(summary, opt, "steps_to_target")
        if not b:
            continue
        ax.plot(b, s, "o-", color=c, label=opt)
        k = summary["knees"][opt]
        if k["ref_batch"]:
            bb = [x for x in spec["batches"] if x >= k["ref_batch"]]
            ax.plot(bb, [k["ref_steps"] * k["ref_batch"] / x for x in bb], ":", color=c, alpha=0.7,
                    label=f"{opt}: perfect scaling")
        if k["batch"]:
            ks = dict(zip(b, s))[k["batch"]]
            ax.plot([k["batch"]], [ks], "*", color=c, markersize=16, markeredgecolor="k",
                    label=f"{opt}: knee B={k['batch']}")
    for j, (label, kb) in enumerate((predicted or {}).items()):
        ax.axvline(kb, color="gray", linestyle="--" if j == 0 else "-.", alpha=0.8, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel("steps to target (best over the LR search)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "steps_to_target.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, opt in enumerate(spec["optimizers"]):
        b, e = _series(summary, opt, "examples_to_target")
        if b:
            ax.plot(b, e, "o-", color=COLORS[i % len(COLORS)], label=opt)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel("examples to target")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "examples_to_target.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, opt in enumerate(spec["optimizers"]):
        b, lr = _series(summary, opt, "lr")
        if b:
            ax.plot(b, lr, "o-", color=COLORS[i % len(COLORS)], label=opt)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel("fastest learning rate")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "best_lr.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
