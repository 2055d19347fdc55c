"""Data-parallel scaling: samples/s at 1, 2 and 4 workers, scalelab against a plain hand-written DDP script.

    python bench/scaling.py [--workers 1,2,4] [--repeats 3] [--steps 300] [--set section.key=value ...]
                            [--json PATH]

At every N, two jobs train the same config (default cnn1d on MNIST-1D, global batch B = 256, B/N per worker)
for the same number of steps, each started as N processes by torch's elastic launcher with the same settings:
- ``scalelab``: ``scalelab train --nproc N --no-progress`` (its run directory, metrics log, evaluation per
  epoch and checkpoints included; its figure is ``train_samples_per_s`` from summary.json, training steps
  only);
- ``plain``: ``bench/plain_ddp.py``, a minimal torchrun-style script (gloo, ``DistributedDataParallel``,
  ``torch.optim.SGD``, same model, data order and sharding, same threads per worker), timing its training
  steps.
With N = 1 neither makes a process group or a DDP wrapper (scalelab runs in the launching process).

Runs alternate (scalelab then plain at each N, the order swapped every other repeat) so that load from other
processes on this shared machine hits both alike; figures are medians over the repeats. Reported per N:
samples/s of both, the ratio scalelab/plain (goal >= 0.95; also the median of the ratios of the back-to-back
pairs, which is less sensitive to slow drifts of the load), speedup ``S(N) / S(1)`` and scaling efficiency
``S(N) / (N * S(1))`` of each loop, and scalelab's compute/communication split from summary.json (``comm_s``:
time waiting for communication not hidden behind backward;
``compute_s``: the rest of the training clock). The load average when each run starts is kept in the JSON.
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
import time
from pathlib import Path

import torch
from benchlib import loadavg, write_json

PLAIN = Path(__file__).resolve().with_name("plain_ddp.py")


def _loadavg() -> float:
    return (loadavg() or [float("nan")])[0]


class RunFailed(RuntimeError):
    """A run of either loop exited with an error (kept in the JSON; the run is tried once more)."""


def _errors(stderr: str) -> str:
    """The lines of a failed run's stderr that say what went wrong (not the launcher's whole report)."""
    keys = ("error", "terminate", "abort", "exception", "signal", "timed out", "connection")
    lines = [ln.strip() for ln in stderr.splitlines() if any(k in ln.lower() for k in keys)]
    return " | ".join(lines[:12])[:3000] or stderr[-2000:]


def run_scalelab(nproc: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        sets = [a for o in overrides for a in ("--set", o)]
        load = _loadavg()
        proc = subprocess.run([sys.executable, "-m", "scalelab", "train", "--nproc", str(nproc),
                               "--out", str(out), "--no-progress", *sets],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RunFailed(f"scalelab run failed ({nproc} workers): {_errors(proc.stderr)}")
        s = json.loads((out / "summary.json").read_text())
    return {"samples_per_s": s["train_samples_per_s"], "train_s": s["train_s"], "comm_s": s["comm_s"],
            "compute_s": s["compute_s"], "comm_bytes": s["comm_bytes"], "steps": s["steps"],
            "final_test_acc": s["final_test_acc"], "loadavg": load}


def run_plain(nproc: int, overrides: list[str]) -> dict:
    sets = [a for o in overrides for a in ("--set", o)]
    load = _loadavg()
    proc = subprocess.run([sys.executable, str(PLAIN), "--nproc", str(nproc), *sets], capture_output=True,
                          text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RunFailed(f"plain DDP run failed ({nproc} workers): {_errors(proc.stderr)}")
    r = json.loads(lines[-1])
    return {"samples_per_s": r["samples_per_s"], "train_s": r["train_s"], "steps": r["steps"],
            "final_test_acc": r["final_test_acc"], "loadavg": load}


def _commit() -> str | None:
    """The scalelab commit measured (with ``+dirty`` when the source tree has uncommitted changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


RUNNERS = {"scalelab": run_scalelab, "plain": run_plain}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (default 1,2,4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="training steps per run (train.max_steps)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--json", default="bench/results/scaling.json")
    args = ap.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    overrides = [f"train.max_steps={args.steps}", *args.overrides]

    from scalelab.config import load_config
    from scalelab.data import load_dataset

    cfg = load_config(None, overrides)
    for n in workers:
        if cfg.train.batch_size % n:
            raise SystemExit(f"train.batch_size {cfg.train.batch_size} is not divisible by {n} workers")
    load_dataset(cfg.data)  # generate or download once, before anything is timed
    t_start = time.perf_counter()
    # one untimed warm-up of each (imports, page cache, the launcher's first start)
    warm = [*overrides, "train.max_steps=10"]
    for name, fn in RUNNERS.items():
        fn(min(2, max(workers)), warm)

    runs: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in workers} for name in RUNNERS}
    pair_ratios: dict[int, list[float]] = {n: [] for n in workers}
    failures: list[dict] = []
    for r in range(args.repeats):
        for n in workers:
            order = ("scalelab", "plain") if r % 2 == 0 else ("plain", "scalelab")
            for name in order:
                try:
                    res = RUNNERS[name](n, overrides)
                except RunFailed as e:  # once more; a second failure stops the benchmark
                    failures.append({"repeat": r + 1, "workers": n, "loop": name, "error": str(e)})
                    print(f"repeat {r + 1}/{args.repeats} N={n} {name}: {e}; running it again",
                          file=sys.stderr)
                    res = RUNNERS[name](n, overrides)
                runs[name][n].append(res)
                extra = (f", comm {res['comm_s']:.2f} s of {res['train_s']:.2f} s" if name == "scalelab" else
                         f", {res['train_s']:.2f} s")
                print(f"repeat {r + 1}/{args.repeats} N={n} {name:8s}: {res['samples_per_s']:8.0f} samples/s"
                      f"{extra}, test acc {res['final_test_acc']:.4f}, load {res['loadavg']:.1f}",
                      file=sys.stderr)
            sl, pl = runs["scalelab"][n][-1], runs["plain"][n][-1]
            pair_ratios[n].append(sl["samples_per_s"] / pl["samples_per_s"])

    def med(name: str, n: int, key: str) -> float:
        return statistics.median(x[key] for x in runs[name][n])

    n1 = workers[0]
    rows = []
    for n in workers:
        s, p = med("scalelab", n, "samples_per_s"), med("plain", n, "samples_per_s")
        comm, compute, train_s = med("scalelab", n, "comm_s"), med("scalelab", n, "compute_s"), \
            med("scalelab", n, "train_s")
        rows.append({
            "workers": n, "scalelab_samples_per_s": s, "plain_samples_per_s": p, "ratio": s / p,
            "pair_ratio_median": statistics.median(pair_ratios[n]),
            "scalelab_speedup": s / med("scalelab", n1, "samples_per_s"),
            "plain_speedup": p / med("plain", n1, "samples_per_s"),
            "scalelab_efficiency": s / (n / n1 * med("scalelab", n1, "samples_per_s")),
            "plain_efficiency": p / (n / n1 * med("plain", n1, "samples_per_s")),
            "scalelab_train_s": train_s, "scalelab_comm_s": comm, "scalelab_compute_s": compute,
            "scalelab_comm_frac": statistics.median(x["comm_s"] / x["train_s"] for x in runs["scalelab"][n]),
            "scalelab_comm_bytes_per_step": med("scalelab", n, "comm_bytes") / med("scalelab", n, "steps"),
            "plain_train_s": med("plain", n, "train_s"),
            "scalelab_range": [min(x["samples_per_s"] for x in runs["scalelab"][n]),
                               max(x["samples_per_s"] for x in runs["scalelab"][n])],
            "plain_range": [min(x["samples_per_s"] for x in runs["plain"][n]),
                            max(x["samples_per_s"] for x in runs["plain"][n])],
        })
    result = {
        "benchmark": "scaling",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "bench/scaling.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": cfg.to_dict(),
        "steps": cfg.train.max_steps,
        "repeats": args.repeats,
        "commit": _commit(),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "bench_wall_s": time.perf_counter() - t_start,
        "rows": rows,
        "failed_runs": failures,
        "runs": {name: {str(n): v for n, v in d.items()} for name, d in runs.items()},
    }

    print(f"\n{cfg.model.name} on {cfg.data.name}, B={cfg.train.batch_size}, {cfg.train.max_steps} steps, "
          f"{os.cpu_count()} cores, medians of {args.repeats}")
    print(f"{'N':>2s} {'scalelab/s':>11s} {'plain/s':>9s} {'ratio':>6s} {'pairs':>6s} {'speedup sl/pl':>14s} "
          f"{'eff sl/pl':>10s} {'comm s':>7s} {'compute s':>9s} {'comm %':>7s} {'KB/step':>8s}")
    for w in rows:
        print(f"{w['workers']:2d} {w['scalelab_samples_per_s']:11.0f} {w['plain_samples_per_s']:9.0f} "
              f"{w['ratio']:6.3f} {w['pair_ratio_median']:6.3f} "
              f"{w['scalelab_speedup']:9.2f}/{w['plain_speedup']:4.2f} "
              f"{w['scalelab_efficiency']:5.2f}/{w['plain_efficiency']:4.2f} "
              f"{w['scalelab_comm_s']:7.2f} {w['scalelab_compute_s']:9.2f} "
              f"{100 * w['scalelab_comm_frac']:6.1f}% {w['scalelab_comm_bytes_per_step'] / 1024:8.1f}")
    worst = min(w["ratio"] for w in rows)
    print(f"ratio scalelab/plain: worst {worst:.3f} over N (goal >= 0.95); speedup = S(N) / S(1), "
          f"efficiency = speedup / N; "
          f"bench wall {result['bench_wall_s']:.0f} s")
    if os.cpu_count() and max(workers) > os.cpu_count():
        print(f"note: N > {os.cpu_count()} cores oversubscribes the machine (workers share cores).")
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
