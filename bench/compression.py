"""Gradient compression on an emulated slow network: every method against dense all-reduce and PowerSGD.

    python bench/compression.py [--nodes 2] [--rates 1gbit,10gbit,loopback] [--target 0.6] [--methods a,b]
                                [--methods-all-at 1gbit] [--json PATH] [--plot PATH]

Needs root (network namespaces, tc). For each link rate, each method trains the same job: a wide MLP on MNIST-1D
(``mlp``, width 1536, depth 2: 2.45 M parameters, 9.8 MB of float32 gradients, so at 1 Gbit/s the dense all-reduce
takes longer than the computation of a step), global batch 64 (32 per worker: on a CPU the batch per worker must
be small for the all-reduce to dominate a step), SGD with Nesterov momentum 0.9, LR 0.05, cosine, 300 steps. One worker per emulated host: ``scripts/multinode_train.sh N --rate RATE`` makes N network
namespaces on a bridge with a token-bucket-shaped link each (tc tbf), runs ``scalelab train`` in each through
torchrun, and tears them down whatever happens. ``loopback`` is ``scalelab train --nproc N`` (gloo over the
machine's loopback, no shaping).

Per run: gradient bytes sent per step by one worker after the warm-up (``compress_bytes_after_warmup`` over the
steps after ``compress.warmup_steps``; for dense, ``comm_bytes`` per step), the compression ratio against dense
from the same run (``compression_ratio``), the median step time (global batch over the median samples/s of the
logged intervals, the first interval dropped), time-to-target accuracy (training clock at the first evaluation
with test accuracy >= ``--target``; evaluations every 25 steps, not timed), final test accuracy. One run per
(rate, method): the machine is 2 shared cores; the load average at the start of every run is in the JSON.

The full method list runs at the rates in ``--methods-all-at``; elsewhere dense, DGC and PowerSGD (to keep
the whole benchmark near 20 minutes on 2 shared cores). The goals of issue 4 are checked at 1 Gbit/s and printed as met / not met.
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

REPO = Path(__file__).resolve().parents[1]
MULTINODE = REPO / "scripts" / "multinode_train.sh"

ALL = ["none", "dgc", "topk", "randomk", "signsgd", "efsign", "qsgd", "terngrad", "powersgd", "fp16", "bf16"]
SUBSET = ["none", "dgc", "powersgd"]
LABEL = {"none": "dense all-reduce"}

BASE = ["data.name=mnist1d", "model.name=mlp", "model.width=1536", "model.depth=2", "train.batch_size=64",
        "recipe.base_lr=0.05", "recipe.base_batch=64", "recipe.warmup_epochs=0.1", "train.max_steps=300",
        "train.eval_every=25", "train.log_every=25", "train.threads=1", "train.progress=false",
        "train.checkpoint_every=100000", "compress.warmup_steps=20", "compress.min_numel=4096"]
PER_METHOD = {
    "dgc": ["compress.density=0.001", "compress.dgc_warmup_epochs=0.2"],
    "topk": ["compress.density=0.001"],
    "randomk": ["compress.density=0.01"],
    "powersgd": ["compress.powersgd_rank=2"],
    "qsgd": ["compress.qsgd_levels=16"],
}


def run_one(method: str, rate: str, nodes: int, target: float, port: int, extra: list[str]) -> dict:
    gbit = {"100mbit": 0.1, "1gbit": 1.0, "10gbit": 10.0}.get(rate, 10.0)
    sets = BASE + [f"compress.method={method}", f"compress.link_gbit={gbit}"] + PER_METHOD.get(method, []) + extra
    args = [a for s in sets for a in ("--set", s)]
    load = loadavg()
    with tempfile.TemporaryDirectory(prefix="c4bench-") as d:
        out = Path(d) / "run"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SL_NETNS_PREFIX": "c4b-", "SL_NETNS_SUBNET": "10.94.0",
               "PYTHON": sys.executable}
        if rate == "loopback":
            cmd = [sys.executable, "-m", "scalelab", "train", "--nproc", str(nodes), "--out", str(out), *args]
        else:
            if rate == "10gbit":
                env["SL_TBF_BURST"] = "2mb"  # a 256 kb bucket cannot feed 10 Gbit/s at 1 kHz timer granularity
            cmd = ["bash", str(MULTINODE), str(nodes), "--rate", rate, "--port", str(port), "--timeout", "600",
                   "--", "--out", str(out), *args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not (out / "summary.json").exists():
            return {"method": method, "rate": rate, "error": (proc.stdout + proc.stderr)[-3000:], "loadavg": load}
        s = json.loads((out / "summary.json").read_text())
        recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["kind"] == "eval"]
    comp = [r for r in recs if r["kind"] == "compress"]
    trains = [r for r in recs if r["kind"] == "train"][1:]
    B = s["global_batch"]
    step_s = B / statistics.median(r["samples_per_s"] for r in trains) if trains else None
    ttt = next((r["train_s"] for r in evals if r["test_acc"] >= target), None)
    warm = 20
    if method == "none":
        bytes_step = s["comm_bytes"] / s["steps"]
    else:
        bytes_step = s["compress_bytes_after_warmup"] / max(1, s["steps"] - warm)
    steady = comp[-1]["bytes"] if comp else bytes_step  # the last logged step: final density, after warm-ups
    return {"method": method, "rate": rate, "bytes_per_step": bytes_step, "steady_bytes_per_step": steady,
            "compression_ratio": s.get("compression_ratio"), "step_s": step_s, "time_to_target_s": ttt,
            "final_test_acc": s["final_test_acc"], "best_test_acc": s["best_test_acc"], "train_s": s["train_s"],
            "comm_s": s["comm_s"], "comm_bytes": s["comm_bytes"], "steps": s["steps"],
            "encode_s": s.get("compress_encode_s"), "decode_s": s.get("compress_decode_s"),
            "density": s.get("compress_density"), "sparse_calls": s.get("compress_sparse_calls"),
            "dense_calls": s.get("compress_dense_calls"), "wall_s": wall, "loadavg": load,
            "curve": [(r["train_s"], r["test_acc"]) for r in evals]}


def goals(results: list[dict], rate: str = "1gbit") -> dict:
    at = {r["method"]: r for r in results if r["rate"] == rate and "error" not in r}
    d, g, p = at.get("none"), at.get("dgc"), at.get("powersgd")
    if not (d and g):
        return {"checked": False, "why": f"dense or dgc missing at {rate}"}
    out = {"checked": True, "rate": rate}
    ratio = d["bytes_per_step"] / g["steady_bytes_per_step"]
    out["traffic_reduction"] = ratio  # at DGC's final density (after its sparsity warm-up)
    out["traffic_reduction_run_average"] = d["bytes_per_step"] / g["bytes_per_step"]
    out["traffic_goal_100x"] = ratio >= 100
    out["accuracy_gap_pp"] = 100 * (d["final_test_acc"] - g["final_test_acc"])
    out["accuracy_goal_0.5pp"] = out["accuracy_gap_pp"] <= 0.5
    if d["time_to_target_s"] and g["time_to_target_s"]:
        out["tta_speedup_vs_dense"] = d["time_to_target_s"] / g["time_to_target_s"]
        out["tta_goal_3x"] = out["tta_speedup_vs_dense"] >= 3
    else:
        out["tta_goal_3x"] = False
        out["tta_note"] = "dense or dgc did not reach the target"
    if p and p["time_to_target_s"] and g["time_to_target_s"]:
        out["tta_speedup_vs_powersgd"] = p["time_to_target_s"] / g["time_to_target_s"]
        out["faster_than_powersgd"] = out["tta_speedup_vs_powersgd"] > 1
    elif p is None:
        out["faster_than_powersgd"] = None
        out["powersgd_note"] = f"no PowerSGD run at {rate}"
    else:  # one of them did not reach the target: faster only if DGC did
        out["faster_than_powersgd"] = bool(g["time_to_target_s"])
    return out


def plot(results: list[dict], rates: list[str], path: Path, target: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(range(len(rates)))
    for m in ALL:
        ys = []
        for rate in rates:
            r = next((r for r in results if r["method"] == m and r["rate"] == rate and "error" not in r), None)
            ys.append(r["time_to_target_s"] if r and r["time_to_target_s"] else float("nan"))
        if all(y != y for y in ys):
            continue
        ax.plot(xs, ys, marker="o", label=LABEL.get(m, m), lw=2.5 if m in ("none", "dgc", "powersgd") else 1)
    ax.set_xticks(xs, rates)
    ax.set_xlabel("link rate per host (tc tbf); loopback = no shaping")
    ax.set_ylabel(f"time to {target:.0%} test accuracy (s, training clock)")
    ax.set_yscale("log")
    ax.set_title("MNIST-1D, MLP 2.45 M params, 2 workers, B=64: time-to-accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--rates", default="1gbit,10gbit,loopback")
    ap.add_argument("--methods-all-at", default="1gbit", help="rates at which every method runs")
    ap.add_argument("--methods", default="", help="comma list overriding the method lists (all rates)")
    ap.add_argument("--target", type=float, default=0.6)
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value for every run")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "compression.json"))
    ap.add_argument("--plot", default=str(REPO / "bench" / "results" / "compression.png"))
    ap.add_argument("--reanalyze", default="", help="recompute time-to-target (--target) from a JSON's curves")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other runs of --json and replace only the (rate, method) runs made now")
    a = ap.parse_args(argv)
    if a.reanalyze:
        old = json.loads(Path(a.reanalyze).read_text())
        doc = {**old, **analyze(old["results"], old["rates"], a.target)}
        return report(doc, a)
    if os.geteuid() != 0 and any(r != "loopback" for r in a.rates.split(",")):
        print("compression bench: the emulated network needs root (ip netns, tc)", file=sys.stderr)
        return 2
    rates = a.rates.split(",")
    full = a.methods_all_at.split(",")
    results, t0 = [], time.perf_counter()
    port = 29600
    for rate in rates:
        methods = a.methods.split(",") if a.methods else (ALL if rate in full else SUBSET)
        for m in methods:
            port += 1
            r = run_one(m, rate, a.nodes, a.target, port, a.set)
            results.append(r)
            if "error" in r:
                print(f"{rate:>8} {m:>9}: FAILED {r['error'][-300:]}", flush=True)
            else:
                print(f"{rate:>8} {m:>9}: {r['bytes_per_step'] / 1e3:10.1f} kB/step  step {r['step_s'] * 1e3:7.1f} ms"
                      f"  comm {r['comm_s'] / r['steps'] * 1e3:5.1f} ms  encode "
                      f"{(r['encode_s'] or 0) / r['steps'] * 1e3:5.1f} ms"
                      f"  tta {r['time_to_target_s'] or float('nan'):7.1f} s  final acc {r['final_test_acc']:.4f}"
                      f"  (load {r['loadavg'][0] if r['loadavg'] else float('nan'):.2f}, {r['wall_s']:.0f} s)",
                      flush=True)
    if a.merge and Path(a.json).exists():
        old = json.loads(Path(a.json).read_text())
        made = {(r["rate"], r["method"]) for r in results}
        results = [r for r in old["results"] if (r["rate"], r["method"]) not in made] + results
        rates = old["rates"] + [r for r in rates if r not in old["rates"]]
        order = {rate: i for i, rate in enumerate(rates)}
        results.sort(key=lambda r: (order[r["rate"]], ALL.index(r["method"])))
    doc = analyze(results, rates, a.target)
    doc.update({"bench": "compression", "nodes": a.nodes, "config": BASE, "per_method": PER_METHOD,
                "total_s": time.perf_counter() - t0, "loadavg_end": loadavg(),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform()}})
    return report(doc, a)


def analyze(results: list[dict], rates: list[str], target: float) -> dict:
    """Time-to-target from each run's evaluation curve, ratios against dense at the same rate, the goals."""
    for r in results:
        if "error" not in r:
            r["time_to_target_s"] = next((t for t, acc in r["curve"] if acc >= target), None)
    g = goals(results)
    by_rate = {}
    for rate in rates:
        dense = next((r for r in results if r["rate"] == rate and r["method"] == "none" and "error" not in r), None)
        rows = {}
        for r in results:
            if r["rate"] != rate or "error" in r or dense is None:
                continue
            rows[r["method"]] = {
                "traffic_vs_dense": dense["bytes_per_step"] / r["bytes_per_step"] if r["bytes_per_step"] else None,
                "step_time_vs_dense": r["step_s"] / dense["step_s"],
                "tta_speedup_vs_dense": (dense["time_to_target_s"] / r["time_to_target_s"]
                                         if dense["time_to_target_s"] and r["time_to_target_s"] else None),
                "acc_minus_dense_pp": 100 * (r["final_test_acc"] - dense["final_test_acc"])}
        by_rate[rate] = rows
    pays = {rate: sorted(m for m, v in rows.items() if m != "none" and v["tta_speedup_vs_dense"]
                         and v["tta_speedup_vs_dense"] > 1.05) for rate, rows in by_rate.items()}
    return {"target_acc": target, "rates": rates, "results": results, "ratios": by_rate, "goals_1gbit": g,
            "compression_pays_at": pays}


def report(doc: dict, a) -> int:
    g, pays, rates, results = doc["goals_1gbit"], doc["compression_pays_at"], doc["rates"], doc["results"]
    write_json(doc, a.json, indent=1)
    try:
        plot(results, rates, Path(a.plot), a.target)
    except Exception as e:  # noqa: BLE001 - the figures are in the JSON anyway
        print(f"plot failed: {e}", file=sys.stderr)
    for r in results:
        if "error" not in r:
            print(f"{r['rate']:>8} {r['method']:>9}: {r['bytes_per_step'] / 1e3:9.1f} kB/step (last step "
                  f"{r['steady_bytes_per_step'] / 1e3:9.1f})  step {r['step_s'] * 1e3:6.1f} ms  "
                  f"tta {r['time_to_target_s'] or float('nan'):6.1f} s  final acc {r['final_test_acc']:.4f}")
    print("\ngoals at 1 Gbit/s (DGC vs dense all-reduce and PowerSGD, same run):")
    if g.get("checked"):
        print(f"  traffic reduction at the final density {g['traffic_reduction']:.0f}x, run average after the "
              f"plain warm-up {g['traffic_reduction_run_average']:.0f}x (goal >= 100x): "
              f"{'met' if g['traffic_goal_100x'] else 'NOT met'}")
        print(f"  final accuracy dense - dgc = {g['accuracy_gap_pp']:+.2f} pp (goal <= 0.5): "
              f"{'met' if g['accuracy_goal_0.5pp'] else 'NOT met'}")
        print(f"  time-to-{a.target:.0%} speedup vs dense {g.get('tta_speedup_vs_dense', float('nan')):.2f}x "
              f"(goal >= 3x): {'met' if g['tta_goal_3x'] else 'NOT met'}")
        verdict = {True: "met", False: "NOT met", None: "not checked"}[g["faster_than_powersgd"]]
        print(f"  vs PowerSGD {g.get('tta_speedup_vs_powersgd', float('nan')):.2f}x (goal > 1): {verdict}")
    else:
        print(f"  not checked: {g['why']}")
    for rate, ms in pays.items():
        print(f"  {rate}: compression pays (time-to-accuracy > 1.05x dense) for: {', '.join(ms) or 'none'}")
    print(f"wrote {a.json} and {a.plot} (benchmark {doc.get('total_s', 0):.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
