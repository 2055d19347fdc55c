"""Overhead of scalelab's training loop against a plain hand-written PyTorch loop, measured in the same run.

    python bench/overhead.py [--repeats 3] [--epochs 3] [--set section.key=value ...] [--json PATH]

Both loops train the same model (built by scalelab.models), on the same in-memory data, with the same global
batch, learning-rate schedule and number of steps, on the same threads. Runs alternate (scalelab, plain,
scalelab, plain, ...) so that load from other processes on this shared machine hits both alike, and the figures
are medians over the repeats.

Two ratios are reported:
- ``train_ratio``: training samples/s, each loop timing only its training steps (scalelab's train clock;
  the plain loop's steps). Goal: scalelab >= 0.95 of plain.
- ``wall_ratio``: wall time of the whole loop, each evaluating once per epoch; scalelab also writes its metrics
  log, TensorBoard events, a checkpoint per epoch and the progress bar (what a user gets).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scalelab.config import load_config
from scalelab.data import batch_indices, epoch_order, load_dataset, steps_per_epoch
from scalelab.models import build_model
from scalelab.recipe import build_schedule
from scalelab.train import evaluate, train
from benchlib import write_json


def plain_loop(cfg, data) -> dict:
    """The loop a PyTorch user writes by hand: torch.optim.SGD, same model, data order and schedule."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=cfg.recipe.momentum,
                          nesterov=cfg.recipe.nesterov, weight_decay=cfg.recipe.weight_decay)
    B = t.batch_size
    spe = steps_per_epoch(len(data.x_train), B)
    total = t.max_steps or math.ceil(t.epochs * spe)
    sched = build_schedule(cfg.recipe, B, spe, total)
    train_s, wall0 = 0.0, time.perf_counter()
    model.train()
    for step in range(total):
        t0 = time.perf_counter()
        epoch, k = divmod(step, spe)
        if k == 0:
            order = epoch_order(len(data.x_train), t.seed, epoch)
        idx = batch_indices(order, k, B)
        for g in opt.param_groups:
            g["lr"] = sched(step)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t0
        if (step + 1) % spe == 0 or step + 1 == total:
            _, acc, _ = evaluate(model, data.x_test, data.y_test, t.eval_batch)
    wall = time.perf_counter() - wall0
    return {"samples_per_s": total * B / train_s, "wall_s": wall, "final_test_acc": acc}


def scalelab_loop(cfg, data) -> dict:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        s = train(cfg, Path(d) / "run", data=data)
        wall = time.perf_counter() - t0
    return {"samples_per_s": s["train_samples_per_s"], "wall_s": wall, "final_test_acc": s["final_test_acc"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--json", default="bench/results/overhead.json")
    args = ap.parse_args(argv)

    cfg = load_config(None, [f"train.epochs={args.epochs}", "train.progress=false", *args.overrides])
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    data = load_dataset(cfg.data)
    # one untimed warm-up of each, so one-time costs (allocator, thread pools, imports) hit neither figure
    warm = load_config(None, [*[f"{o}" for o in args.overrides], "train.max_steps=5", "train.progress=false"])
    plain_loop(warm, data)
    scalelab_loop(warm, data)

    runs = {"scalelab": [], "plain": []}
    for r in range(args.repeats):
        for name, fn in (("scalelab", scalelab_loop), ("plain", plain_loop)):
            res = fn(cfg, data)
            runs[name].append(res)
            print(f"repeat {r + 1}/{args.repeats} {name:8s}: {res['samples_per_s']:9.0f} samples/s train, "
                  f"{res['wall_s']:6.2f} s wall, test acc {res['final_test_acc']:.4f}", file=sys.stderr)

    med = {n: {k: statistics.median(x[k] for x in v) for k in v[0]} for n, v in runs.items()}
    result = {
        "benchmark": "overhead",
        "config": cfg.to_dict(),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "scalelab_samples_per_s": med["scalelab"]["samples_per_s"],
        "plain_samples_per_s": med["plain"]["samples_per_s"],
        "train_ratio": med["scalelab"]["samples_per_s"] / med["plain"]["samples_per_s"],
        "scalelab_wall_s": med["scalelab"]["wall_s"],
        "plain_wall_s": med["plain"]["wall_s"],
        "wall_ratio": med["plain"]["wall_s"] / med["scalelab"]["wall_s"],
        "runs": runs,
    }
    print(f"\n{'':10s} {'samples/s (train)':>18s} {'wall s':>8s}")
    print(f"{'scalelab':10s} {result['scalelab_samples_per_s']:18.0f} {result['scalelab_wall_s']:8.2f}")
    print(f"{'plain':10s} {result['plain_samples_per_s']:18.0f} {result['plain_wall_s']:8.2f}")
    print(f"train throughput ratio scalelab/plain = {result['train_ratio']:.3f} (goal >= 0.95); "
          f"wall-speed ratio = {result['wall_ratio']:.3f}")
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
