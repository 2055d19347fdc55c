"""Sync or async? Six ways for 4 workers to train the same model on the same data, under the same stragglers.

    python bench/sync_vs_async.py [--target-acc 0.97] [--repeats 1] [--set section.key=value ...]
    python bench/sync_vs_async.py --net 1gbit,100mbit --scenarios none,one-slow --merge   # emulated hosts (root)

The recipe is scalelab's default (cnn1d on MNIST-1D, SGD with Nesterov momentum, cosine schedule), global batch
B = 192, 3 epochs at most, stopping at the target test accuracy (evaluated every 25 global batches). Modes:

- ``sync``: 4 workers, all-reduce every step (DDP);
- ``backup``: sync with backup workers (Chen et al. 2016), 4 workers of which the first 3 to finish make a step;
- ``async``: 1 parameter server + 4 workers, Downpour (Dean et al. 2012), updates of B/4 samples;
- ``ssp``: the same with stale synchronous parallel, bound s = 2 (Ho et al. 2013);
- ``hybrid``: 1 server + 2 groups of 2 workers, sync inside a group, async across (Kurth et al. 2017);
- ``localsgd``: 4 workers averaging their models every 4 steps (Stich 2019; Lin et al. 2020).

Scenarios (``scalelab.parallel.stragglers``): no stragglers; one slow worker (worker 1 sleeps 30 ms every step);
heavy-tailed delays (every worker, with probability 0.3 per step, a Pareto delay of scale 4 ms, tail index 1.2).
Figures per run: time-to-target on the training clock (excluding evaluation and checkpoints, as in every scalelab
summary), samples to target, final and best test accuracy, mean staleness; medians over repeats, and each mode's
time-to-target as a ratio to sync's in the same scenario. Processes: sync, backup and localsgd run 4, the
parameter-server modes 5 (the server is one more process); the machine has 2 cores, which the numbers reflect.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from benchlib import loadavg, write_json

REPO = Path(__file__).resolve().parents[1]
MULTINODE = REPO / "scripts" / "multinode_train.sh"

SCENARIOS = {
    "none": [],
    "one-slow": ["stragglers.dist=fixed", "stragglers.rank=1", "stragglers.delay_s=0.03"],
    "heavy-tail": ["stragglers.dist=pareto", "stragglers.delay_s=0.004", "stragglers.shape=1.2",
                   "stragglers.prob=0.3"],
}
MODES = {
    "sync": (4, []),
    "backup": (4, ["parallel.backup_workers=1"]),
    "async": (5, ["parallel.mode=async"]),
    "ssp": (5, ["parallel.mode=ssp", "parallel.staleness_bound=2"]),
    "hybrid": (5, ["parallel.mode=hybrid", "parallel.group_size=2"]),
    "localsgd": (4, ["parallel.mode=localsgd", "parallel.local_period=4"]),
}


def run(nproc: int, overrides: list[str], net: str = "local", delay: str = "") -> dict:
    """One training run; ``net`` is ``local`` (``--nproc`` on loopback) or a tc rate for one process per host."""
    load = loadavg()
    with tempfile.TemporaryDirectory(prefix="sva-") as d:
        out = Path(d) / "run"
        args = [a for o in overrides for a in ("--set", o)]
        env = dict(os.environ)
        if net == "local":
            cmd = [sys.executable, "-m", "scalelab", "train", "--nproc", str(nproc), "--out", str(out)]
        else:  # one thread per process, as --nproc gives 4-5 processes on 2 cores
            env.update({"OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "SL_NETNS_PREFIX": "sva-",
                        "SL_NETNS_SUBNET": "10.95.0"})
            args += ["--set", "train.threads=1"]
            cmd = ["bash", str(MULTINODE), str(nproc), "--rate", net, *(["--delay", delay] if delay else []),
                   "--timeout", "600", "--", "--out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, "--no-progress", *args], capture_output=True, text=True, timeout=900, env=env)
        if proc.returncode != 0 or not (out / "summary.json").exists():
            text = (proc.stdout + proc.stderr).strip()
            return {"failed": text.splitlines()[-1][:300] if text else "failed", "loadavg": load}
        summary = json.loads((out / "summary.json").read_text())
        summary["process_wall_s"] = time.perf_counter() - t0
        summary["loadavg"] = load
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                 if '"kind": "eval"' in line]
        summary["curve"] = [(e["train_s"], e["samples"], e["test_acc"]) for e in evals]
        return summary


def _med(results: list[dict], key: str):
    vals = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def plot(rows: list[dict], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys((r["net"], r["scenario"]) for r in rows))
    fig, axes = plt.subplots(2, len(columns), figsize=(5 * len(columns), 8), squeeze=False)
    for col, (net, scenario) in enumerate(columns):
        mine = [r for r in rows if (r["net"], r["scenario"]) == (net, scenario)]
        where = "" if net == "local" else f" ({net} hosts)"
        ax = axes[0][col]
        names = [r["mode"] for r in mine]
        ttt = [r["time_to_target_s"] or 0 for r in mine]
        bars = ax.bar(names, ttt, color=[f"C{list(MODES).index(n)}" for n in names])
        for b, r in zip(bars, mine):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(),
                    "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{scenario}{where}: time to {target:.0%} (s)", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax = axes[1][col]
        for r in mine:
            curve = r["runs"][0].get("curve") or [] if r["runs"] else []
            if curve:
                ax.plot([p[0] for p in curve], [p[2] for p in curve], "o-", ms=2, label=r["mode"],
                        color=f"C{list(MODES).index(r['mode'])}")
        ax.axhline(target, color="grey", ls=":", lw=1)
        ax.set_ylim(0.5, 1.0)
        ax.set_xlabel("training clock (s)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarize(runs: list[dict], target: float) -> list[dict]:
    """One row per (network, scenario, mode): medians over its runs."""
    keys = list(dict.fromkeys((r["net"], r["scenario"], r["mode"]) for r in runs))
    rows = []
    for net, scenario, mode in keys:
        mine = [r for r in runs if (r["net"], r["scenario"], r["mode"]) == (net, scenario, mode)]
        ok = [r for r in mine if "failed" not in r]
        row = {"net": net, "scenario": scenario, "mode": mode, "processes": MODES[mode][0], "runs": mine,
               "failed": [r["failed"] for r in mine if "failed" in r],
               "time_to_target_s": _med(ok, "time_to_target_s"),
               "final_test_acc": _med(ok, "final_test_acc"), "best_test_acc": _med(ok, "best_test_acc"),
               "train_s": _med(ok, "train_s"), "samples_seen": _med(ok, "samples_seen"),
               "comm_bytes": _med(ok, "comm_bytes"),
               "staleness_mean": _med(ok, "staleness_mean"), "staleness_max": _med(ok, "staleness_max"),
               "reached": sum(1 for r in ok if r.get("time_to_target_s") is not None)}
        # samples at the first evaluation that reached the target (comparable across modes)
        hit = [next((p[1] for p in r["curve"] if p[2] >= target), None) for r in ok]
        hit = [h for h in hit if h is not None]
        row["samples_to_target"] = statistics.median(hit) if hit else None
        rows.append(row)
    return rows


def table(rows: list[dict], target: float) -> str:
    lines = []
    for net in dict.fromkeys(r["net"] for r in rows):
        mine = [r for r in rows if r["net"] == net]
        scenarios = list(dict.fromkeys(r["scenario"] for r in mine))
        where = "loopback, --nproc" if net == "local" else f"one process per emulated host, links of {net}"
        lines.append(f"\n{where}: time to {target:.0%} test accuracy (s, training clock, median of n runs), "
                     f"ratio to sync in brackets; final test accuracy")
        lines.append(f"{'mode':10s}" + "".join(f"{s:>34s}" for s in scenarios))
        for mode in dict.fromkeys(r["mode"] for r in mine):
            cells = []
            for scenario in scenarios:
                r = next((x for x in mine if x["scenario"] == scenario and x["mode"] == mode), None)
                s = next((x for x in mine if x["scenario"] == scenario and x["mode"] == "sync"), None)
                if r is None:
                    cells.append("-")
                    continue
                n = len(r["runs"]) - len(r["failed"])
                if r["time_to_target_s"] is None:
                    cells.append(f"{'not reached':>14s} acc {r['final_test_acc'] or float('nan'):.4f} n={n}")
                    continue
                ratio = (f"({r['time_to_target_s'] / s['time_to_target_s']:.2f})"
                         if s and s["time_to_target_s"] else "")
                cells.append(f"{r['time_to_target_s']:7.2f} {ratio:>6s} acc {r['final_test_acc']:.4f} n={n}")
            lines.append(f"{mode:10s}" + "".join(f"{c:>34s}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-acc", type=float, default=0.97)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--net", default="local",
                    help="comma list: local (loopback --nproc) and/or tc rates for one process per emulated host, "
                         "e.g. 1gbit,100mbit (needs root)")
    ap.add_argument("--delay", default="", help="tc netem delay on every emulated link, e.g. 2ms")
    ap.add_argument("--merge", action="store_true", help="add these runs to those already in --json")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--json", default=None,
                    help="default: bench/results/sync_vs_async.json (local), sync_vs_async_net.json (--net rates)")
    args = ap.parse_args(argv)
    nets = args.net.split(",")
    bad = [n for n in nets if n != "local" and not re.fullmatch(r"\d+(\.\d+)?[kmg]bit", n)]
    if bad:
        ap.error(f"--net: {', '.join(bad)} is not local or a tc rate such as 100mbit, 1gbit, 10gbit")
    scenarios, modes = args.scenarios.split(","), args.modes.split(",")
    for name, allowed, given in (("--scenarios", SCENARIOS, scenarios), ("--modes", MODES, modes)):
        bad = [g for g in given if g not in allowed]
        if bad:
            ap.error(f"{name}: unknown {', '.join(bad)}; allowed: {', '.join(allowed)}")
    if any(n != "local" for n in nets) and os.geteuid() != 0:
        ap.error("--net with emulated hosts needs root (ip netns, tc)")
    json_path = Path(args.json or ("bench/results/sync_vs_async.json" if nets == ["local"]
                                   else "bench/results/sync_vs_async_net.json"))
    base = [f"train.target_acc={args.target_acc}", "train.batch_size=192", "train.epochs=3",
            "train.eval_every=25", *args.overrides]
    old = json.loads(json_path.read_text()) if args.merge and json_path.exists() else None
    runs = []
    for row in old["rows"] if old else []:
        for r in row["runs"]:  # results written before runs carried their tags: the row's
            runs.append({"net": row.get("net", "local"), "scenario": row["scenario"], "mode": row["mode"], **r})
    t_bench = time.perf_counter()
    load_before = loadavg()
    n_new = len(nets) * len(scenarios) * args.repeats * len(modes)
    for net in nets:
        for scenario in scenarios:
            for _ in range(args.repeats):  # alternate the modes inside each repeat
                for mode in modes:
                    nproc, extra = MODES[mode]
                    r = run(nproc, base + SCENARIOS[scenario] + extra, net, args.delay)
                    r.update({"net": net, "scenario": scenario, "mode": mode})
                    runs.append(r)
                    ttt = r.get("time_to_target_s")
                    print(f"{net:8s} {scenario:10s} {mode:8s} "
                          + (f"FAILED {r['failed']}" if "failed" in r else
                             f"time-to-{args.target_acc} {'not reached' if ttt is None else f'{ttt:.2f}':>11s} s"
                             f"  final acc {r['final_test_acc']:.4f}  staleness {r.get('staleness_mean')}"
                             f"  comm {r['comm_bytes'] / 1e6:.1f} MB  wall {r['process_wall_s']:.0f} s")
                          + f"  (load {r['loadavg'][0]:.2f})", file=sys.stderr, flush=True)
    if not any("failed" not in r for r in runs[len(runs) - n_new:]):
        print(f"sync_vs_async: all {n_new} runs failed (above); {json_path} is left as it was", file=sys.stderr)
        return 1
    rows = summarize(runs, args.target_acc)
    print(table(rows, args.target_acc))
    png = json_path.with_suffix(".png")
    plot(rows, png, args.target_acc)
    sessions = (old.get("sessions", []) if old else []) + [{
        "nets": nets, "scenarios": scenarios, "modes": modes, "repeats": args.repeats, "delay": args.delay,
        "loadavg_before": load_before, "loadavg_after": loadavg(), "bench_wall_s": time.perf_counter() - t_bench}]
    write_json({"benchmark": "sync_vs_async", "target_acc": args.target_acc, "cpu_count": os.cpu_count(),
                "base_overrides": base, "sessions": sessions, "rows": rows}, json_path, indent=1)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
