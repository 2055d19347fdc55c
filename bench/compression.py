"""Gradient compression on an emulated slow network: every method against dense all-reduce and PowerSGD.

    python bench/compression.py [--nodes 2,4] [--rates 1gbit,10gbit,loopback] [--repeats 2] [--target 0.85]
                                [--full] [--add OTHER.json] [--reanalyze] [--markdown]
                                [--methods a,b] [--methods-all-at 1gbit] [--json PATH] [--plot PATH] [--merge]

Needs root (network namespaces, tc). For each number of hosts and link rate, each method trains the same job: a
wide MLP on MNIST-1D (``mlp``, width 1536, depth 2: 2.44 M parameters, 9.8 MB of float32 gradients; one step of
forward and backward on 32 samples takes about 10 ms of one core and the optimizer 5-15 ms, while the dense
all-reduce of 9.8 MB takes 78 ms at 1 Gbit/s: the gradients dominate the step), global batch 64 (32 per worker
at 2 hosts), SGD with Nesterov momentum 0.9, LR 0.05 with a 0.1-epoch warm-up, cosine, 3000 steps (4.3 epochs of
the 45 000 training samples; test set 5 000). Every method starts with 20 steps of plain all-reduce; DGC then
warms its sparsity up over 0.05 epochs (35 steps: 75%, 93.75%, 98.4%, 99.6%) to 99.9% (the paper spends 4 of
90-164 epochs on it), with at least 1000 entries per tensor and step (``compress.dgc_min_entries``: at 0.1% the
15 k-entry classifier would send 15), and LR-weighted accumulation (``compress.dgc_lr_weighted``: a delayed entry is
applied with the LR of the steps it came from, which matters under the cosine decay of a short run). Timed runs stop at ``--target`` (``train.target_acc``); ``--full`` runs the whole schedule
for the final accuracy (the training is deterministic: the link changes the clock, not the numbers). One worker per emulated host: ``scripts/multinode_train.sh N --rate RATE`` makes N
network namespaces on a bridge with a token-bucket-shaped link each (tc tbf), runs ``scalelab train`` in each
through torchrun, and tears them down whatever happens. ``loopback`` is ``scalelab train --nproc N`` (gloo over
the machine's loopback, no shaping).

Per run: gradient bytes sent per step by one worker after the warm-up (``compress_bytes_after_warmup`` over the
steps after ``compress.warmup_steps``; for dense, ``comm_bytes`` per step), the compression ratio against dense,
the median step time (global batch over the median samples/s of the logged intervals, the first interval
dropped), time-to-target accuracy (training clock at the first evaluation with test accuracy >= ``--target``;
evaluations every 50 steps, not timed), final test accuracy, DGC's encode time per step. ``--repeats`` runs of
every cell, interleaved (dense, dgc, powersgd, dense, ...) so that a change of the machine's load hits all
methods alike; the summary gives medians and the ratios against dense of the same session. The load average at
the start of every run is in the JSON.

The full method list runs at the rates in ``--methods-all-at``; elsewhere dense, DGC and PowerSGD. The goals of
issue 4 are checked at 1 Gbit/s for every number of hosts and printed as met / not met.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
RATE_ORDER = ["100mbit", "1gbit", "10gbit", "loopback"]
LABEL = {"none": "dense all-reduce"}

WARMUP = 20  # plain all-reduce steps of every method
EVAL_EVERY = 50
BASE = ["data.name=mnist1d", "model.name=mlp", "model.width=1536", "model.depth=2", "train.batch_size=64",
        "recipe.base_lr=0.05", "recipe.base_batch=64", "recipe.warmup_epochs=0.1", "train.max_steps=3000",
        f"train.eval_every={EVAL_EVERY}", "train.log_every=25", "train.threads=1", "train.progress=false",
        "train.checkpoint_every=100000", f"compress.warmup_steps={WARMUP}", "compress.min_numel=4096"]
PER_METHOD = {
    "dgc": ["compress.density=0.001", "compress.dgc_warmup_epochs=0.05", "compress.dgc_min_entries=1000",
            "compress.dgc_lr_weighted=true"],
    "topk": ["compress.density=0.001"],
    "randomk": ["compress.density=0.01"],
    "powersgd": ["compress.powersgd_rank=2"],
    "qsgd": ["compress.qsgd_levels=16"],
}


def run_one(method: str, rate: str, nodes: int, target: float, port: int, extra: list[str], full: bool) -> dict:
    gbit = {"100mbit": 0.1, "1gbit": 1.0, "10gbit": 10.0}.get(rate, 10.0)
    sets = BASE + [f"compress.method={method}", f"compress.link_gbit={gbit}"] + PER_METHOD.get(method, []) + extra
    if not full:  # a timed run stops at the target (the training is deterministic: the full run goes on the same)
        sets.append(f"train.target_acc={target}")
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
            cmd = ["bash", str(MULTINODE), str(nodes), "--rate", rate, "--port", str(port), "--timeout", "900",
                   "--", "--out", str(out), *args]
        t0 = time.perf_counter()
        # a full run is niced on a shared machine: 3000 steps of 4 workers took more than 20 min there
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=4 * 3600 if full else 1200)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not (out / "summary.json").exists():
            return {"method": method, "rate": rate, "nodes": nodes, "error": (proc.stdout + proc.stderr)[-3000:],
                    "loadavg": load}
        s = json.loads((out / "summary.json").read_text())
        recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["kind"] == "eval"]
    comp = [r for r in recs if r["kind"] == "compress"]
    trains = [r for r in recs if r["kind"] == "train"][1:]
    B = s["global_batch"]
    step_s = B / statistics.median(r["samples_per_s"] for r in trains) if trains else None
    ttt = next((r["train_s"] for r in evals if r["test_acc"] >= target), None)
    if method == "none":
        bytes_step = s["comm_bytes"] / s["steps"]
    else:
        bytes_step = s["compress_bytes_after_warmup"] / max(1, s["steps"] - WARMUP)
    steady = comp[-1]["bytes"] if comp else bytes_step  # the last logged step: final density, after warm-ups
    sparse_steps = s["steps"] - WARMUP
    seed = next((int(x.split("=", 1)[1]) for x in sets if x.startswith("train.seed=")), 0)
    return {"method": method, "rate": rate, "nodes": nodes, "seed": seed, "bytes_per_step": bytes_step,
            "steady_bytes_per_step": steady,
            "compression_ratio": s.get("compression_ratio"), "step_s": step_s, "time_to_target_s": ttt,
            "final_test_acc": s["final_test_acc"], "best_test_acc": s["best_test_acc"], "train_s": s["train_s"],
            "comm_s": s["comm_s"], "comm_bytes": s["comm_bytes"], "steps": s["steps"],
            "encode_s": s.get("compress_encode_s"), "decode_s": s.get("compress_decode_s"),
            "encode_ms_per_step": (1e3 * s["compress_encode_s"] / sparse_steps
                                   if s.get("compress_encode_s") is not None else None),
            "density": s.get("compress_density"), "sparse_calls": s.get("compress_sparse_calls"),
            "dense_calls": s.get("compress_dense_calls"), "wall_s": wall, "loadavg": load,
            "params_sha256": s.get("params_sha256"), "full": full, "stopped": s.get("stopped"),
            "curve": [(r["train_s"], r["test_acc"]) for r in evals]}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cells(results: list[dict], target: float) -> list[dict]:
    """One row per (nodes, rate, method): medians over the repeats.

    Timed runs stop at the target; the final accuracy of a (nodes, method) comes from its full runs (``--full``,
    any rate: the training is deterministic, so the shaping changes the clock, not the numbers; the curves of the
    timed runs are checked against the full run's up to the target, ``curve_matches_full``)."""
    out = []
    ok_all = [r for r in results if "error" not in r]
    for r in ok_all:
        r["time_to_target_s"] = next((t for t, acc in r["curve"] if acc >= target), None)
    keys = sorted({(r["nodes"], r["rate"], r["method"]) for r in results if not r.get("full")},
                  key=lambda k: (k[0], RATE_ORDER.index(k[1]) if k[1] in RATE_ORDER else 99, ALL.index(k[2])))
    for nodes, rate, method in keys:
        runs = [r for r in results if (r["nodes"], r["rate"], r["method"]) == (nodes, rate, method)
                and not r.get("full")]
        ok = [r for r in runs if "error" not in r]
        full = [r for r in ok_all if r.get("full") and (r["nodes"], r["method"]) == (nodes, method)]
        if not ok:
            out.append({"nodes": nodes, "rate": rate, "method": method, "runs": len(runs), "failed": len(runs)})
            continue
        accs = [r["final_test_acc"] for r in full]
        ref = [a for t, a in full[0]["curve"]] if full else None
        row = {"nodes": nodes, "rate": rate, "method": method, "runs": len(runs), "failed": len(runs) - len(ok),
               "bytes_per_step": _median(r["bytes_per_step"] for r in ok),
               "steady_bytes_per_step": _median(r["steady_bytes_per_step"] for r in ok),
               "step_s": _median(r["step_s"] for r in ok),
               "step_s_all": [r["step_s"] for r in ok],
               "time_to_target_s": (_median(r["time_to_target_s"] for r in ok)
                                    if all(r["time_to_target_s"] for r in ok) else None),
               "time_to_target_s_all": [r["time_to_target_s"] for r in ok],
               "steps_to_target": next((EVAL_EVERY * (i + 1) for i, (t, a) in enumerate(ok[0]["curve"]) if a >= target),
                                       None),
               "train_s": _median(r["train_s"] for r in ok),
               "encode_ms_per_step": _median(r["encode_ms_per_step"] for r in ok),
               "final_test_acc": statistics.median(accs) if accs else None,
               "final_from_full_runs": len(accs),
               # where a run stopped before the target (short step-time runs): steps to the target of the full run
               # of this job x the median step time here; an estimate, marked as such
               "time_to_target_est_s": None,
               "curve_matches_full": (all([a for t, a in r["curve"]] == ref[:len(r["curve"])] for r in ok)
                                      if ref and all(r.get("stopped") == "target" for r in ok) else None),
               "loadavg_1min": [r["loadavg"][0] if r["loadavg"] else None for r in ok]}
        if row["time_to_target_s"] is None and full:
            n_full = next((EVAL_EVERY * (i + 1) for i, (t, a) in enumerate(full[0]["curve"]) if a >= target), None)
            if n_full:
                row["steps_to_target"] = n_full
                row["time_to_target_est_s"] = n_full * row["step_s"]
        out.append(row)
    return out


def paired_gap(results: list[dict], nodes: int, a: str = "none", b: str = "dgc") -> dict | None:
    """Final accuracy of ``a`` minus ``b`` in pp over the seeds with a full run of both (mean, its standard error,
    per seed); None without such a seed."""
    by: dict[int, dict[str, float]] = {}
    for r in results:
        if r.get("full") and "error" not in r and r["nodes"] == nodes and r["method"] in (a, b):
            by.setdefault(r.get("seed", 0), {})[r["method"]] = r["final_test_acc"]
    per = {s: 100 * (v[a] - v[b]) for s, v in sorted(by.items()) if a in v and b in v}
    if not per:
        return None
    gaps = list(per.values())
    se = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else None
    return {"mean_pp": statistics.mean(gaps), "se_pp": se, "per_seed_pp": per}


def goals(rows: list[dict], nodes: int, rate: str = "1gbit", results: list[dict] | None = None) -> dict:
    at = {r["method"]: r for r in rows if r["rate"] == rate and r["nodes"] == nodes and "step_s" in r}
    d, g, p = at.get("none"), at.get("dgc"), at.get("powersgd")
    if not (d and g):
        return {"checked": False, "why": f"dense or dgc missing at {rate}, {nodes} hosts"}
    out = {"checked": True, "rate": rate, "nodes": nodes}
    ratio = d["bytes_per_step"] / g["steady_bytes_per_step"]
    out["traffic_reduction"] = ratio  # at DGC's final density (after its sparsity warm-up)
    out["traffic_reduction_run_average"] = d["bytes_per_step"] / g["bytes_per_step"]
    out["traffic_goal_100x"] = ratio >= 100
    pg = paired_gap(results or [], nodes)
    if pg is not None:  # the mean over seeds of dense - DGC, each seed's pair trained alike but for the method
        out["accuracy_gap_pp"], out["accuracy_gap"] = pg["mean_pp"], pg
        out["accuracy_goal_0.5pp"] = out["accuracy_gap_pp"] <= 0.5
    elif d["final_test_acc"] is not None and g["final_test_acc"] is not None:
        out["accuracy_gap_pp"] = 100 * (d["final_test_acc"] - g["final_test_acc"])
        out["accuracy_goal_0.5pp"] = out["accuracy_gap_pp"] <= 0.5
    else:
        out["accuracy_gap_pp"], out["accuracy_goal_0.5pp"] = None, None
    out["step_time_speedup_vs_dense"] = d["step_s"] / g["step_s"]
    if d["time_to_target_s"] and g["time_to_target_s"]:
        out["tta_speedup_vs_dense"] = d["time_to_target_s"] / g["time_to_target_s"]
        out["tta_goal_3x"] = out["tta_speedup_vs_dense"] >= 3
    else:
        out["tta_goal_3x"] = False
        out["tta_note"] = "dense or dgc did not reach the target"
    if p and p.get("time_to_target_s") and g["time_to_target_s"]:
        out["tta_speedup_vs_powersgd"] = p["time_to_target_s"] / g["time_to_target_s"]
        out["faster_than_powersgd"] = out["tta_speedup_vs_powersgd"] > 1
    elif p is None:
        out["faster_than_powersgd"] = None
        out["powersgd_note"] = f"no PowerSGD run at {rate}"
    else:  # one of them did not reach the target: faster only if DGC did
        out["faster_than_powersgd"] = bool(g["time_to_target_s"])
    return out


def plot(rows: list[dict], path: Path, target: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r for r in RATE_ORDER if any(x["rate"] == r for x in rows)]
    nodes = sorted({r["nodes"] for r in rows})
    if not nodes:
        return
    fig, axes = plt.subplots(1, len(nodes), figsize=(6.5 * len(nodes), 4.5), squeeze=False)
    for ax, nn in zip(axes[0], nodes):
        xs = list(range(len(rates)))
        for m in ALL:
            ys, est = [], []
            for rate in rates:
                r = next((r for r in rows if (r["method"], r["rate"], r["nodes"]) == (m, rate, nn)
                          and (r.get("time_to_target_s") or r.get("time_to_target_est_s"))), None)
                ys.append((r["time_to_target_s"] or r["time_to_target_est_s"]) if r else float("nan"))
                est.append(bool(r and not r["time_to_target_s"]))
            if all(y != y for y in ys):
                continue
            line, = ax.plot(xs, ys, marker="o", label=LABEL.get(m, m), color=f"C{ALL.index(m) % 10}",
                            lw=2.5 if m in ("none", "dgc", "powersgd") else 1)
            for x, y, e in zip(xs, ys, est):
                if e:  # estimated: steps to target of the full run x the step time measured here
                    ax.plot([x], [y], marker="o", mfc="white", mec=line.get_color(), ms=9)
        ax.set_xticks(xs, rates)
        ax.set_xlabel("link rate per host (tc tbf); loopback = no shaping")
        ax.set_ylabel(f"time to {target:.0%} test accuracy (s, median; hollow: estimated)")
        ax.set_yscale("log")
        ax.set_title(f"MNIST-1D, MLP 2.44 M params, {nn} hosts, B=64")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="2", help="comma list of host counts")
    ap.add_argument("--rates", default="1gbit,10gbit,loopback")
    ap.add_argument("--methods-all-at", default="1gbit", help="rates at which every method runs (at 2 hosts)")
    ap.add_argument("--methods", default="", help="comma list overriding the method lists (all rates)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell, interleaved across the methods")
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--full", action="store_true",
                    help="run the whole schedule (for the final accuracy; not timed: run it niced, without the lock)")
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value for every run")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "compression.json"))
    ap.add_argument("--plot", default=str(REPO / "bench" / "results" / "compression.png"))
    ap.add_argument("--reanalyze", action="store_true", help="recompute the summary (--target) from --json")
    ap.add_argument("--markdown", action="store_true", help="also print the summary as a Markdown table")
    ap.add_argument("--merge", action="store_true", help="add these runs to those of --json (same config)")
    ap.add_argument("--add", action="append", default=[],
                    help="add the runs of another result JSON of this benchmark (e.g. the --full runs)")
    a = ap.parse_args(argv)
    if a.reanalyze:
        old = json.loads(Path(a.json).read_text())
        results = old["results"] + [r for extra in a.add for r in json.loads(Path(extra).read_text())["results"]]
        sessions = old.get("sessions", []) + [x for extra in a.add
                                              for x in json.loads(Path(extra).read_text()).get("sessions", [])]
        return report({**old, **analyze(results, a.target), "sessions": sessions}, a)
    bad = [r for r in a.rates.split(",") if r not in RATE_ORDER]
    if bad or not re.fullmatch(r"\d+(,\d+)*", a.nodes) or a.repeats < 1:
        ap.error(f"need --rates from {', '.join(RATE_ORDER)} (got {a.rates}), --nodes a comma list of host counts "
                 f"(got {a.nodes}), --repeats >= 1")
    if os.geteuid() != 0 and any(r != "loopback" for r in a.rates.split(",")):
        print("compression bench: the emulated network needs root (ip netns, tc)", file=sys.stderr)
        return 2
    results, t0 = [], time.perf_counter()
    port = 29600
    load0 = loadavg()
    for nodes in (int(x) for x in a.nodes.split(",")):
        for rate in a.rates.split(","):
            methods = (a.methods.split(",") if a.methods
                       else ALL if rate in a.methods_all_at.split(",") and nodes == 2 else SUBSET)
            for rep in range(a.repeats):
                for m in methods:
                    port += 1
                    r = run_one(m, rate, nodes, a.target, port, a.set, a.full)
                    r["repeat"] = rep
                    results.append(r)
                    if "error" in r:
                        print(f"{nodes} {rate:>8} {m:>9}: FAILED {r['error'][-300:]}", flush=True)
                        continue
                    print(f"{nodes} {rate:>8} {m:>9}: {r['bytes_per_step'] / 1e3:10.1f} kB/step  step "
                          f"{r['step_s'] * 1e3:7.1f} ms  encode {r['encode_ms_per_step'] or 0:5.1f} ms"
                          f"  tta {r['time_to_target_s'] or float('nan'):7.1f} s  acc "
                          f"{r['final_test_acc']:.4f} at step {r['steps']} ({r['stopped']})  (load {r['loadavg'][0] if r['loadavg'] else float('nan'):.2f},"
                          f" {r['wall_s']:.0f} s)", flush=True)
    if all("error" in r for r in results):
        print(f"compression bench: all {len(results)} runs failed (above); {a.json} is left as it was",
              file=sys.stderr)
        return 1
    sessions = [{"nodes": a.nodes, "rates": a.rates, "repeats": a.repeats, "full": a.full, "loadavg_start": load0,
                 "loadavg_end": loadavg(), "total_s": time.perf_counter() - t0}]
    if a.merge and Path(a.json).exists():
        old = json.loads(Path(a.json).read_text())
        results = old["results"] + results
        sessions = old.get("sessions", []) + sessions
    for extra in a.add:
        more = json.loads(Path(extra).read_text())
        results, sessions = results + more["results"], sessions + more.get("sessions", [])
    doc = analyze(results, a.target)
    doc.update({"bench": "compression", "config": BASE, "per_method": PER_METHOD, "sessions": sessions,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform()}})
    return report(doc, a)


def analyze(results: list[dict], target: float) -> dict:
    """Medians per cell, ratios against dense of the same (hosts, rate), the goals at 1 Gbit/s."""
    rows = cells(results, target)
    for r in rows:
        dense = next((d for d in rows if (d["nodes"], d["rate"], d["method"]) == (r["nodes"], r["rate"], "none")
                      and "step_s" in d), None)
        if dense is None or "step_s" not in r:
            continue
        r["traffic_vs_dense"] = dense["bytes_per_step"] / r["bytes_per_step"] if r["bytes_per_step"] else None
        r["step_speedup_vs_dense"] = dense["step_s"] / r["step_s"]
        r["tta_speedup_vs_dense"] = (dense["time_to_target_s"] / r["time_to_target_s"]
                                     if dense["time_to_target_s"] and r["time_to_target_s"] else None)
        r["acc_minus_dense_pp"] = (100 * (r["final_test_acc"] - dense["final_test_acc"])
                                   if r["final_test_acc"] is not None and dense["final_test_acc"] is not None
                                   else None)
    g = {f"{n}_hosts": goals(rows, n, results=results) for n in sorted({r["nodes"] for r in rows})}
    pays = {}
    for r in rows:
        if r["method"] != "none" and (r.get("tta_speedup_vs_dense") or 0) > 1.05:
            pays.setdefault(f"{r['nodes']} hosts, {r['rate']}", []).append(r["method"])
    return {"target_acc": target, "results": results, "cells": rows, "goals_1gbit": g, "compression_pays_at": pays}


def report(doc: dict, a) -> int:
    write_json(doc, a.json, indent=1)
    try:
        plot(doc["cells"], Path(a.plot), a.target)
    except Exception as e:  # noqa: BLE001 - the figures are in the JSON anyway
        print(f"plot failed: {e}", file=sys.stderr)
    print(f"\n{'hosts':>5} {'rate':>8} {'method':>9} {'runs':>4} {'kB/step':>9} {'x less':>7} {'step ms':>8} "
          f"{'x dense':>7} {'tta s':>7} {'x dense':>7} {'acc':>7} {'pp':>6}  load")
    for r in doc["cells"]:
        if "step_s" not in r:
            print(f"{r['nodes']:>5} {r['rate']:>8} {r['method']:>9} {r['runs']:>4} FAILED")
            continue
        f = lambda x, fmt: format(x, fmt) if x is not None else "-"  # noqa: E731
        print(f"{r['nodes']:>5} {r['rate']:>8} {r['method']:>9} {r['runs']:>4} {r['bytes_per_step'] / 1e3:9.1f} "
              f"{f(r.get('traffic_vs_dense'), '7.1f')} {r['step_s'] * 1e3:8.1f} "
              f"{f(r.get('step_speedup_vs_dense'), '7.2f')} {f(r['time_to_target_s'], '7.1f')} "
              f"{f(r.get('tta_speedup_vs_dense'), '7.2f')} {f(r['final_test_acc'], '7.4f')} "
              f"{f(r.get('acc_minus_dense_pp'), '+6.2f')}  {r['loadavg_1min']}")
    for r in doc["results"]:
        if r.get("full") and "error" not in r:
            print(f"full run: {r['nodes']} hosts {r['rate']:>8} {r['method']:>9}: final acc {r['final_test_acc']:.4f}"
                  f" after {r['steps']} steps")
    for key, g in doc["goals_1gbit"].items():
        print(f"\ngoals at 1 Gbit/s, {key} (DGC vs dense all-reduce and PowerSGD, same session, medians):")
        if not g.get("checked"):
            print(f"  not checked: {g['why']}")
            continue
        print(f"  traffic reduction at the final density {g['traffic_reduction']:.0f}x, run average after the "
              f"plain warm-up {g['traffic_reduction_run_average']:.0f}x (goal >= 100x): "
              f"{'met' if g['traffic_goal_100x'] else 'NOT met'}")
        if g["accuracy_gap_pp"] is None:
            print("  final accuracy: no full runs (--full) of dense and dgc at these hosts")
        else:
            pg = g.get("accuracy_gap")
            over = (f" (mean over {len(pg['per_seed_pp'])} seeds"
                    + (f", standard error {pg['se_pp']:.2f}" if pg["se_pp"] is not None else "") + ")") if pg else ""
            print(f"  final accuracy dense - dgc = {g['accuracy_gap_pp']:+.2f} pp{over} (goal <= 0.5): "
                  f"{'met' if g['accuracy_goal_0.5pp'] else 'NOT met'}")
        print(f"  step time {g['step_time_speedup_vs_dense']:.2f}x faster than dense; time-to-{a.target:.0%} "
              f"speedup vs dense {g.get('tta_speedup_vs_dense', float('nan')):.2f}x (goal >= 3x): "
              f"{'met' if g['tta_goal_3x'] else 'NOT met'}")
        verdict = {True: "met", False: "NOT met", None: "not checked"}[g["faster_than_powersgd"]]
        print(f"  vs PowerSGD {g.get('tta_speedup_vs_powersgd', float('nan')):.2f}x (goal > 1): {verdict}")
    for where, ms in doc["compression_pays_at"].items():
        print(f"  {where}: compression pays (time-to-accuracy > 1.05x dense) for: {', '.join(ms)}")
    if getattr(a, "markdown", False):
        print(markdown(doc))
    print(f"wrote {a.json} and {a.plot}")
    return 0


def markdown(doc: dict) -> str:
    """The summary as a Markdown table (for docs/benchmarks.md)."""
    f = lambda x, fmt, unit="": format(x, fmt) + unit if x is not None else "-"  # noqa: E731
    lines = ["| hosts | rate | method | runs | kB sent/step (run avg / last step) | less traffic | step ms (all runs) "
             "| x dense | encode ms/step | steps to target | time to target s (all runs) | x dense | final acc | "
             "vs dense | load (1 min) |", "|" + "---|" * 15]
    for r in doc["cells"]:
        if "step_s" not in r:
            lines.append(f"| {r['nodes']} | {r['rate']} | {LABEL.get(r['method'], r['method'])} | {r['runs']} | "
                         "failed |" + " |" * 10)
            continue
        steps = ", ".join(f"{x * 1e3:.0f}" for x in r["step_s_all"])
        ttts = ", ".join(f"{x:.0f}" if x else "-" for x in r["time_to_target_s_all"])
        if r["time_to_target_s"] is None and r.get("time_to_target_est_s"):
            ttts = f"est. {r['time_to_target_est_s']:.0f}"
        lines.append(
            f"| {r['nodes']} | {r['rate']} | {LABEL.get(r['method'], r['method'])} | {r['runs']} | "
            f"{r['bytes_per_step'] / 1e3:,.1f} / {r['steady_bytes_per_step'] / 1e3:,.1f} | "
            f"{f(r.get('traffic_vs_dense'), '.0f', 'x')} | {r['step_s'] * 1e3:.1f} ({steps}) | "
            f"{f(r.get('step_speedup_vs_dense'), '.2f', 'x')} | {f(r['encode_ms_per_step'], '.1f')} | "
            f"{f(r['steps_to_target'], 'd')} | {f(r['time_to_target_s'], '.1f')} ({ttts}) | "
            f"{f(r.get('tta_speedup_vs_dense'), '.2f', 'x')} | {f(r['final_test_acc'], '.4f')} | "
            f"{f(r.get('acc_minus_dense_pp'), '+.2f', ' pp')} | "
            f"{', '.join(f'{x:.1f}' for x in r['loadavg_1min'] if x is not None)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
