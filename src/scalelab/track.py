"""Tracking: the metrics log, TensorBoard, the live progress bar and the final summary table.

Every record goes to ``metrics.jsonl`` (one JSON object per line, flushed as written) and its numbers to
TensorBoard under ``<kind>/<key>``. On resume, records past the checkpoint's step are dropped from the log
and TensorBoard is told to purge them, so a resumed run's log reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class Tracker:
    """Writes metrics to ``metrics.jsonl`` and TensorBoard; a no-op sink when ``out`` is None (non-zero ranks).

    Args:
        out: the run directory, or None to write nothing.
        resume_step: when resuming, the step of the checkpoint; later records are removed.
        tensorboard: also write TensorBoard event files under ``out/tb``.
    """

    def __init__(self, out: Path | None, resume_step: int | None = None, tensorboard: bool = True):
        self.out = out
        self._file = None
        self._tb = None
        if out is None:
            return
        path = out / "metrics.jsonl"
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and self._step_of(line) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tb"), purge_step=resume_step)

    @staticmethod
    def _step_of(line: str) -> int:
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            return 1 << 62  # a torn last line from a killed run: drop it

    def log(self, kind: str, step: int, **values: Any) -> None:
        """Append one record ``{"kind": kind, "step": step, **values}``."""
        if self._file is None:
            return
        record = {"kind": kind, "step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A live progress bar over the steps of a run: step, epoch, loss, accuracy, samples/s and ETA."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train"):
        self._bar = None
        if enabled:
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=0.25, smoothing=0.05)
        self._fields: dict[str, str] = {}

    def update(self, n: int = 1, **fields: Any) -> None:
        if self._bar is None:
            return
        if fields:
            self._fields.update({k: _fmt(v) for k, v in fields.items()})
            self._bar.set_postfix(self._fields, refresh=False)
        self._bar.update(n)

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def summary_table(summary: dict[str, Any], keys: list[str] | None = None) -> str:
    """The summary as a two-column text table."""
    keys = keys or list(summary)
    width = max(len(k) for k in keys)
    rows = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 20}"]
    for k in keys:
        v = summary.get(k)
        if isinstance(v, float):
            v = f"{v:.6g}"
        rows.append(f"{k:<{width}}  {v}")
    return "\n".join(rows)
