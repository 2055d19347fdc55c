"""Pieces every benchmark script shares: the machine's load and writing the result JSON.

Benchmarks run as scripts (``python bench/NAME.py``), so this directory is on ``sys.path`` and they import it as
``from benchlib import loadavg, write_json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none): recorded with every figure."""
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def write_json(result: Any, path: str | Path, indent: int = 2) -> Path:
    """Write a benchmark's result as JSON (creating the directory) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent) + "\n")
    print(f"wrote {out}")
    return out
