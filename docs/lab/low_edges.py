"""The cells of a sweep whose fastest trial used the lowest LR tried there, and the two LR multipliers below it.

    python docs/lab/low_edges.py [--guess OPT=LR@BATCH[:RULE] ...] SWEEP_DIR [SWEEP_DIR ...]

Prints one line per optimizer with such cells: ``OPTIMIZER BATCH[,BATCH...] MULT[,MULT...]``: the multipliers,
of the guess that the next sweep will use (``--guess``, as `scalelab sweep --lr-guess` takes it), at one half and
one quarter of the lowest LR tried in each of those cells, pooled over the cells so that one sweep runs them all
(Shallue et al. 2018 check that the best point of a search is not on its edge). Several directories are one
sweep split in parts, possibly with different guesses: the trials of each cell are pooled by their LR. A cell
where nothing reached the target is left out: its search had no best point. An optimizer without a guess is an
error. Used by docs/lab/sweep_985_low.sh.
"""

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from scalelab.errors import ConfigError
from scalelab.lab.sweep import LRGuess

NEEDED = {"batch", "optimizer", "steps_to_target", "lr", "status"}
GUESSES = {"sgd": "0.1@64:sqrt", "kfac": "0.025@64:linear"}  # the grids of docs/lab/sweep_985_seeds.sh


def edges(dirs: list[Path], guesses: dict[str, LRGuess] | None = None) -> dict[str, tuple[list[int], list[float]]]:
    """Per optimizer: the batches whose fastest trial is at the lowest LR tried, and the multipliers to add."""
    guesses = guesses or {o: LRGuess.parse(g) for o, g in GUESSES.items()}
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
                    r.update(batch=int(r["batch"]), lr=float(r["lr"]), steps_to_target=(
                        int(r["steps_to_target"]) if r["status"] == "reached" else None))
                except (TypeError, ValueError):
                    raise SystemExit(f"low_edges.py: {d / 'sweep.csv'} line {n}: batch, lr and (for a reached "
                                     f"trial) steps_to_target must be numbers, got {r['batch']!r}, {r['lr']!r}, "
                                     f"{r['steps_to_target']!r}") from None
                cells[(r["optimizer"], r["batch"])].append(r)
    out: dict[str, tuple[list[int], list[float]]] = {}
    for (opt, batch), rows in sorted(cells.items()):
        reached = [r for r in rows if r["status"] == "reached"]
        if not reached:
            continue
        lowest = min(r["lr"] for r in rows)
        fastest = min(r["steps_to_target"] for r in reached)
        if any(r["lr"] == lowest and r["steps_to_target"] == fastest for r in reached):
            if opt not in guesses:
                raise SystemExit(f"low_edges.py: no guess for {opt} (pass --guess {opt}=LR@BATCH[:RULE]; "
                                 f"have {', '.join(sorted(guesses))})")
            mult = float(f"{lowest / guesses[opt].at(batch):.6g}")  # the sweep's mult, without float noise
            batches, mults = out.setdefault(opt, ([], []))
            batches.append(batch)
            mults[:] = sorted(set(mults) | {mult / 4, mult / 2})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guess", action="append", default=[], metavar="OPT=LR@BATCH[:RULE]",
                   help=f"the next sweep's LR guess for OPT (default: {' '.join(f'{o}={g}' for o, g in GUESSES.items())})")
    p.add_argument("dirs", nargs="+", type=Path)
    a = p.parse_args()
    guesses = {o: LRGuess.parse(g) for o, g in GUESSES.items()}
    for text in a.guess:
        opt, sep, g = text.partition("=")
        if not sep:
            raise SystemExit(f"low_edges.py: --guess {text!r}: expected OPT=LR@BATCH[:RULE], e.g. kfac=0.025@64:linear")
        try:
            guesses[opt] = LRGuess.parse(g)
        except ConfigError as e:
            raise SystemExit(f"low_edges.py: {e}") from None
    for opt, (batches, mults) in edges(a.dirs, guesses).items():
        print(opt, ",".join(map(str, batches)), ",".join(f"{m:g}" for m in mults))


if __name__ == "__main__":
    main()
