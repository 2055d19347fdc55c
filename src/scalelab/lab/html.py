"""``scalelab report SWEEP_DIR``: one HTML page with a batch-size sweep's tables and plots.

The page holds the sweep's settings, steps-to-target per batch and optimizer (best over the LR search, with the
ratio to perfect scaling), each optimizer's knee next to the knee the gradient noise scale predicts (when a
``scalelab noise`` result is in ``SWEEP_DIR/noise/``: McCandlish et al. 2018, arXiv 1812.06162), the plots, and
every trial. A sweep that is still running (or was killed) is reported from the trials finished so far, marked
partial.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from scalelab.errors import DataError


def load_sweep(sweep_dir: Path) -> tuple[dict[str, Any], bool]:
    """The sweep summary, recomputed from the trial files (so a partial sweep reports too); and if partial."""
    from scalelab.lab.sweep import SweepSpec, load_trials, summarize

    spec_path = sweep_dir / "sweep_spec.json"
    if not spec_path.exists():
        raise DataError(f"{sweep_dir} is not a sweep directory: no sweep_spec.json")
    spec = SweepSpec(**json.loads(spec_path.read_text()))
    trials = list(load_trials(sweep_dir).values())
    partial = not (sweep_dir / "sweep.json").exists() or (
        len(json.loads((sweep_dir / "sweep.json").read_text())["trials"]) != len(trials))
    return summarize(spec, trials), partial


def load_noise(sweep_dir: Path) -> dict[str, Any] | None:
    p = sweep_dir / "noise" / "noise.json"
    return json.loads(p.read_text()) if p.exists() else None


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and spec:
        return format(v, spec)
    return html.escape(str(v))


def render(summary: dict[str, Any], noise: dict[str, Any] | None, partial: bool, plots: list[str],
           noise_plot: str | None) -> str:
    from scalelab.lab.knee import predicted_knee
    from scalelab.lab.noise import small_batches

    spec = summary["spec"]
    base = spec["base"]
    opts, batches = spec["optimizers"], spec["batches"]
    h: list[str] = []
    h.append("<!doctype html><html><head><meta charset='utf-8'><title>scalelab sweep</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}"
             ".knee{background:#d8f5d0;font-weight:bold}.off{color:#a33}.partial{background:#fff3c4;padding:8px}"
             "img{max-width:100%;border:1px solid #ddd;margin:6px 0}</style></head><body>")
    h.append(f"<h1>Batch-size sweep: {_fmt(base['data']['name'])} / {_fmt(base['model']['name'])}</h1>")
    if partial:
        h.append(f"<p class='partial'><b>Partial:</b> {len(summary['trials'])} trials finished so far; the "
                 f"sweep has not completed. Rerun the same <code>scalelab sweep</code> command to resume.</p>")
    h.append("<p>Steps to reach test accuracy <b>{}</b>, best over a learning-rate search per batch size and "
             "optimizer (Shallue et al. 2018, arXiv 1811.03600). Knee: the largest batch up to which every batch "
             "needs at most {}x the steps of perfect scaling from the smallest batch.</p>"
             .format(spec["target_acc"], spec["tol"]))
    guesses = ", ".join(f"{o}: {g['lr']:g} at batch {g['batch']} scaled {g['rule']}" for o, g in
                        spec["guesses"].items())
    quasi = spec.get("search") == "quasi-random"
    hr = spec.get("horizon_range") or []
    search = (f"quasi-random search: {spec['trials']} points per cell of a scrambled Sobol sequence, LR guess x "
              f"{spec['lr_range'][0]:g}-{spec['lr_range'][1]:g} (log-uniform)" if quasi else
              f"LR grid: guess x {', '.join(f'{m:g}' for m in spec['lr_mults'])} (up to {spec['extend']} more "
              "points beyond an edge that wins)")
    h.append("<ul>"
             f"<li>batches: {', '.join(map(str, batches))}</li>"
             f"<li>{search}; guesses: {html.escape(guesses)}</li>"
             f"<li>warm-up epochs: {', '.join(f'{w:g}' for w in spec['warmups'])}"
             + (f" (the first at every batch, the others from batch {spec['warmup_search_from']} on)"
                if spec.get("warmup_search_from") and len(spec["warmups"]) > 1 else "")
             + "; LR schedule after warm-up: "
             f"{_fmt(base['recipe']['schedule'])}; budget "
             + (f"searched over {', '.join(f'{e:g}' for e in spec['horizons'])} epochs (the LR schedule's length)"
                if spec.get("horizons") else
                f"drawn from {hr[0]:g}-{hr[1]:g} epochs, log-uniform (the LR schedule's length)" if quasi and hr
                else f"{spec['budget_epochs']:g} epochs")
             + (f", at least {spec['budget_steps']} steps" if spec.get("budget_steps") else "")
             + f" (per batch: the budget column below); evaluation every "
             f"max(1, round({spec['eval_examples']}/B)) steps</li>"
             f"<li>training examples: {base['data']['n_train'] or 'dataset default'}; test examples: "
             f"{base['data']['n_test'] or 'dataset default'}</li>"
             f"<li>trials: " + ", ".join(f"{v} {k}" for k, v in summary["counts"].items()) + "</li></ul>")

    h.append("<h2>Steps to target</h2><table><tr><th>batch</th>")
    h += [f"<th>{_fmt(o)} steps</th><th>x perfect</th><th>LR</th>" for o in opts]
    h.append("</tr>")
    for b in batches:
        h.append(f"<tr><td>{b}</td>")
        for o in opts:
            row = next(r for r in summary["best"] if r["batch"] == b and r["optimizer"] == o)
            k = summary["knees"][o]
            ratio = k["ratios"].get(str(b))
            cls = "knee" if k["batch"] == b else ("off" if ratio is None or ratio > spec["tol"] else "")
            steps = (_fmt(row["steps_to_target"]) if row["steps_to_target"] is not None or not row.get("budget")
                     else f"missed in {row['budget']}")
            if row.get("first_eval"):  # reached at the first evaluation: an upper bound
                steps = f"&le;&nbsp;{steps}"
            h.append(f"<td class='{cls}'>{steps}</td><td class='{cls}'>"
                     f"{_fmt(ratio, '.2f') if ratio is not None else ('–' if row['steps_to_target'] is None else '')}"
                     f"</td><td>{_fmt(row['lr'], '.3g')}</td>")
        h.append("</tr>")
    h.append("</table>")
    if any(r.get("first_eval") for r in summary["best"]):
        h.append("<p>&le;: the best trial reached the target at its first evaluation, so the figure is an "
                 "upper bound at the evaluation interval (max(1, round(eval_examples / B)) steps).</p>")

    h.append("<h2>Knees: measured and predicted</h2>")
    if noise:
        bs = noise["predicted_critical_batch"]
        h.append(f"<p>Gradient noise scale B_simple = tr(&Sigma;)/|G|&sup2; measured during a training run at "
                 f"batch {noise['batch']} ({small_batches(noise)} of {noise['shards_batch']}; McCandlish et "
                 f"al. 2018): "
                 f"<b>{_fmt(bs, '.0f')}</b>"
                 + (f" when the run reached test accuracy {noise['target_acc']:g}" if noise.get(
                     "b_simple_at_target") is not None else " (last 20% of the run)")
                 + ". Under S = S_min(1 + B_noise/B) the steps leave perfect scaling by the factor tol at "
                 "B = tol&middot;b0 + (tol &minus; 1)&middot;B_noise.</p>")
    h.append("<table><tr><th>optimizer</th><th>measured knee</th><th>first batch off</th>"
             "<th>McCandlish fit B_noise (steps curve)</th><th>B_simple (noise scale)</th>"
             "<th>knee predicted from B_simple</th><th>knee from the common reference</th></tr>")
    for o in opts:
        k = summary["knees"][o]
        pred = None
        if noise and noise.get("predicted_critical_batch") and k["ref_batch"]:
            pred = predicted_knee(noise["predicted_critical_batch"], k["ref_batch"], k["tol"])
        h.append(f"<tr><td>{_fmt(o)}</td><td>{_fmt(k['batch'])}</td><td>{_fmt(k['first_off'])}</td>"
                 f"<td>{_fmt(k['mccandlish_b_noise'], '.0f')}</td>"
                 f"<td>{_fmt(noise['predicted_critical_batch'], '.0f') if noise else '–'}</td>"
                 f"<td>{_fmt(pred, '.0f')}</td><td>{_fmt((k.get('common') or {}).get('batch'))}</td></tr>")
    h.append("</table>")
    common = next((k["common"] for k in summary["knees"].values() if k.get("common")), None)
    if common:
        h.append(f"<p>The common reference is the fastest optimizer at the smallest batch ({common['ref_steps']} "
                 f"steps at batch {common['ref_batch']}): perfect scaling from it is the same line for every "
                 f"optimizer, so an optimizer that is slow at small batches does not get a late knee from its own "
                 f"slow start.</p>")

    h.append("<h2>Plots</h2>")
    for p in plots:
        h.append(f"<img src='{html.escape(p)}' alt='{html.escape(p)}'>")
    if noise_plot:
        h.append(f"<img src='{html.escape(noise_plot)}' alt='noise scale'>")

    h.append("<h2>Every trial</h2><details><summary>show all {} trials</summary><table><tr>".format(
        len(summary["trials"])))
    horizon = ["horizon"] if spec.get("horizons") or hr else []   # grid horizons, or drawn per trial
    cols = ["optimizer", "batch", "warmup", *horizon, "mult", "lr", "status", "steps_to_target", "steps", "cap",
            "budget", "best_test_acc", "wall_s"]
    h += [f"<th>{c}</th>" for c in cols] + ["</tr>"]
    for r in summary["trials"]:
        style = " class='knee'" if r.get("best") else ""
        h.append(f"<tr{style}>" + "".join(
            f"<td>{_fmt(r.get(c), '.4g') if isinstance(r.get(c), float) else _fmt(r.get(c))}</td>" for c in cols)
            + "</tr>")
    h.append("</table></details></body></html>")
    return "\n".join(h)


def report_sweep(sweep_dir: Path) -> str:
    """Write ``SWEEP_DIR/report.html`` (and refresh the plots); returns print-ready text."""
    from scalelab.lab.knee import predicted_knee
    from scalelab.lab.sweep import format_table, write_tables
    from scalelab.lab.sweep_plots import plot_sweep

    sweep_dir = Path(sweep_dir)
    summary, partial = load_sweep(sweep_dir)
    noise = load_noise(sweep_dir)
    predicted = {}
    if noise and noise.get("predicted_critical_batch"):
        refs = [k["ref_batch"] for k in summary["knees"].values() if k["ref_batch"]]
        if refs:
            predicted[f"knee predicted by noise scale (B_simple={noise['predicted_critical_batch']:.0f})"] = (
                predicted_knee(noise["predicted_critical_batch"], min(refs), summary["spec"]["tol"]))
    write_tables(summary, sweep_dir)
    if not partial:  # sweep.json recomputed too (same trials; a newer scalelab may add fields), session info kept
        from scalelab.lab.sweep import _write_json_atomic

        old = json.loads((sweep_dir / "sweep.json").read_text())
        summary.update({k: old[k] for k in ("wall_s_this_session", "resumed_trials") if k in old})
        _write_json_atomic(sweep_dir / "sweep.json", summary)
    paths = plot_sweep(summary, sweep_dir / "plots", predicted)
    noise_plot = None
    if noise and (sweep_dir / "noise" / "noise.png").exists():
        noise_plot = "noise/noise.png"
    page = render(summary, noise, partial, [str(p.relative_to(sweep_dir)) for p in paths], noise_plot)
    out = sweep_dir / "report.html"
    out.write_text(page)
    text = format_table(summary)
    return (("PARTIAL sweep (not finished)\n" if partial else "") + text + "\n"
            + "\n".join(f"wrote {p}" for p in paths) + f"\nwrote {out}")
