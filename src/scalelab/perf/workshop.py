"""The NIPS 2017 workshop's question, answered by the model: ResNet-50 on ImageNet at ~100 PFLOP/s of peak.

"If we could parallelize this training across the world's fastest supercomputers (~100 PFLOP/s), it would be
possible to train the same model in under a minute." Today's recipe for 75.9% top-1 is MLPerf's (LARS, label
smoothing, 35 epochs at a global batch of 3,200: MLPerf Training v3.0, NVIDIA dgxh100_n8 ResNet result).

Larger batches need more epochs. The steps to the target follow McCandlish et al. 2018 (arXiv 1812.06162),
``S = S_min (1 + B_noise / B)``, anchored at the MLPerf point (35 epochs at B = 3,200) with an assumed noise
scale ``B_noise = 32,768``: of the order of the ImageNet critical batch in McCandlish et al. (10^4-10^5), and
it gives ~95 epochs at B = 64k, close to the 90 epochs Jia et al. 2018 needed there. It is an assumption, not
a fit, and the answer is also given with 35 epochs at every batch (the optimistic bound).
"""

from __future__ import annotations

from scalelab.perf.catalog import Catalog, load_catalog
from scalelab.perf.project import Setup, project
from scalelab.perf.stats import Steps
from scalelab.perf.sweep import fastest, plot, sweep
from scalelab.perf.workload import workload

PER_DEVICE = 32
ANCHOR_BATCH, ANCHOR_EPOCHS = 3200, 35.0
NOISE_SCALE = 32768.0
SYSTEMS = {"h100": 100, "v100": 800, "a100": 320, "tpu-v4": 364}   # ~100 PFLOP/s of dense 16-bit peak each
PLOT_DEVICES = [2 ** k for k in range(3, 15)]


def recipe_steps(dataset_size: int, noise_scale: float = NOISE_SCALE) -> Steps:
    """McCandlish steps through the MLPerf anchor: S_min = S(3200) / (1 + B_noise / 3200)."""
    s_anchor = ANCHOR_EPOCHS * dataset_size / ANCHOR_BATCH
    return Steps(noise_scale=noise_scale, min_steps=s_anchor / (1 + noise_scale / ANCHOR_BATCH))


def workshop(catalog: Catalog | None = None, plot_path: str | None = None,
             noise_scale: float = NOISE_SCALE) -> dict:
    """Predicted time at ~100 PFLOP/s per accelerator, the device counts for under a minute, the fastest."""
    cat = catalog or load_catalog()
    wl = workload("resnet50", "imagenet")
    rules = {"mccandlish": recipe_steps(wl.dataset_size, noise_scale),
             "35-epochs": Steps(epochs=ANCHOR_EPOCHS)}
    at_100pf = []
    for name, n in SYSTEMS.items():
        acc = cat.accelerator(name)
        row = {"accelerator": name, "devices": n, "batch": PER_DEVICE * n,
               "peak_pflops": n * acc.peak_for(cat.family(acc.family).dtype) / 1e15}
        for rule, steps in rules.items():
            p = project(Setup(wl, name, n, PER_DEVICE * n, steps), cat)
            row[rule] = {"predicted_s": p.total_s, "epochs": p.steps / p.steps_per_epoch,
                         "step_ms": p.step_s * 1e3}
        at_100pf.append(row)
    under_minute, best, series = [], [], {}
    for name in SYSTEMS:
        ps = sweep(Setup(wl, name, 8, 8 * PER_DEVICE, rules["mccandlish"]), PLOT_DEVICES, PER_DEVICE, cat)
        series[name] = ps
        f = fastest(ps)
        best.append({"accelerator": name, "devices": f.setup["devices"], "predicted_s": f.total_s,
                     "floor_s": rules["mccandlish"].min_steps * f.step_s})
        for rule, steps in rules.items():
            n = _devices_for(wl, name, 60.0, steps, cat)
            under_minute.append({"accelerator": name, "rule": rule, "devices": n,
                                 "batch": n * PER_DEVICE if n else None,
                                 "peak_pflops": n * cat.accelerator(name).peak_for(
                                     cat.family(cat.accelerator(name).family).dtype) / 1e15 if n else None})
    if plot_path:
        plot(series, plot_path, f"ResNet-50/ImageNet to 75.9%: {PER_DEVICE}/device, "
             f"McCandlish steps (B_noise {noise_scale:g})", hline=60.0)
    return {"per_device_batch": PER_DEVICE, "noise_scale": noise_scale, "at_100_pflops": at_100pf,
            "under_a_minute": under_minute, "fastest": best, "plot": plot_path}


def _devices_for(wl, name: str, target_s: float, steps: Steps, cat: Catalog, limit: int = 1 << 17):
    """Smallest device count (multiple of 8) whose predicted time is under ``target_s``, or None."""
    def t(n: int) -> float:
        return project(Setup(wl, name, n, n * PER_DEVICE, steps), cat).total_s

    lo, hi = 8, 8
    while t(hi) >= target_s:
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        lo, hi = (lo, mid) if t(mid) < target_s else (mid, hi)
    return hi


def format_workshop(r: dict) -> str:
    lines = [f"ResNet-50 on ImageNet to 75.9% with today's recipe (MLPerf: LARS; 35 epochs at batch 3,200, "
             f"more epochs at larger batches by McCandlish with B_noise {r['noise_scale']:g}), "
             f"{r['per_device_batch']} images per device:", "",
             f"  {'system':16} {'peak':>9} {'batch':>7} {'epochs':>7} {'predicted':>10}   "
             f"{'(at 35 epochs)':>14}"]
    for a in r["at_100_pflops"]:
        m, c = a["mccandlish"], a["35-epochs"]
        lines.append(f"  {str(a['devices']) + ' x ' + a['accelerator']:16} {a['peak_pflops']:6.1f} PF "
                     f"{a['batch']:7d} {m['epochs']:7.1f} {m['predicted_s']:9.1f}s   "
                     f"{c['predicted_s']:13.1f}s")
    lines += ["", "  for under a minute:"]
    for u in r["under_a_minute"]:
        need = (f"{u['devices']} devices ({u['peak_pflops']:.0f} PFLOP/s peak, batch {u['batch']})"
                if u["devices"] else "not reachable")
        lines.append(f"    {u['accelerator']:8} {u['rule']:11} {need}")
    lines += ["", "  fastest in the sweep 8..16384 devices (time stops falling near S_min x step):"]
    for b in r["fastest"]:
        lines.append(f"    {b['accelerator']:8} {b['predicted_s']:7.1f} s at {b['devices']} devices "
                     f"(floor S_min x step = {b['floor_s']:.1f} s)")
    if r["plot"]:
        lines.append(f"\n  plot: {r['plot']}")
    return "\n".join(lines)
