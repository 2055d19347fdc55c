"""The 95% steps-to-target plot of docs/lab.md with momentum SGD's second LR search at 4096 and 8192 included.

    python docs/lab/combine_95.py docs/lab/results/sweep-95 docs/lab/results/sweep-95-sgd-low \
        docs/lab/results/sweep-95/combined

The main sweep's LR grid for SGD at 4096 and 8192 followed the linear rule (1.6-25.6) and stayed near chance; the
second sweep searched around 0.4 there. This takes each (optimizer, batch) cell's best over the trials of both
sweeps (the trials themselves are unchanged; their ids clash, so they are kept apart by source), recomputes the
knees and draws the plots with the sweep's own plotting code.
"""

import json
import sys
from pathlib import Path

from scalelab.lab.sweep import SweepSpec, summarize
from scalelab.lab.sweep_plots import plot_sweep

main_dir, extra_dir, out = (Path(a) for a in sys.argv[1:4])
main = json.loads((main_dir / "sweep.json").read_text())
extra = json.loads((extra_dir / "sweep.json").read_text())
spec = SweepSpec(**main["spec"])
trials = main["trials"] + [dict(r, id=f"{r['id']}@{extra_dir.name}") for r in extra["trials"]]
summary = summarize(spec, trials)
out.mkdir(parents=True, exist_ok=True)
(out / "summary.json").write_text(json.dumps({"best": summary["best"], "knees": summary["knees"]}, indent=1))
for p in plot_sweep(summary, out, {"knee predicted by noise scale (B_simple=238)": 1.25 * 32 + 0.25 * 238}):
    print("wrote", p)
for o, k in summary["knees"].items():
    print(o, "knee", k["batch"], "common", k["common"]["batch"], "B_noise fit", round(k["mccandlish_b_noise"] or 0))
