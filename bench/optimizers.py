"""Optimizers at large batch: steps-to-target and time-to-target on MNIST-1D for SGD, LARS, LAMB, K-FAC, Neumann.

    python bench/optimizers.py [--batches 256,1024,4096,16384] [--steps 400,200,100,60]
                               [--optimizers sgd,lars,lamb,kfac,neumann] [--target 0.7]
                               [--set section.key=value ...] [--json PATH]

Every run is ``scalelab.train`` in this process on the same cached MNIST-1D data (45,000 train / 5,000 test),
the same model (an MLP with 2 hidden layers of 128 and BN; ``--set`` changes it), one thread (on this shared
2-core machine two threads spend most of a small step waiting for each other), and the recipe defaults: 1 epoch of
warm-up and cosine decay over the step budget. ``train.target_acc`` stops a run at the first evaluation that
reaches the target (evaluations every ``budget / 30`` steps, at least 2, are not in the training clock).

At every batch, each optimizer runs a small grid of base LRs (given at the reference batch 256 and scaled to the
batch by the optimizer's rule: linear, square root for LAMB), back to back with the other optimizers so that the
load of the machine hits them alike; the tuned LR is the one with the fewest steps to the target (ties: higher
accuracy). K-FAC runs at the default intervals and damping; Neumann with the paper's constants (only η tuned, as
in the paper), its SGD burn-in shortened from the paper's 5 epochs to 10% of the step budget.

Goals (issue 7): K-FAC reaches the target in fewer steps than every first-order optimizer (SGD, LARS, LAMB) at the
two largest batches, and its time per step stays under 2x SGD's at the default intervals: per batch, the median
s/step of K-FAC's grid runs over the median of SGD's, under 2 at every batch. A run that does not reach
the target (or diverges) counts as "more than its budget".

The step budgets are what fits in about 15 minutes here; pass larger ``--steps`` for a fuller study. The load
average when every run starts is kept in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import time

import torch

from scalelab.config import load_config
from scalelab.data import load_dataset
from scalelab.errors import DivergenceError
from scalelab.train import train
from benchlib import loadavg, write_json

# base LR grids at the reference batch 256 (scaled to each batch by the optimizer's rule)
GRIDS = {  # factors of 2 around each optimizer's usual LR; 7 points so that the tuned LR is rarely on an edge
    "sgd": [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8],
    "lars": [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
    "lamb": [0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08],
    "kfac": [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8],
    "neumann": [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8],
}
SCALING = {"lamb": "sqrt"}
FIRST_ORDER = ("sgd", "lars", "lamb")
MODEL = ["model.name=mlp", "model.width=128", "model.depth=2", "train.threads=1"]


def _loadavg() -> float:
    return (loadavg() or [float("nan")])[0]


def run_one(data, opt: str, base_lr: float, batch: int, steps: int, target: float, overrides: list[str]) -> dict:
    eval_every = max(2, steps // 30)
    sets = [*MODEL, f"recipe.optimizer={opt}", f"recipe.base_lr={base_lr}", f"train.batch_size={batch}",
            f"train.max_steps={steps}", f"train.eval_every={eval_every}", f"train.target_acc={target}",
            f"recipe.scaling={SCALING.get(opt, 'linear')}", "train.progress=false", "train.log_every=1000",
            # Neumann's burn-in and period are in epochs (5 and 10 in the paper): scaled to this step budget
            f"recipe.neumann_burnin_epochs={0.1 * steps * batch / len(data.x_train):.4f}",
            *overrides]
    cfg = load_config(None, sets)
    load = _loadavg()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's per-run lines
            s = train(cfg, data=data)
    except DivergenceError as e:
        return {"optimizer": opt, "batch": batch, "base_lr": base_lr, "steps": None, "steps_to_target": None,
                "time_to_target_s": None, "s_per_step": None, "best_test_acc": 0.0, "diverged": str(e)[:200],
                "wall_s": time.perf_counter() - t0, "loadavg": load}
    return {"optimizer": opt, "batch": batch, "base_lr": base_lr, "steps": s["steps"],
            "steps_to_target": s["steps_to_target"], "time_to_target_s": s["time_to_target_s"],
            "s_per_step": s["train_s"] / max(s["steps"], 1), "best_test_acc": s["best_test_acc"],
            "wall_s": time.perf_counter() - t0, "loadavg": load}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="256,1024,4096,16384")
    ap.add_argument("--steps", default="400,200,100,60", help="step budget per batch (one value, or one per batch)")
    ap.add_argument("--optimizers", default="sgd,lars,lamb,kfac,neumann")
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--json", default="bench/results/optimizers.json")
    args = ap.parse_args(argv)

    batches = [int(b) for b in args.batches.split(",")]
    budgets = [int(s) for s in args.steps.split(",")]
    budgets = budgets * len(batches) if len(budgets) == 1 else budgets
    opts = args.optimizers.split(",")
    t_start = time.perf_counter()
    cfg = load_config(None, args.overrides)
    data = load_dataset(cfg.data)
    print(f"MNIST-1D {len(data.x_train)} train / {len(data.x_test)} test, {' '.join(MODEL)}, target test accuracy "
          f"{args.target}; load average {_loadavg():.1f} on {os.cpu_count()} cores", file=sys.stderr)
    print(f"step budgets {dict(zip(batches, budgets))}, {len(GRIDS[opts[0]])} base LRs per optimizer and batch",
          file=sys.stderr)

    runs, best = [], {}
    for i, (batch, budget) in enumerate(zip(batches, budgets)):
        for lr_i in range(max(len(GRIDS[o]) for o in opts)):
            order = opts[(i + lr_i) % len(opts):] + opts[: (i + lr_i) % len(opts)]   # rotate the order
            for opt in order:
                if lr_i >= len(GRIDS[opt]):
                    continue
                lr = GRIDS[opt][lr_i]
                r = run_one(data, opt, lr, batch, budget, args.target, args.overrides)
                runs.append(r)
                print(f"B={batch:<6d} {opt:8s} base_lr {lr:<7g} steps-to-target "
                      f"{_fmt(r['steps_to_target'], 'd'):>4s} of {budget}, "
                      f"{_fmt(r['s_per_step'], '.4f')} s/step, best acc {r['best_test_acc']:.4f}"
                      + (" (diverged)" if r.get("diverged") else ""), file=sys.stderr)
        for opt in opts:
            mine = [r for r in runs if r["optimizer"] == opt and r["batch"] == batch]
            best[(opt, batch)] = min(mine, key=lambda r: (r["steps_to_target"] is None,
                                                          r["steps_to_target"] or 0, -r["best_test_acc"]))

    def s_per_step(opt, batch):  # median over the grid runs at this batch (diverged runs excluded)
        return statistics.median(r["s_per_step"] for r in runs
                                 if r["optimizer"] == opt and r["batch"] == batch and r["s_per_step"])

    by = best


    def steps_or_inf(opt, batch):
        s = by[(opt, batch)]["steps_to_target"]
        return float("inf") if s is None else s

    # the table: one row per batch, steps-to-target / time-to-target per optimizer
    print(f"\nsteps to {args.target:.0%} test accuracy at the tuned LR (time to target in s; '>N (acc)': not "
          f"reached in the budget N, best accuracy)")
    print(f"{'batch':>6s} " + " ".join(f"{o:>16s}" for o in opts))
    for batch, budget in zip(batches, budgets):
        cells = []
        for o in opts:
            r = by[(o, batch)]
            cells.append(f">{budget} ({r['best_test_acc']:.2f})" if r["steps_to_target"] is None
                         else f"{r['steps_to_target']} ({r['time_to_target_s']:.1f}s)")
        print(f"{batch:>6d} " + " ".join(f"{c:>16s}" for c in cells))
    print("\ntuned base LR (at batch 256)")
    for batch in batches:
        print(f"{batch:>6d} " + " ".join(f"{by[(o, batch)]['base_lr']:16g}" for o in opts))
    edge = [f"{o}@{b}" for o in opts for b in batches
            if by[(o, b)]["steps_to_target"] is not None and by[(o, b)]["base_lr"] in (GRIDS[o][0], GRIDS[o][-1])]
    if edge:
        print(f"tuned LR at the edge of its grid (a wider grid might do better): {', '.join(edge)}")
    print("\nseconds per step (median over the grid)")
    for batch in batches:
        print(f"{batch:>6d} " + " ".join(f"{s_per_step(o, batch):16.4f}" for o in opts))

    verdict = {}
    if "kfac" in opts:
        big = sorted(batches)[-2:]
        first = [o for o in FIRST_ORDER if o in opts]
        fewer = {b: all(steps_or_inf("kfac", b) < steps_or_inf(o, b) for o in first) for b in big}
        verdict["kfac_fewer_steps_at_two_largest_batches"] = all(fewer.values())
        verdict["kfac_fewer_steps_per_batch"] = {str(b): v for b, v in fewer.items()}
        if "sgd" in opts:
            ratios = [s_per_step("kfac", b) / s_per_step("sgd", b) for b in batches]
            verdict["kfac_over_sgd_s_per_step"] = {str(b): r for b, r in zip(batches, ratios)}
            verdict["kfac_over_sgd_s_per_step_median"] = statistics.median(ratios)
            verdict["kfac_over_sgd_s_per_step_max"] = max(ratios)
            verdict["kfac_time_per_step_under_2x_sgd"] = max(ratios) < 2.0   # at every batch
        print(f"\ngoal 1, K-FAC fewer steps than {', '.join(first)} at batches {big}: "
              f"{'MET' if verdict['kfac_fewer_steps_at_two_largest_batches'] else 'NOT MET'} "
              f"({', '.join(f'B={b}: {v}' for b, v in fewer.items())})")
        if "sgd" in opts:
            print(f"goal 2, K-FAC s/step < 2x SGD at every batch (intervals factor_every="
                  f"{cfg.recipe.kfac_factor_every}, inverse_every={cfg.recipe.kfac_inverse_every}, method "
                  f"{cfg.recipe.kfac_method}): largest ratio {verdict['kfac_over_sgd_s_per_step_max']:.2f}x, "
                  f"median {verdict['kfac_over_sgd_s_per_step_median']:.2f}x -> "
                  f"{'MET' if verdict['kfac_time_per_step_under_2x_sgd'] else 'NOT MET'}")

    result = {
        "benchmark": "optimizers",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "dataset": {"name": cfg.data.name, "n_train": len(data.x_train), "n_test": len(data.x_test)},
        "model": MODEL, "overrides": args.overrides, "target_acc": args.target,
        "batches": batches, "step_budgets": budgets, "grids": {o: GRIDS[o] for o in opts},
        "scaling": {o: SCALING.get(o, "linear") for o in opts},
        "best": {f"{o}@{b}": r for (o, b), r in best.items()},
        "s_per_step_median": {f"{o}@{b}": s_per_step(o, b) for o in opts for b in batches},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "loadavg_end": list(os.getloadavg()), "total_s": time.perf_counter() - t_start,
        "verdict": verdict, "tuned_lr_at_grid_edge": edge, "runs": runs,
    }
    write_json(result, args.json)
    print(f"({result['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
