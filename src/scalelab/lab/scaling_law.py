"""``scalelab scaling-law``: test error and loss against training-set size (and width), fitted by power laws.

Hestness, Narang, Ardalani, Diamos, Jun, Kianinejad, Patwary, Yang, Zhou 2017, "Deep Learning Scaling is
Predictable, Empirically" (arXiv 1712.00409): past a small-data region, generalization error falls as a power
law of the training-set size m, ``eps(m) = alpha * m^(beta_g)`` (beta_g < 0), down to an irreducible-error floor;
for each data size they take the best model size found. Here:

* every (width, n) pair is trained for the same number of optimizer steps (``--steps``) at the same batch on the
  first ``n`` examples of the training set (one fixed test set), and scored by its best evaluation (the lowest
  test loss and highest accuracy seen, as picking the best validation point does);
* at each n the best width gives the frontier, and two laws are fitted to it (and to each width alone):
  ``err = a * n^-alpha`` (a line in log-log space) and ``err = a * n^-alpha + c`` (with a floor), by weighted
  least squares; ``alpha`` is reported with the standard error from the fit's covariance;
* the error at ``--predict N`` is extrapolated, with a 68% interval from parameter draws of the covariance, and
  checked by training at N (``--no-check`` skips that).

Output in OUT: ``scaling.json``, ``scaling.csv`` (one row per training run) and ``scaling.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import io
import json
import math
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scalelab.lab.plotting import finish
from scalelab.errors import ConfigError


# ---- fitting -------------------------------------------------------------------------------------------------------
def fit_power_law(n: Sequence[float], err: Sequence[float], sigma: Sequence[float] | None = None,
                  floor: bool = False) -> dict[str, Any]:
    """Fit ``err = a * n^-alpha`` (``floor=False``) or ``err = a * n^-alpha + c`` (``floor=True``).

    Returns ``{"a", "alpha", "c", "alpha_se", "cov", "params", "floor"}``; ``cov`` is the covariance of
    ``params`` (``(log a, alpha)`` without floor, ``(a, alpha, c)`` with it).

    Example:
        >>> r = fit_power_law([100, 1000, 10000], [0.5, 0.5 * 10 ** -0.5, 0.05])
        >>> round(r["alpha"], 6), round(r["a"], 4)
        (0.5, 5.0)
    """
    x, y = np.asarray(n, dtype=float), np.asarray(err, dtype=float)
    if len(x) < (4 if floor else 2):
        raise ConfigError(f"a power-law fit needs at least {2 if not floor else 4} sizes, got {len(x)}")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ConfigError("power-law fits need positive sizes and errors")
    s = np.asarray(sigma, dtype=float) if sigma is not None else None
    if not floor:
        # weighted line in log space: log err = log a - alpha log n; d(log err) = sigma / err
        w = None if s is None else 1.0 / np.maximum(s / y, 1e-12)
        X = np.stack([np.ones_like(x), -np.log(x)], 1)
        W = np.ones_like(x) if w is None else w ** 2
        XtW = X.T * W
        cov_unscaled = np.linalg.inv(XtW @ X)
        beta = cov_unscaled @ XtW @ np.log(y)
        resid = np.log(y) - X @ beta
        dof = max(1, len(x) - 2)
        cov = cov_unscaled * float(resid @ (W * resid)) / dof if len(x) > 2 else cov_unscaled * 0.0
        return {"a": float(math.exp(beta[0])), "alpha": float(beta[1]), "c": 0.0,
                "alpha_se": float(math.sqrt(max(cov[1, 1], 0.0))), "params": beta.tolist(), "cov": cov.tolist(),
                "floor": False}
    from scipy.optimize import curve_fit

    base = fit_power_law(x, y, s, floor=False)

    def f(m, a, alpha, c):
        return a * m ** -alpha + c

    p0 = [base["a"], base["alpha"], min(y) * 0.1]
    params, cov = curve_fit(f, x, y, p0=p0, sigma=s, absolute_sigma=False, maxfev=20000,
                            bounds=([0, 0, 0], [np.inf, 5, max(y)]))
    return {"a": float(params[0]), "alpha": float(params[1]), "c": float(params[2]),
            "alpha_se": float(math.sqrt(max(cov[1, 1], 0.0))) if np.all(np.isfinite(cov)) else float("nan"),
            "params": params.tolist(), "cov": cov.tolist(), "floor": True}


def predict(fit: dict[str, Any], n: float, draws: int = 4000, seed: int = 0) -> dict[str, float]:
    """The fitted error at ``n`` and a 68% interval from parameter draws of the fit's covariance."""
    p, cov = np.asarray(fit["params"]), np.asarray(fit["cov"])

    def value(q: np.ndarray) -> np.ndarray:
        if fit["floor"]:
            return q[..., 0] * n ** -q[..., 1] + q[..., 2]
        return np.exp(q[..., 0] - q[..., 1] * math.log(n))

    mid = float(value(p))
    if not np.all(np.isfinite(cov)) or not np.any(cov):
        return {"n": n, "pred": mid, "lo": mid, "hi": mid}
    q = np.random.default_rng(seed).multivariate_normal(p, cov, size=draws, check_valid="ignore")
    v = value(q)
    v = v[np.isfinite(v)]
    return {"n": n, "pred": mid, "lo": float(np.percentile(v, 16)), "hi": float(np.percentile(v, 84))}


# ---- training runs -------------------------------------------------------------------------------------------------
_DATA: dict[str, Any] = {}


def train_point(cfg_dict: dict[str, Any], n: int, out: str) -> dict[str, Any]:
    """Train on the first ``n`` training examples; returns the best test loss/accuracy seen (worker process)."""
    import contextlib

    from scalelab.config import from_dict
    from scalelab.data import Dataset, load_dataset
    from scalelab.lab.report import read_metrics
    from scalelab.train import train

    cfg = from_dict(cfg_dict)
    key = json.dumps(cfg_dict["data"], sort_keys=True)
    if key not in _DATA:
        _DATA[key] = load_dataset(cfg.data)
    full = _DATA[key]
    if n > len(full.x_train):
        raise ConfigError(f"--n-train {n}: the training set has only {len(full.x_train)} examples")
    data = Dataset(full.name, full.x_train[:n], full.y_train[:n], full.x_test, full.y_test, full.num_classes)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        s = train(cfg, Path(out), data=data)
    evals = [r for r in read_metrics(Path(out)) if r.get("kind") == "eval"]
    return {"n": n, "width": cfg.model.width, "best_test_loss": min(r["test_loss"] for r in evals),
            "best_test_acc": max(r["test_acc"] for r in evals), "final_test_acc": s["final_test_acc"],
            "test_n": len(full.x_test), "steps": s["steps"], "train_s": s["train_s"]}


def _run_all(jobs_list: list[tuple[dict, int, str]], jobs: int) -> list[dict[str, Any]]:
    if jobs <= 1:
        return [train_point(*j) for j in jobs_list]
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(train_point, *zip(*jobs_list)))


def point_config(base: dict[str, Any], width: int, steps: int, run_dir: Path) -> dict[str, Any]:
    d = json.loads(json.dumps(base))
    d["model"]["width"] = width
    d["train"].update(max_steps=steps, progress=False, threads=1, checkpoint_every=steps,
                      eval_every=max(1, steps // 20), name=run_dir.name)
    return d


def frontier(points: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    """Per size, the width with the lowest test error (Hestness et al.: the best model for each data size)."""
    out = []
    for n in sizes:
        at = [p for p in points if p["n"] == n]
        if at:
            out.append(min(at, key=lambda p: (1 - p["best_test_acc"], p["best_test_loss"])))
    return out


def fit_all(points: list[dict[str, Any]], sizes: list[int], widths: list[int]) -> dict[str, Any]:
    fits: dict[str, Any] = {}

    def err_sigma(ps):
        e = np.array([max(1 - p["best_test_acc"], 0.5 / p["test_n"]) for p in ps])
        return e, np.sqrt(e * (1 - e) / np.array([p["test_n"] for p in ps]))  # binomial error of a test error

    groups = {"best": frontier(points, sizes)}
    for w in widths:
        groups[f"width{w}"] = sorted((p for p in points if p["width"] == w), key=lambda p: p["n"])
    for name, ps in groups.items():
        if len(ps) < 2:
            continue
        n = [p["n"] for p in ps]
        e, s = err_sigma(ps)
        loss = [p["best_test_loss"] for p in ps]
        fits[name] = {"error": fit_power_law(n, e, s), "loss": fit_power_law(n, loss)}
        if len(ps) >= 4:
            try:
                fits[name]["error_floor"] = fit_power_law(n, e, s, floor=True)
            except (RuntimeError, ValueError) as ex:  # the 3-parameter fit may not converge on few points
                fits[name]["error_floor"] = {"failed": str(ex)[:200]}
    return fits


def run_scaling_law(base: dict[str, Any], sizes: list[int], widths: list[int], steps: int, out: Path,
                    predict_n: int | None = None, check: bool = True, jobs: int = 1) -> dict[str, Any]:
    """Train every (width, size), fit the laws, predict at ``predict_n`` and (``check``) train there."""
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    todo, points = [], []
    for w in widths:
        for n in sizes:
            d = runs / f"w{w}-n{n}"
            done = d / "point.json"
            if done.exists():  # resumable: a finished point is not trained again
                points.append(json.loads(done.read_text()))
            else:
                import shutil

                shutil.rmtree(d, ignore_errors=True)
                todo.append((point_config(base, w, steps, d), n, str(d)))
    for p, (_, _, d) in zip(_run_all(todo, jobs), todo):
        (Path(d) / "point.json").write_text(json.dumps(p) + "\n")
        points.append(p)
    fits = fit_all(points, sizes, widths)
    result: dict[str, Any] = {"sizes": sizes, "widths": widths, "steps": steps, "points": points, "fits": fits,
                              "batch": base["train"]["batch_size"]}
    if predict_n:
        best_w = frontier(points, sizes)[-1]["width"]
        pred = {"width": best_w, "error": predict(fits["best"]["error"], predict_n)}
        if "error_floor" in fits["best"] and "params" in fits["best"]["error_floor"]:
            pred["error_floor"] = predict(fits["best"]["error_floor"], predict_n)
        if check:
            d = runs / f"check-w{best_w}-n{predict_n}"
            if (d / "point.json").exists():
                p = json.loads((d / "point.json").read_text())
            else:
                import shutil

                shutil.rmtree(d, ignore_errors=True)
                p = _run_all([(point_config(base, best_w, steps, d), predict_n, str(d))], 1)[0]
                (d / "point.json").write_text(json.dumps(p) + "\n")
            e = 1 - p["best_test_acc"]
            pred["measured"] = {"error": e, "sigma": math.sqrt(max(e * (1 - e), 1e-12) / p["test_n"]),
                                "best_test_loss": p["best_test_loss"]}
        result["prediction"] = pred
    (out / "scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    buf = io.StringIO()
    cols = ["width", "n", "best_test_acc", "best_test_loss", "final_test_acc", "steps", "train_s"]
    w_ = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
    w_.writeheader()
    w_.writerows(sorted(points, key=lambda p: (p["width"], p["n"])))
    (out / "scaling.csv").write_text(buf.getvalue())
    plot_scaling(result, out / "scaling.png")
    return result


def plot_scaling(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ns = np.geomspace(min(result["sizes"]), max(result["sizes"] + [result.get("prediction", {}).get(
        "error", {}).get("n", 0)]), 100)
    for i, w in enumerate(result["widths"]):
        ps = sorted((p for p in result["points"] if p["width"] == w), key=lambda p: p["n"])
        ax.plot([p["n"] for p in ps], [1 - p["best_test_acc"] for p in ps], "o", alpha=0.6,
                label=f"width {w}")
    best = result["fits"].get("best", {}).get("error")
    if best:
        ax.plot(ns, best["a"] * ns ** -best["alpha"], "k-",
                label=f"best width: err = {best['a']:.3g} n^-{best['alpha']:.3f} (±{best['alpha_se']:.3f})")
    fl = result["fits"].get("best", {}).get("error_floor", {})
    if "params" in fl:
        ax.plot(ns, fl["a"] * ns ** -fl["alpha"] + fl["c"], "k--",
                label=f"with floor: {fl['a']:.3g} n^-{fl['alpha']:.3f} + {fl['c']:.3g}")
    pred = result.get("prediction")
    if pred:
        e = pred["error"]
        ax.errorbar([e["n"]], [e["pred"]], yerr=[[e["pred"] - e["lo"]], [e["hi"] - e["pred"]]], fmt="s",
                    color="tab:red", capsize=4, label=f"predicted at n={e['n']}")
        if "error_floor" in pred:
            f = pred["error_floor"]
            ax.errorbar([f["n"] * 1.04], [f["pred"]], yerr=[[f["pred"] - f["lo"]], [f["hi"] - f["pred"]]],
                        fmt="D", color="tab:purple", capsize=4, label=f"predicted with floor at n={f['n']}")
        if "measured" in pred:
            m = pred["measured"]
            ax.errorbar([e["n"]], [m["error"]], yerr=[m["sigma"]], fmt="*", color="k", markersize=12,
                        capsize=4, label="measured there")
    return finish(fig, ax, path, xlabel="training examples n", ylabel="test error (best evaluation)",
                  title="data scaling (Hestness et al. 2017)", xlog=10, legend_size=7)


def format_result(r: dict[str, Any]) -> str:
    lines = [f"{'width':>6} " + " ".join(f"{n:>9}" for n in r["sizes"]) + "   (test error, best evaluation)"]
    for w in r["widths"]:
        row = {p["n"]: 1 - p["best_test_acc"] for p in r["points"] if p["width"] == w}
        lines.append(f"{w:>6} " + " ".join(f"{row.get(n, float('nan')):>9.4f}" for n in r["sizes"]))
    for name, f in r["fits"].items():
        e, lo = f["error"], f["loss"]
        line = (f"{name:>8}: error ~ n^-{e['alpha']:.3f} ± {e['alpha_se']:.3f}, "
                f"loss ~ n^-{lo['alpha']:.3f} ± {lo['alpha_se']:.3f}")
        fl = f.get("error_floor", {})
        if "params" in fl:
            line += f"; with floor: n^-{fl['alpha']:.3f} ± {fl['alpha_se']:.3f} + {fl['c']:.4f}"
        lines.append(line)
    p = r.get("prediction")
    if p:
        e = p["error"]
        line = (f"predicted test error at n={e['n']} (width {p['width']}): {e['pred']:.4f} "
                f"[{e['lo']:.4f}, {e['hi']:.4f}] (68%)")
        if "error_floor" in p:
            ef = p["error_floor"]
            line += f"; with floor {ef['pred']:.4f} [{ef['lo']:.4f}, {ef['hi']:.4f}]"
        lines.append(line)
        if "measured" in p:
            m = p["measured"]
            verdicts = []
            for key, label in (("error", "the power law"), ("error_floor", "the power law with floor")):
                if key in p:
                    q = p[key]
                    inside = q["lo"] - m["sigma"] <= m["error"] <= q["hi"] + m["sigma"]
                    verdicts.append(f"{'consistent with' if inside else 'outside'} {label}")
            lines.append(f"measured there: {m['error']:.4f} ± {m['sigma']:.4f} -> {'; '.join(verdicts)}")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------------------
def _ints(text: str, flag: str) -> list[int]:
    try:
        v = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected integers separated by commas") from None
    if not v or min(v) < 1:
        raise ConfigError(f"{flag} {text!r}: need positive integers")
    return sorted(set(v))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="base run config")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one config field; repeatable")
    p.add_argument("--n-train", required=True, help="training-set sizes, e.g. 1000,2000,4000,8000")
    p.add_argument("--widths", default=None, help="model widths (model.width), e.g. 8,16,32 (default: the "
                   "config's)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run (default 1000)")
    p.add_argument("--predict", type=int, default=None, help="extrapolate to this size and check it by training")
    p.add_argument("--no-check", action="store_true", help="extrapolate without training at --predict")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/scaling-<date>-<time>); "
                   "finished runs in it are reused")


def run(args) -> int:
    import datetime as dt

    from scalelab.config import load_config
    from scalelab.models.registry import dims

    cfg = load_config(args.config, args.overrides)
    sizes = _ints(args.n_train, "--n-train")
    widths = _ints(args.widths, "--widths") if args.widths else [dims(cfg.model)[0]]
    if len(sizes) < 2 or args.steps < 1 or args.jobs < 1:
        raise ConfigError("need at least two --n-train sizes, --steps >= 1 and --jobs >= 1")
    if args.predict is not None and args.predict <= max(sizes):
        raise ConfigError(f"--predict {args.predict}: must be larger than the largest --n-train size")
    out = Path(args.out) if args.out else Path("runs") / f"scaling-{dt.datetime.now():%Y%m%d-%H%M%S}"
    result = run_scaling_law(cfg.to_dict(), sizes, widths, args.steps, out, args.predict, not args.no_check,
                             args.jobs)
    print(format_result(result))
    print(f"wrote {out / 'scaling.json'}, {out / 'scaling.csv'}, {out / 'scaling.png'}")
    return 0
