"""The 98.5% results of docs/lab.md: several sweeps per seed merged, the knees per seed and of the seed mean, the
bound 1.25 S0 b0 / S_min, and the plot.

    python docs/lab/combine_985.py OUT --seed 0=DIR[,DIR...] --seed 1=DIR[,DIR...] [--rename DIR:OPT=NAME ...]

Each ``--seed`` names the sweep directories of one seed; their trials are merged (ids kept apart by directory)
and each (optimizer, batch) cell takes its best over all of them, as ``scalelab sweep`` does within one sweep
(``summarize``): more LR points for a cell can only lower its steps. ``--rename DIR:OPT=NAME`` gives the
optimizer ``OPT`` of sweep ``DIR`` its own name (another recipe of the same optimizer, e.g. other damping), so
that it is not merged with the first. The goal (``goal`` in the summary): a knee at least 8x the batch where
``--goal-of`` (momentum SGD) leaves perfect scaling, checked twice: each recipe's knee from its own start against
SGD's from its own start, and the knees from the common reference against each other (``met_common`` is false when
SGD has no knee from the common reference: then the goal's batch is undefined there). The mean over seeds of a cell is the mean of the seeds' best steps (a cell
that missed in any seed has none). Knees (own start and common reference) come from ``scalelab.lab.knee``,
exactly as in ``scalelab sweep``. A sweep stopped before its end (no ``sweep.json``) contributes its finished
trials. ``bootstrap`` in the summary: the seeds resampled with replacement (``--draws``), the share of draws in
which each knee of the mean and the goal come out; ``spread``: per cell, how much the seeds scatter. Writes
``OUT/summary.json`` and ``OUT/steps_to_target.png``.
"""

import argparse
import json
from pathlib import Path

from scalelab.lab.knee import find_knee, fit_mccandlish
from scalelab.lab.sweep import SweepSpec, load_trials, summarize


def load_seed(dirs: list[Path], renames: dict[tuple[str, str], str]) -> tuple[SweepSpec, dict]:
    trials, spec = [], None
    for d in dirs:
        if not (d / "sweep_spec.json").exists() and not (d / "sweep.json").exists():
            raise SystemExit(f"combine_985.py: {d} is not a sweep directory (no sweep.json or sweep_spec.json)")
        if (d / "sweep.json").exists():
            s = json.loads((d / "sweep.json").read_text())
        else:  # a sweep stopped before its end: its spec and finished trials
            s = {"spec": json.loads((d / "sweep_spec.json").read_text()), "trials": list(load_trials(d).values())}
        for r in s["trials"]:
            opt = renames.get((d.name, r["optimizer"]), r["optimizer"])
            trials.append(dict(r, optimizer=opt, id=f"{r['id']}@{d.name}"))
        if spec is None:
            spec = dict(s["spec"])
    spec["optimizers"] = list(dict.fromkeys(r["optimizer"] for r in trials))
    spec["batches"] = sorted({r["batch"] for r in trials})
    sp = SweepSpec(**spec)
    return sp, summarize(sp, trials)


def curve(summary: dict, opt: str, batches: list[int]) -> list[int | None]:
    by = {r["batch"]: r["steps_to_target"] for r in summary["best"] if r["optimizer"] == opt}
    return [by.get(b) for b in batches]


def knees(batches, curves: dict[str, list], tol: float) -> dict:
    """Own-start and common-reference knees of each curve, the common reference, S_min and the bound."""
    firsts = [(b, s) for c in curves.values() for b, s in zip(batches, c) if s is not None]
    b0 = min(b for b, _ in firsts)
    ref = (b0, min(s for b, s in firsts if b == b0))
    s_min = min(s for _, s in firsts)
    out = {"common_ref": {"batch": ref[0], "steps": ref[1]}, "s_min": s_min,
           "bound_common": tol * ref[0] * ref[1] / s_min, "optimizers": {}}
    for opt, c in curves.items():
        own = find_knee(batches, c, tol).to_dict()
        com = find_knee(batches, c, tol, ref=ref).to_dict()
        fit = fit_mccandlish(batches, c)
        mine = [s for s in c if s is not None]
        out["optimizers"][opt] = {
            "steps": dict(zip(map(str, batches), c)), "knee_own": own["batch"], "own_ratios": own["ratios"],
            "own_first_off": own["first_off"], "knee_common": com["batch"], "common_ratios": com["ratios"],
            "common_first_off": com["first_off"], "mccandlish_b_noise": fit[0] if fit else None,
            "own_bound": (tol * own["ref_batch"] * own["ref_steps"] / min(mine)) if mine else None}
    return out


def goal(k: dict, peer: str) -> dict:
    """The goal, checked in both readings of the knee: the peer's (momentum SGD's) knee x 8 against each other
    recipe's knee, own start against own start and common reference against common reference."""
    g = k["optimizers"][peer]
    need_own = 8 * g["knee_own"] if g["knee_own"] else None
    need_common = 8 * g["knee_common"] if g["knee_common"] else None
    others = {o: v for o, v in k["optimizers"].items() if o != peer}
    return {"peer_knee_own": g["knee_own"], "peer_knee_common": g["knee_common"],
            "needed_own": need_own, "needed_common": need_common,
            "met_own": {o: bool(need_own and v["knee_own"] and v["knee_own"] >= need_own) for o, v in others.items()},
            "met_common": {o: bool(need_common and v["knee_common"] and v["knee_common"] >= need_common)
                           for o, v in others.items()}}


def mean_curves(batches, curves: list[dict]) -> dict:
    """Per optimizer, the mean over the given seeds' curves; a cell that missed (None) in any seed has no mean."""
    out = {}
    for o in dict.fromkeys(o for c in curves for o in c):
        vals = []
        for i, _ in enumerate(batches):
            xs = [c[o][i] for c in curves if o in c]
            vals.append(sum(xs) / len(xs) if len(xs) == len(curves) and all(x is not None for x in xs) else None)
        if any(v is not None for v in vals):
            out[o] = vals
    return out


def spread(batches, curves: list[dict]) -> dict:
    """Per optimizer and batch, how much the seeds scatter: the seeds that reached the target, the mean of their
    steps (the mean over seeds is None where any seed missed), the largest over the smallest of them, and the
    coefficient of variation (sample standard deviation over the mean; None with fewer than two seeds). This,
    against the tolerance of the knee (1.25), says whether one seed's knee means much."""
    import statistics

    out: dict = {}
    for o in dict.fromkeys(o for c in curves for o in c):
        for i, b in enumerate(batches):
            xs = [c[o][i] for c in curves if o in c and c[o][i] is not None]
            cv = statistics.stdev(xs) / statistics.fmean(xs) if len(xs) > 1 else None
            out.setdefault(o, {})[str(b)] = {"reached": len(xs), "mean_reached": statistics.fmean(xs) if xs else None,
                                             "max_over_min": max(xs) / min(xs) if xs else None, "cv": cv}
    return out


def bootstrap(batches, per_seed: dict, tol: float, peer: str, draws: int) -> dict:
    """How much the knees of the seed mean and the goal depend on which seeds were run: resample the seeds with
    replacement (``draws`` times, fixed RNG), take the mean curves, knees and goal of each draw, and count how often
    each knee comes out and how often the goal is met. A knee decided by a ratio near the tolerance flips between
    draws; this says how often."""
    import random

    rng = random.Random(0)
    names = list(per_seed)
    tally: dict = {}
    met = {"own": {}, "common": {}}
    for _ in range(draws):
        pick = [per_seed[rng.choice(names)] for _ in names]
        k = knees(batches, mean_curves(batches, pick), tol)
        for o, v in k["optimizers"].items():
            for reading in ("own", "common"):
                t = tally.setdefault(o, {}).setdefault(reading, {})
                key = str(v[f"knee_{reading}"])
                t[key] = t.get(key, 0) + 1
        if peer in k["optimizers"]:
            g = goal(k, peer)
            for reading in ("own", "common"):
                for o, ok in g[f"met_{reading}"].items():
                    met[reading][o] = met[reading].get(o, 0) + int(ok)
    frac = lambda d: {key: round(n / draws, 3) for key, n in sorted(d.items(), key=lambda kv: -kv[1])}
    return {"draws": draws, "seeds": len(names),
            "knees": {o: {r: frac(t) for r, t in v.items()} for o, v in tally.items()},
            "goal_met": {r: {o: round(n / draws, 3) for o, n in v.items()} for r, v in met.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", action="append", required=True, metavar="NAME=DIR[,DIR...]")
    ap.add_argument("--rename", action="append", default=[], metavar="DIR:OPT=NAME")
    ap.add_argument("--goal-of", default="sgd", help="the peer whose knee x 8 is the goal (default sgd)")
    ap.add_argument("--draws", type=int, default=2000, help="bootstrap draws over the seeds (default 2000)")
    a = ap.parse_args()
    if a.draws < 1:
        ap.error(f"--draws {a.draws}: must be at least 1")
    renames = {}
    for item in a.rename:
        d, _, rest = item.partition(":")
        opt, _, name = rest.partition("=")
        renames[(Path(d).name, opt)] = name
    seeds = {}
    for item in a.seed:
        name, _, dirs = item.partition("=")
        seeds[name] = load_seed([Path(d) for d in dirs.split(",")], renames)
    tol = next(iter(seeds.values()))[0].tol
    batches = sorted({b for sp, _ in seeds.values() for b in sp.batches})
    opts = list(dict.fromkeys(o for sp, _ in seeds.values() for o in sp.optimizers))
    result = {"tol": tol, "batches": batches, "seeds": {}, "trials": {}}
    per_seed_curves = {}
    for name, (sp, summ) in seeds.items():
        cs = {o: curve(summ, o, batches) for o in opts if o in sp.optimizers}
        per_seed_curves[name] = cs
        result["seeds"][name] = knees(batches, cs, tol)
        result["trials"][name] = summ["counts"]
    mean = mean_curves(batches, list(per_seed_curves.values()))
    result["mean"] = knees(batches, mean, tol) if mean else None
    for name, k in [*result["seeds"].items(), ("mean", result["mean"])]:
        if k and a.goal_of in k["optimizers"]:
            k["goal"] = goal(k, a.goal_of)
    result["spread"] = spread(batches, list(per_seed_curves.values()))
    result["bootstrap"] = bootstrap(batches, per_seed_curves, tol, a.goal_of, a.draws)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    plot(out / "steps_to_target.png", batches, per_seed_curves, mean, result, tol,
         next(iter(seeds.values()))[0].target_acc)
    for name, k in [*result["seeds"].items(), ("mean", result["mean"])]:
        if not k:
            continue
        print(f"seed {name}: common ref {k['common_ref']}, S_min {k['s_min']}, bound {k['bound_common']:.0f}")
        for o, v in k["optimizers"].items():
            print(f"  {o:>10}: {v['steps']}  knee own {v['knee_own']} (first off {v['own_first_off']}), "
                  f"common {v['knee_common']} (first off {v['common_first_off']})")
        if "goal" in k:
            print(f"  goal: {k['goal']}")
    print(f"spread over the seeds per batch {batches}: coefficient of variation (max/min)")
    for o, v in result["spread"].items():
        cells = [f"{c['cv']:.2f} ({c['max_over_min']:.2f})" if c["cv"] is not None else "-" for c in v.values()]
        print(f"  {o:>10}: " + ", ".join(cells))
    n = len(per_seed_curves)
    print(f"mean over the seeds that reached the target (how many of {n}, where not all)")
    for o, v in result["spread"].items():
        cells = [("-" if c["mean_reached"] is None else f"{c['mean_reached']:.1f}")
                 + (f" ({c['reached']})" if c["reached"] < n else "") for c in v.values()]
        print(f"  {o:>10}: " + ", ".join(cells))
    b = result["bootstrap"]
    print(f"bootstrap over the {b['seeds']} seeds ({b['draws']} draws): knee of the mean, share of draws")
    for o, v in b["knees"].items():
        print(f"  {o:>10}: own start {v['own']}  common ref. {v['common']}")
    print(f"  goal met, share of draws: own start {b['goal_met']['own']}, common ref. {b['goal_met']['common']}")


def plot(path, batches, per_seed, mean, result, tol, target):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scalelab.lab.plotting import finish
    from scalelab.lab.sweep_plots import COLORS

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    opts = list(dict.fromkeys(o for c in per_seed.values() for o in c))
    marks = ["x", "+", "1", "2"]
    for i, o in enumerate(opts):
        c = COLORS[i % len(COLORS)]
        for j, (name, cs) in enumerate(per_seed.items()):
            if o in cs:
                pts = [(b, s) for b, s in zip(batches, cs[o]) if s is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marks[i % len(marks)], color=c, markersize=7,
                        alpha=0.6, label=f"{o}: single seeds ({len(per_seed)})" if j == 0 else None)
        if o in mean:
            pts = [(b, s) for b, s in zip(batches, mean[o]) if s is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=c, label=f"{o}: mean over seeds")
            k = result["mean"]["optimizers"][o]
            for kb, star, lab in ((k["knee_own"], "*", "knee (own start)"), (k["knee_common"], "D", "knee (common)")):
                if kb:
                    ax.plot([kb], [dict(pts)[kb]], star, color=c, markersize=14 if star == "*" else 8,
                            markeredgecolor="k", label=f"{o}: {lab} B={kb}")
    if result["mean"]:
        ref = result["mean"]["common_ref"]
        bb = [b for b in batches if b >= ref["batch"]]
        ax.plot(bb, [ref["steps"] * ref["batch"] / b for b in bb], "k:", label="perfect scaling (common ref.)")
        ax.plot(bb, [tol * ref["steps"] * ref["batch"] / b for b in bb], "k--", alpha=0.5,
                label=f"{tol:g} x perfect scaling")
    finish(fig, ax, path, xlabel="global batch size", ylabel="steps to target (best over the LR search)",
           title=f"mnist1d / cnn1d: steps to {target:g} test accuracy, per seed and mean", xlog=2, legend_size=6)


if __name__ == "__main__":
    main()
