"""Sync or async? Six ways for 4 workers to train the same model on the same data, under the same stragglers.

    python bench/sync_vs_async.py [--target-acc 0.97] [--repeats 1] [--set section.key=value ...]

The recipe is scalelab's default (cnn1d on MNIST-1D, SGD with Nesterov momentum, cosine schedule), global batch
B = 192, 3 epochs at most, stopping at the target test accuracy (evaluated every 25 global batches). Modes:

- ``sync``: 4 workers, all-reduce every step (DDP);
- ``backup``: sync with backup workers (Chen et al. 2016), 4 workers of which the first 3 to finish make a step;
- ``async``: 1 parameter server + 4 workers, Downpour (Dean et al. 2012), updates of B/4 samples;
- ``ssp``: the same with stale synchronous parallel, bound s = 2 (Ho et al. 2013);
- ``hybrid``: 1 server + 2 groups of 2 workers, sync inside a group, async across (Kurth et al. 2017);
- ``localsgd``: 4 workers averaging their models every 4 steps (Stich 2019; Lin et al. 2020).

Scenarios (``scalelab.parallel.stragglers``): no stragglers; one slow worker (worker 1 sleeps 30 ms every step);
heavy-tailed delays (every worker, with probability 0.3 per step, a Pareto delay of scale 4 ms, tail index 1.2).
Figures per run: time-to-target on the training clock (excluding evaluation and checkpoints, as in every scalelab
summary), samples to target, final and best test accuracy, mean staleness; medians over repeats, and each mode's
time-to-target as a ratio to sync's in the same scenario. Processes: sync, backup and localsgd run 4, the
parameter-server modes 5 (the server is one more process); the machine has 2 cores, which the numbers reflect.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from benchlib import loadavg, write_json

SCENARIOS = {
    "none": [],
    "one-slow": ["stragglers.dist=fixed", "stragglers.rank=1", "stragglers.delay_s=0.03"],
    "heavy-tail": ["stragglers.dist=pareto", "stragglers.delay_s=0.004", "stragglers.shape=1.2",
                   "stragglers.prob=0.3"],
}
MODES = {
    "sync": (4, []),
    "backup": (4, ["parallel.backup_workers=1"]),
    "async": (5, ["parallel.mode=async"]),
    "ssp": (5, ["parallel.mode=ssp", "parallel.staleness_bound=2"]),
    "hybrid": (5, ["parallel.mode=hybrid", "parallel.group_size=2"]),
    "localsgd": (4, ["parallel.mode=localsgd", "parallel.local_period=4"]),
}


def run(nproc: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        args = [a for o in overrides for a in ("--set", o)]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "scalelab", "train", "--nproc", str(nproc), "--out", str(out),
                               "--no-progress", *args], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return {"failed": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"}
        summary = json.loads((out / "summary.json").read_text())
        summary["process_wall_s"] = time.perf_counter() - t0
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                 if '"kind": "eval"' in line]
        summary["curve"] = [(e["train_s"], e["samples"], e["test_acc"]) for e in evals]
        return summary


def _med(results: list[dict], key: str):
    vals = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def plot(rows: list[dict], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, axes = plt.subplots(2, len(scenarios), figsize=(5 * len(scenarios), 8), squeeze=False)
    for col, scenario in enumerate(scenarios):
        mine = [r for r in rows if r["scenario"] == scenario]
        ax = axes[0][col]
        names = [r["mode"] for r in mine]
        ttt = [r["time_to_target_s"] or 0 for r in mine]
        bars = ax.bar(names, ttt, color=["C0", "C1", "C2", "C3", "C4", "C5"][:len(names)])
        for b, r in zip(bars, mine):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(),
                    "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{scenario}: time to {target:.0%} test accuracy (s)")
        ax.tick_params(axis="x", labelsize=8)
        ax = axes[1][col]
        for i, r in enumerate(mine):
            curve = r["runs"][0].get("curve") or []
            if curve:
                ax.plot([p[0] for p in curve], [p[2] for p in curve], "o-", ms=2, label=r["mode"], color=f"C{i}")
        ax.axhline(target, color="grey", ls=":", lw=1)
        ax.set_ylim(0.5, 1.0)
        ax.set_xlabel("training clock (s)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-acc", type=float, default=0.97)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--json", default="bench/results/sync_vs_async.json")
    args = ap.parse_args(argv)
    base = [f"train.target_acc={args.target_acc}", "train.batch_size=192", "train.epochs=3",
            "train.eval_every=25", *args.overrides]
    scenarios, modes = args.scenarios.split(","), args.modes.split(",")
    t_bench = time.perf_counter()
    load_before = loadavg()
    rows = []
    for scenario in scenarios:
        results: dict[str, list] = {m: [] for m in modes}
        for _ in range(args.repeats):  # alternate the modes inside each repeat
            for mode in modes:
                nproc, extra = MODES[mode]
                results[mode].append(run(nproc, base + SCENARIOS[scenario] + extra))
        for mode in modes:
            ok = [r for r in results[mode] if "failed" not in r]
            row = {"scenario": scenario, "mode": mode, "processes": MODES[mode][0], "runs": results[mode],
                   "failed": [r["failed"] for r in results[mode] if "failed" in r],
                   "time_to_target_s": _med(ok, "time_to_target_s"),
                   "final_test_acc": _med(ok, "final_test_acc"), "best_test_acc": _med(ok, "best_test_acc"),
                   "train_s": _med(ok, "train_s"), "samples_seen": _med(ok, "samples_seen"),
                   "staleness_mean": _med(ok, "staleness_mean"), "staleness_max": _med(ok, "staleness_max"),
                   "reached": sum(1 for r in ok if r.get("time_to_target_s") is not None)}
            # samples at the first evaluation that reached the target (comparable across modes)
            hit = [next((p[1] for p in r["curve"] if p[2] >= args.target_acc), None) for r in ok]
            hit = [h for h in hit if h is not None]
            row["samples_to_target"] = statistics.median(hit) if hit else None
            rows.append(row)
            ttt = f"{row['time_to_target_s']:.2f}" if row["time_to_target_s"] is not None else "not reached"
            print(f"{scenario:10s} {mode:8s} time-to-{args.target_acc} {ttt:>11s} s  samples "
                  f"{row['samples_to_target']}  final acc {row['final_test_acc']}  staleness "
                  f"{row['staleness_mean']}  {row['failed'] or ''}", file=sys.stderr, flush=True)

    print(f"\ntime to {args.target_acc:.0%} test accuracy (s, training clock), ratio to sync in brackets; "
          f"final test accuracy")
    print(f"{'mode':10s}" + "".join(f"{s:>28s}" for s in scenarios))
    for mode in modes:
        cells = []
        for scenario in scenarios:
            r = next(x for x in rows if x["scenario"] == scenario and x["mode"] == mode)
            s = next((x for x in rows if x["scenario"] == scenario and x["mode"] == "sync"), None)
            if r["time_to_target_s"] is None:
                cells.append(f"{'not reached':>14s} acc {r['final_test_acc'] or float('nan'):.4f}")
                continue
            ratio = (f"({r['time_to_target_s'] / s['time_to_target_s']:.2f})"
                     if s and s["time_to_target_s"] else "")
            cells.append(f"{r['time_to_target_s']:7.2f} {ratio:>6s} acc {r['final_test_acc']:.4f}")
        print(f"{mode:10s}" + "".join(f"{c:>28s}" for c in cells))
    out = Path(args.json)
    png = out.with_suffix(".png")
    plot(rows, png, args.target_acc)
    write_json({"benchmark": "sync_vs_async", "target_acc": args.target_acc,
                               "repeats": args.repeats, "cpu_count": os.cpu_count(),
                               "loadavg_before": load_before, "loadavg_after": loadavg(),
                               "bench_wall_s": time.perf_counter() - t_bench, "base_overrides": base,
                               "rows": rows}, out, indent=1)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
