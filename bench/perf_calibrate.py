"""Calibrate on this machine and compare predicted with measured N-process data-parallel step times.

    python bench/perf_calibrate.py          # writes bench/results/perf_calibrate.json (about 30 s on 2 cores)
"""

from __future__ import annotations

import json
from pathlib import Path

from scalelab.perf.calibrate import calibrate, format_calibration

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    result = calibrate()
    print(format_calibration(result))
    out = ROOT / "bench" / "results" / "perf_calibrate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
