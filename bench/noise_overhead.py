"""What measuring the gradient noise scale costs a data-parallel run: the free estimator, the shard one.

    python bench/noise_overhead.py [--nproc 2] [--repeats 3] [--steps 200] [--set section.key=value ...]
                                   [--json PATH]

Three ``scalelab train --nproc N`` runs of the same config (default: the lab's 95% noise run, cnn1d width 16
on MNIST-1D, momentum SGD at global batch 256), alternating so that load from other processes hits all alike:

- ``off``: no noise measurement (the peer every cost is relative to);
- ``workers``: ``train.noise_method=workers`` at every step: |G_b|^2 and |G_B|^2 from the step's own gradients
  before and after DDP's all-reduce (two squared norms in the comm hook, one scalar all-reduce);
- ``shards``: ``train.noise_method=shards`` every 10 steps with 8 shards: the estimator scalelab used before,
  8 extra forward/backward passes of B/8 per measurement on a fresh batch.

The figure is milliseconds per step, ``(train_s + noise_s) / steps`` from each run's summary.json (training
steps plus the measurement's own work; evaluation and checkpoints excluded), median over the repeats, and its
ratio to ``off``; also per measurement, ``(cost - off) * steps / measurements``. The load average is kept in
the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from benchlib import loadavg, write_json

REPO = Path(__file__).resolve().parents[1]
BASE = ["train.batch_size=256", "recipe.optimizer=sgd", "recipe.base_lr=0.4", "recipe.scaling=none",
        "train.progress=false", "train.checkpoint_every=100000", "train.log_every=50"]
VARIANTS = {
    "off": ["train.noise_every=0"],
    "workers": ["train.noise_every=1", "train.noise_method=workers"],
    "shards": ["train.noise_every=10", "train.noise_method=shards", "train.noise_shards=8"],
}


def run(nproc: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        args = [sys.executable, "-m", "scalelab", "train", "--config",
                str(REPO / "docs/lab/mnist1d_sweep.toml"), "--nproc", str(nproc), "--out", str(out),
                "--no-progress", *[a for o in overrides for a in ("--set", o)]]
        load = (loadavg() or [float("nan")])[0]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"bench/noise_overhead.py: a run failed ({' '.join(overrides)}):\n"
                             f"{proc.stderr[-2000:]}")
        s = json.loads((out / "summary.json").read_text())
        measured = sum(1 for line in (out / "metrics.jsonl").read_text().splitlines()
                       if json.loads(line).get("kind") == "noise")
    return {"ms_per_step": 1e3 * (s["train_s"] + s.get("noise_s", 0.0)) / s["steps"], "steps": s["steps"],
            "train_s": s["train_s"], "noise_s": s.get("noise_s", 0.0), "measurements": measured,
            "load1": load}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE")
    ap.add_argument("--json", default=str(REPO / "bench/results/noise_overhead.json"))
    a = ap.parse_args(argv)
    if a.nproc < 2 or a.repeats < 1 or a.steps < 10:
        ap.error("need --nproc >= 2 (the free estimator needs workers), --repeats >= 1, --steps >= 10")
    overrides = BASE + [f"train.max_steps={a.steps}", f"train.eval_every={a.steps}"] + a.overrides
    runs: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    for r in range(a.repeats):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            runs[name].append(run(a.nproc, overrides + VARIANTS[name]))
            print(f"repeat {r + 1}/{a.repeats} {name:>8}: {runs[name][-1]['ms_per_step']:.1f} ms/step "
                  f"(load {runs[name][-1]['load1']:.1f})", flush=True)
    med = {k: statistics.median(x["ms_per_step"] for x in v) for k, v in runs.items()}
    result = {"nproc": a.nproc, "repeats": a.repeats, "steps": a.steps, "overrides": overrides,
              "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
              "median_ms_per_step": med, "runs": runs, "variants": VARIANTS}
    print(f"\nnoise-scale measurement cost, {a.nproc} workers, {a.steps} steps, medians of {a.repeats}:")
    print(f"{'':>10} {'ms/step':>9} {'x off':>7} {'measurements':>13} {'ms per measurement':>19}")
    for name in VARIANTS:
        n = runs[name][0]["measurements"]
        per = (med[name] - med["off"]) * a.steps / n if n else None
        result.setdefault("ratio_to_off", {})[name] = med[name] / med["off"]
        result.setdefault("ms_per_measurement", {})[name] = per
        print(f"{name:>10} {med[name]:>9.1f} {med[name] / med['off']:>7.3f} {n:>13} "
              f"{'' if per is None else f'{per:.1f}':>19}")
    write_json(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
