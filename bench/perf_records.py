"""Predict every record of records.csv, and of the held-out file src/scalelab/perf/records_holdout.csv, with
the performance model; print predicted vs actual and the ratio.

    python bench/perf_records.py            # writes bench/results/perf_records.json

The peer figure is the published time of each record (DESIGN.md sources); the model's constants are the
family constants of src/scalelab/perf/catalog.toml, the same for every record of a family, never fitted
per row. The held-out records set no constant; their figures are quoted from memory (see the file).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from scalelab.perf.records import predict_records, read_records, summary
from benchlib import write_json

ROOT = Path(__file__).resolve().parents[1]
HOLDOUT = ROOT / "src" / "scalelab" / "perf" / "records_holdout.csv"


def _table(title: str, results: list[dict]) -> dict:
    print(title)
    print(f"{'record':26} {'predicted s':>12} {'actual s':>9} {'ratio':>6}  "
          "bound, step, kernels, exposed comm")
    for r in results:
        p = r["projection"]
        print(f"{r['name']:26} {r['predicted_s']:12.1f} {r['actual_s']:9.1f} {r['ratio']:6.2f}  "
              f"{p['compute_bound']}, {p['step_s'] * 1e3:.1f} ms, {p['kernel_overhead_s'] * 1e3:.2f} ms, "
              f"{p['comm_exposed_s'] * 1e3:.2f} ms of {p['comm_s'] * 1e3:.2f} ms ({p['algorithm']})"
              + (f"  [assumed: {'; '.join(r['assumptions'])}]" if r["assumptions"] else ""))
    s = summary(results)
    print(f"median error {s['median_error']:.3f}x, worst {s['max_error']:.3f}x, "
          f"{s['within_1.5x']}/{s['n']} within 1.5x, goal met: {s['goal_met']}\n")
    return s


def main() -> None:
    t0 = time.perf_counter()
    results = predict_records(read_records(ROOT / "records.csv"))
    held = predict_records(read_records(HOLDOUT))
    s = _table("records.csv (DESIGN.md)", results)
    sh = _table(f"held out ({HOLDOUT.relative_to(ROOT)}; figures from memory, see its confidence column)",
                held)
    write_json({"summary": s, "records": results, "holdout_summary": sh, "holdout": held,
                "torch": torch.__version__, "python": platform.python_version(),
                "seconds": time.perf_counter() - t0},
               ROOT / "bench" / "results" / "perf_records.json")

if __name__ == "__main__":
    main()
