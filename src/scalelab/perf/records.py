"""Published time-to-train records in the records-file form of DESIGN.md, and their prediction.

Format (CSV with this header; ``interconnect`` is the network between nodes, ``[N x]name`` with N links per
node; an empty ``per_node`` or ``interconnect`` means the source does not say, and the model assumes and says
so)::

    name,accelerator,count,per_node,interconnect,global_batch,epochs,time_s
    goyal-2017,p100,256,8,eth-50g,8192,90,3600

Every record is ResNet-50 on ImageNet unless the optional ``model`` and ``dataset`` columns say otherwise.
Other columns (e.g. ``confidence``, ``source``) are kept out of the model; lines starting with ``#`` (also
before the header) are comments.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from scalelab.errors import ConfigError, DataError
from scalelab.perf.catalog import Catalog, load_catalog, parse_network_spec
from scalelab.perf.project import Setup, project
from scalelab.perf.stats import Steps
from scalelab.perf.workload import workload

COLUMNS = ("name", "accelerator", "count", "per_node", "interconnect", "global_batch", "epochs", "time_s")


@dataclass(frozen=True)
class Record:
    name: str
    accelerator: str
    count: int
    per_node: int | None
    interconnect: str | None
    global_batch: int
    epochs: float
    time_s: float
    model: str = "resnet50"
    dataset: str = "imagenet"


def read_records(path: str | Path, catalog: Catalog | None = None) -> list[Record]:
    """Parse and check a records file; every problem is a one-line :class:`DataError` naming file and line."""
    cat = catalog or load_catalog()
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"records file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"records file {path}: cannot read: {e}") from None
    lines = text.splitlines()
    skipped = 0
    while skipped < len(lines) and lines[skipped].lstrip().startswith("#"):   # leading comment lines
        skipped += 1
    reader = csv.reader(lines[skipped:])
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}:{skipped + 1}: missing column(s) {', '.join(missing)}; "
                        f"expected {','.join(COLUMNS)}")
    records = []
    for lineno, row in enumerate(reader, start=skipped + 2):
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{lineno}: {len(row)} fields, expected {len(header)} "
                            f"({','.join(header)})")
        cells = {h: c.strip() for h, c in zip(header, row)}
        records.append(_parse_row(cells, f"{path}:{lineno}", cat))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _parse_row(c: dict[str, str], where: str, cat: Catalog) -> Record:
    def num(key: str, kind=float, optional: bool = False):
        if not c[key]:
            if optional:
                return None
            raise DataError(f"{where}: empty {key}")
        try:
            v = kind(c[key])
        except ValueError:
            raise DataError(f"{where}: {key} must be a{'n integer' if kind is int else ' number'}, "
                            f"got {c[key]!r}") from None
        if not (isinstance(v, int) or math.isfinite(v)) or v <= 0:
            raise DataError(f"{where}: {key} must be > 0, got {c[key]!r}")
        return v

    if not c["name"]:
        raise DataError(f"{where}: empty name")
    try:
        cat.accelerator(c["accelerator"])
        if c["interconnect"]:
            cat.network(parse_network_spec(c["interconnect"])[1])
    except ConfigError as e:
        raise DataError(f"{where}: {e}") from None
    return Record(name=c["name"], accelerator=c["accelerator"].lower(), count=num("count", int),
                  per_node=num("per_node", int, optional=True), interconnect=c["interconnect"] or None,
                  global_batch=num("global_batch", int), epochs=num("epochs"), time_s=num("time_s"),
                  model=c.get("model") or "resnet50", dataset=c.get("dataset") or "imagenet")


def predict_records(records: list[Record], catalog: Catalog | None = None) -> list[dict]:
    """Predict every record: name, predicted_s, actual_s, ratio (predicted/actual), error (>= 1), details."""
    out = []
    for r in records:
        p = project(Setup(workload(r.model, r.dataset), r.accelerator, r.count, r.global_batch,
                          Steps(epochs=r.epochs), r.per_node, r.interconnect), catalog)
        ratio = p.total_s / r.time_s
        out.append({"name": r.name, "accelerator": r.accelerator, "count": r.count,
                    "predicted_s": p.total_s, "actual_s": r.time_s, "ratio": ratio,
                    "error": max(ratio, 1 / ratio), "assumptions": p.assumptions, "projection": p.to_dict()})
    return out


def summary(results: list[dict]) -> dict:
    """Median and worst error factor, and whether the goals (all <= 1.5x, median < 1.25x) hold."""
    errors = [r["error"] for r in results]
    return {"n": len(errors), "median_error": statistics.median(errors), "max_error": max(errors),
            "within_1.5x": sum(e <= 1.5 for e in errors),
            "goal_met": max(errors) <= 1.5 and statistics.median(errors) < 1.25}
