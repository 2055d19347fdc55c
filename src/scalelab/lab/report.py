"""``scalelab report RUN_DIR``: the run's summary as a table, and PNG plots of its curves (on a sweep directory:
the sweep's HTML report, see :mod:`scalelab.lab.html`).

Plots (in ``RUN_DIR/plots``): ``curves.png`` with loss and accuracy (train and test) against steps, samples and
wall time, and ``lr.png`` with the learning rate against steps; where the run logged them, ``staleness.png``
(parameter-server modes) and ``noise.png`` (the gradient noise scale, ``train.noise_every``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scalelab.errors import DataError
from scalelab.track import summary_table


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a torn last line (a killed run) is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise DataError(f"{run_dir} is not a scalelab run directory: no metrics.jsonl")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records, kind: str, x: str, y: str):
    pts = [(r[x], r[y]) for r in records if r.get("kind") == kind and r.get(x) is not None
           and isinstance(r.get(y), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: Path, records: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    # wall_s: time in the training loop (training, evaluation, checkpoints), summed over resumed sessions
    xs = [("step", "steps"), ("samples", "samples seen"), ("wall_s", "wall time in the loop (s)")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for col, (xkey, xlabel) in enumerate(xs):
        for row, (train_key, test_key, label) in enumerate([("loss", "test_loss", "loss"),
                                                            ("acc", "test_acc", "accuracy")]):
            ax = axes[row][col]
            ax.plot(*_series(records, "train", xkey, train_key), label=f"train {label} (batch)", alpha=0.6)
            ax.plot(*_series(records, "eval", xkey, test_key), "o-", label=f"test {label}", markersize=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            if label == "loss":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    curves = out / "curves.png"
    fig.savefig(curves, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(records, "train", "step", "lr"))
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    ax.set_title(f"{run_dir.name}: learning rate")
    fig.tight_layout()
    lr = out / "lr.png"
    fig.savefig(lr, dpi=100)
    plt.close(fig)
    paths = [curves, lr]
    hist = [r["hist"] for r in records if r.get("kind") == "staleness" and r.get("hist")]
    if hist:  # parameter-server modes: staleness of every applied gradient (scalelab.parallel.ps)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(range(len(hist[-1])), hist[-1])
        ax.set_xlabel("staleness (server updates between pull and apply)")
        ax.set_ylabel("gradients applied")
        ax.set_title(f"{run_dir.name}: staleness")
        fig.tight_layout()
        paths.append(out / "staleness.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def staleness_text(records: list[dict[str, Any]]) -> str:
    """One line on the staleness histogram of a parameter-server run ('' for other runs)."""
    hist = [r["hist"] for r in records if r.get("kind") == "staleness" and r.get("hist")]
    if not hist:
        return ""
    h = hist[-1]
    n = sum(h)
    mean = sum(i * c for i, c in enumerate(h)) / n if n else 0.0
    return (f"staleness of {n} applied gradients: mean {mean:.2f}, max {len(h) - 1}; histogram (tau: count) "
            + ", ".join(f"{i}: {c}" for i, c in enumerate(h) if c))


def report_run(run_dir: Path) -> str:
    """Print-ready text: the summary table and the paths of the plots written (for a sweep directory, the
    sweep's tables, plots and ``report.html``: :mod:`scalelab.lab.html`)."""
    run_dir = Path(run_dir)
    if (run_dir / "sweep_spec.json").exists():
        from scalelab.lab.html import report_sweep

        return report_sweep(run_dir)
    records = read_metrics(run_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        head = summary_table(summary)
    else:
        last = [r for r in records if r.get("kind") == "eval"]
        head = (f"run not finished; last evaluation at step {last[-1]['step']}: test_acc {last[-1]['test_acc']}"
                if last else "run not finished; no evaluation yet")
    paths = plot_run(run_dir, records)
    stale = staleness_text(records)
    noise = ""
    if any(r.get("kind") == "noise" for r in records):  # train.noise_every: the curve and what it predicts
        from scalelab.lab.noise import analyze, format_result, plot_noise

        result = analyze(run_dir)
        paths.append(plot_noise(result, run_dir / "plots" / "noise.png"))
        noise = format_result(result) + "\n"
    return head + "\n" + (stale + "\n" if stale else "") + noise + "\n".join(f"wrote {p}" for p in paths)
