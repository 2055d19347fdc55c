"""Synchronous SGD under stragglers: plain sync against sync with backup workers (Chen et al. 2016).

    python bench/stragglers.py [--target-acc 0.97] [--repeats 1] [--set section.key=value ...]

Scenarios: no stragglers; one slow worker (fixed delay every step); heavy-tailed delays on every worker (Pareto).
For each, two jobs train the same recipe (default cnn1d on MNIST-1D, B = 256) to a target test accuracy:
- ``sync``: N = 2 workers, every step waits for both;
- ``backup``: N + b = 3 workers, each step averages the first 2 gradients and drops the late one.
Both use the same global batch of used gradients (2 x 128), so they take the same steps to the target; what
differs is how long a step takes. Figures: median step time (training clock / steps), time-to-target, steps,
and the gradients dropped. On this 2-core machine the backup job runs 3 processes on 2 cores, which costs it
compute; the comparison is honest about that, not adjusted for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from benchlib import write_json

SCENARIOS = {
    "none": [],
    "one-slow": ["stragglers.dist=fixed", "stragglers.rank=1", "stragglers.delay_s=0.03"],
    "heavy-tail": ["stragglers.dist=pareto", "stragglers.delay_s=0.004", "stragglers.shape=1.2",
                   "stragglers.prob=0.3"],
}
MODES = {"sync": (2, []), "backup": (3, ["parallel.backup_workers=1"])}


def run(nproc: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        args = [a for o in overrides for a in ("--set", o)]
        proc = subprocess.run([sys.executable, "-m", "scalelab", "train", "--nproc", str(nproc), "--out", str(out),
                               "--no-progress", *args], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({nproc} workers, {overrides}):\n{proc.stderr[-2000:]}")
        return json.loads((out / "summary.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-acc", type=float, default=0.97)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--json", default="bench/results/stragglers.json")
    args = ap.parse_args(argv)
    base = [f"train.target_acc={args.target_acc}", "train.epochs=3", "train.eval_every=25", *args.overrides]

    rows = []
    for scenario, straggle in SCENARIOS.items():
        for mode, (nproc, extra) in MODES.items():
            results = [run(nproc, base + straggle + extra) for _ in range(args.repeats)]
            med = lambda k: statistics.median(r[k] for r in results if r[k] is not None) \
                if any(r[k] is not None for r in results) else None  # noqa: E731
            row = {"scenario": scenario, "mode": mode, "workers": nproc,
                   "step_ms": 1000 * statistics.median(r["train_s"] / r["steps"] for r in results),
                   "steps_to_target": med("steps_to_target"), "time_to_target_s": med("time_to_target_s"),
                   "final_test_acc": med("final_test_acc"), "dropped_grads": med("dropped_grads"),
                   "runs": results}
            rows.append(row)
            ttt = f"{row['time_to_target_s']:.2f}" if row["time_to_target_s"] is not None else "not reached"
            print(f"{scenario:10s} {mode:6s} step {row['step_ms']:6.1f} ms  time-to-{args.target_acc} {ttt} s  "
                  f"steps {row['steps_to_target']}  dropped {row['dropped_grads']}", file=sys.stderr)

    print(f"\n{'scenario':10s} {'':>24s}{'sync':>8s}{'backup':>9s}{'backup/sync':>13s}")
    for scenario in SCENARIOS:
        s, b = [r for r in rows if r["scenario"] == scenario]
        print(f"{scenario:10s} {'step time (ms)':>24s}{s['step_ms']:8.1f}{b['step_ms']:9.1f}"
              f"{b['step_ms'] / s['step_ms']:13.2f}")
        if s["time_to_target_s"] and b["time_to_target_s"]:
            print(f"{'':10s} {'time to target (s)':>24s}{s['time_to_target_s']:8.2f}{b['time_to_target_s']:9.2f}"
                  f"{b['time_to_target_s'] / s['time_to_target_s']:13.2f}")
    write_json({"benchmark": "stragglers", "target_acc": args.target_acc, "repeats": args.repeats,
                "cpu_count": os.cpu_count(), "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
