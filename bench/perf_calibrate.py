"""Calibrate on this machine and compare predicted with measured ``scalelab train --nproc N`` step times.

    flock /work/coord/bench.lock python bench/perf_calibrate.py     # ~5-10 minutes on 2 cores
    python bench/perf_calibrate.py --out FILE.json                  # default bench/results/perf_calibrate.json

The prediction of each N-worker step is the sum of separately measured parts (see
:mod:`scalelab.perf.calibrate`); the load average before and after the run is recorded with the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchlib import loadavg, write_json

from scalelab.perf.calibrate import calibrate, format_calibration

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "perf_calibrate.json")
    args = ap.parse_args()
    before = loadavg()
    result = calibrate()
    result["load_before"], result["load_after"] = before, loadavg()
    print(format_calibration(result))
    write_json(result, args.out)
