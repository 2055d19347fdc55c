"""The plots of a batch-size sweep (see :mod:`scalelab.lab.sweep`), as in Shallue et al. 2018 (arXiv 1811.03600).

* ``steps_to_target.png``: best steps-to-target against batch on log-log axes, one line per optimizer, each with
  its perfect-scaling line (slope -1 through the smallest batch that reached the target) and its knee marked;
  where a noise-scale measurement exists, the knee it predicts is drawn as a vertical line. A batch where no LR
  reached the target is drawn as an open triangle at its step budget ("missed within the budget": the steps
  needed there are more than that, if the target is reachable at all).
* ``examples_to_target.png``: examples (steps x batch) to the target against batch; flat under perfect scaling.
* ``best_lr.png``: the fastest learning rate against batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scalelab.lab.plotting import finish

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
        missed = [r for r in summary["best"] if r["optimizer"] == opt and r["steps_to_target"] is None
                  and r.get("budget")]
        if missed:
            ax.plot([r["batch"] for r in missed], [r["budget"] for r in missed], "^", color=c, mfc="none",
                    markersize=9, label=f"{opt}: missed within the budget")
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
    paths.append(finish(fig, ax, out / "steps_to_target.png", xlabel="global batch size",
                        ylabel="steps to target (best over the LR search)", title=title, xlog=2, legend_size=7))

    for key, name, ylabel in (("examples_to_target", "examples_to_target.png", "examples to target"),
                              ("lr", "best_lr.png", "fastest learning rate")):
        fig, ax = plt.subplots(figsize=(7.5, 5))
        for i, opt in enumerate(spec["optimizers"]):
            b, v = _series(summary, opt, key)
            if b:
                ax.plot(b, v, "o-", color=COLORS[i % len(COLORS)], label=opt)
        paths.append(finish(fig, ax, out / name, xlabel="global batch size", ylabel=ylabel, title=title, xlog=2))
    return paths
