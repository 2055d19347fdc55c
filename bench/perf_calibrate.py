"""Calibrate on this machine and compare predicted with measured N-process data-parallel step times.

    python bench/perf_calibrate.py          # writes bench/results/perf_calibrate.json (about 30 s on 2 cores)
"""

from __future__ import annotations

from pathlib import Path

from scalelab.perf.calibrate import calibrate, format_calibration
from benchlib import write_json

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    result = calibrate()
    print(format_calibration(result))
    write_json(result, ROOT / "bench" / "results" / "perf_calibrate.json")
