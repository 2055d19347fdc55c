"""Seed a new sweep directory with the trials of earlier sweeps that the new budget leaves unchanged.

    python docs/lab/reuse_trials.py NEW_OUT --budget-epochs 10 --budget-steps 200 --n-train 45000 SOURCE ...

SOURCE is a ``sweep.json`` or a sweep directory (its ``trials/*.json``). A trial's run is the same under the new
budget ``max(round(budget_epochs * (n_train // B)), budget_steps)`` when

* its budget then equals the new one (same config, same seed; checked by rerunning two of them, which gave the same
  steps and accuracy), or
* it ended before either budget (``reached`` or ``pruned`` in fewer steps): the budget never came into play.

Those are copied (with ``budget`` and ``reused_from``). A trial that ``missed`` within a *larger* budget than the
new one is copied too, keeping its own ``budget`` (it certainly misses within the smaller one; the record shows
the budget it really had). Everything else (a miss within a smaller budget) is left for the sweep to run again.
The spec of NEW_OUT is written by ``scalelab sweep`` itself, which then resumes from these trials.
"""

import argparse
import json
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("sources", nargs="+")
p.add_argument("--budget-epochs", type=float, required=True)
p.add_argument("--budget-steps", type=int, required=True)
p.add_argument("--n-train", type=int, required=True)
a = p.parse_args()


def trials_of(src: Path):
    if src.is_dir():
        return json.loads((src / "sweep_spec.json").read_text()), [
            json.loads(f.read_text()) for f in sorted((src / "trials").glob("*.json"))]
    d = json.loads(src.read_text())
    return d["spec"], d["trials"]


tdir = Path(a.out) / "trials"
tdir.mkdir(parents=True, exist_ok=True)
copied = {}
for src in map(Path, a.sources):
    spec, trials = trials_of(src)
    for r in trials:
        spe = a.n_train // r["batch"]
        then = r.get("budget") or max(1, round(spec["budget_epochs"] * spe))
        new = max(1, round(a.budget_epochs * spe), a.budget_steps)
        same = then == new or (r["status"] in ("reached", "pruned") and r["steps"] < min(then, new))
        if not (same or (r["status"] == "missed" and then > new)) or r["id"] in copied:
            continue
        r = {k: v for k, v in r.items() if k != "best"}
        r.update(budget=then, cap=min(r["cap"], then) if r.get("cap") else then, reused_from=str(src))
        (tdir / f"{r['id']}.json").write_text(json.dumps(r, indent=1))
        copied[r["id"]] = r["status"]
print(f"{len(copied)} trials copied to {tdir}: " + ", ".join(sorted(copied)))
