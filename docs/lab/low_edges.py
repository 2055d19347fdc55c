"""The cells of a sweep whose fastest trial used the lowest LR tried there, and the two LR multipliers below it.

    python docs/lab/low_edges.py SWEEP_DIR [SWEEP_DIR ...]

Prints one line per optimizer with such cells: ``OPTIMIZER BATCH[,BATCH...] MULT[,MULT...]``, the multipliers of
the sweep's LR guess at one half and one quarter of the lowest one tried in each of those cells, pooled over the
cells so that one sweep runs them all (Shallue et al. 2018 check that the best point of a search is not on its
edge). Several directories are one sweep split in parts (the trials
of each cell are pooled). A cell where nothing reached the target is left out: its search had no best point.
Used by docs/lab/sweep_985_test10000_low.sh.
"""

import argparse
import csv
from collections import defaultdict
from pathlib import Path

NEEDED = {"batch", "optimizer", "steps_to_target", "mult", "status"}


def edges(dirs: list[Path]) -> dict[str, tuple[list[int], list[float]]]:
    """Per optimizer: the batches whose fastest trial is at the lowest LR tried, and the multipliers to add."""
    cells = defaultdict(list)
    for d in dirs:
        if not (d / "sweep.csv").exists():
            raise SystemExit(f"low_edges.py: {d} has no sweep.csv (run `scalelab sweep` there first)")
        with open(d / "sweep.csv") as f:
            rows = csv.DictReader(f)
            missing = NEEDED - set(rows.fieldnames or [])
            if missing:
                raise SystemExit(f"low_edges.py: {d / 'sweep.csv'} lacks the columns {', '.join(sorted(missing))} "
                                 f"(needs {', '.join(sorted(NEEDED))}, as `scalelab sweep` writes)")
            for n, r in enumerate(rows, start=2):
                try:
                    r.update(batch=int(r["batch"]), mult=float(r["mult"]), steps_to_target=(
                        int(r["steps_to_target"]) if r["status"] == "reached" else None))
                except (TypeError, ValueError):
                    raise SystemExit(f"low_edges.py: {d / 'sweep.csv'} line {n}: batch, mult and (for a reached "
                                     f"trial) steps_to_target must be numbers, got {r['batch']!r}, {r['mult']!r}, "
                                     f"{r['steps_to_target']!r}") from None
                cells[(r["optimizer"], r["batch"])].append(r)
    out: dict[str, tuple[list[int], list[float]]] = {}
    for (opt, batch), rows in sorted(cells.items()):
        reached = [r for r in rows if r["status"] == "reached"]
        if not reached:
            continue
        lowest = min(r["mult"] for r in rows)
        fastest = min(r["steps_to_target"] for r in reached)
        if any(r["mult"] == lowest and r["steps_to_target"] == fastest for r in reached):
            batches, mults = out.setdefault(opt, ([], []))
            batches.append(batch)
            mults[:] = sorted(set(mults) | {lowest / 4, lowest / 2})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path)
    for opt, (batches, mults) in edges(p.parse_args().dirs).items():
        print(opt, ",".join(map(str, batches)), ",".join(f"{m:g}" for m in mults))


if __name__ == "__main__":
    main()
