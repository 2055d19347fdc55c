"""The NIPS 2017 workshop's question, answered by the model: ResNet-50 on ImageNet at ~100 PFLOP/s of peak.

"If we could parallelize this training across the world's fastest supercomputers (~100 PFLOP/s), it would be
possible to train the same model in under a minute." Today's recipe for 75.9% top-1 is MLPerf's (LARS, label
smoothing, ~35 epochs at a global batch of ~3,200: MLPerf Training v3.0, NVIDIA dgxh100_n8 ResNet result).
Larger batches need more epochs (Goyal et al. 2017; You et al. 2017; McCandlish et al. 2018), so the answer is
given at 35 epochs and, as a sensitivity, at 45.
"""

from __future__ import annotations

from scalelab.perf.catalog import Catalog, load_catalog
from scalelab.perf.project import Setup, project
from scalelab.perf.stats import Steps
from scalelab.perf.sweep import plot, sweep
from scalelab.perf.workload import workload

PER_DEVICE = 32
SYSTEMS = {"h100": 100, "v100": 800, "a100": 320, "tpu-v4": 364}   # ~100 PFLOP/s of dense 16-bit peak each
PLOT_DEVICES = [2 ** k for k in range(3, 13)]


def workshop(catalog: Catalog | None = None, plot_path: str | None = None) -> dict:
    """Predicted time at ~100 PFLOP/s per accelerator, and the smallest device counts for under a minute."""
    cat = catalog or load_catalog()
    wl = workload("resnet50", "imagenet")
    at_100pf = []
    for name, n in SYSTEMS.items():
        acc = cat.accelerator(name)
        p = project(Setup(wl, name, n, PER_DEVICE * n, Steps(epochs=35)), cat)
        at_100pf.append({"accelerator": name, "devices": n, "peak_pflops": n * acc.peak_for(
            cat.family(acc.family).dtype) / 1e15, "batch": PER_DEVICE * n, "epochs": 35,
            "predicted_s": p.total_s, "step_ms": p.step_s * 1e3, "assumptions": p.assumptions})
    under_minute = []
    series = {}
    for name in SYSTEMS:
        ps = sweep(Setup(wl, name, 8, 8 * PER_DEVICE, Steps(epochs=35)), PLOT_DEVICES, PER_DEVICE, cat)
        series[name] = ps
        for epochs in (35, 45):
            n = _devices_for(wl, name, 60.0, epochs, cat)
            under_minute.append({"accelerator": name, "epochs": epochs, "devices": n,
                                 "batch": n * PER_DEVICE if n else None})
    if plot_path:
        plot(series, plot_path, f"ResNet-50/ImageNet, {PER_DEVICE} per device, 35 epochs (scalelab perf model)",
             hline=60.0)
    return {"per_device_batch": PER_DEVICE, "at_100_pflops": at_100pf, "under_a_minute": under_minute,
            "plot": plot_path}


def _devices_for(wl, name: str, target_s: float, epochs: float, cat: Catalog, limit: int = 1 << 16):
    """Smallest device count (multiple of 8) whose predicted time is under ``target_s``, or None."""
    lo, hi = 8, 8
    while project(Setup(wl, name, hi, hi * PER_DEVICE, Steps(epochs=epochs)), cat).total_s >= target_s:
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        if project(Setup(wl, name, mid, mid * PER_DEVICE, Steps(epochs=epochs)), cat).total_s < target_s:
            hi = mid
        else:
            lo = mid
    return hi


def format_workshop(r: dict) -> str:
    lines = ["ResNet-50 on ImageNet to 75.9% with today's recipe (MLPerf: LARS, ~35 epochs), "
             f"{r['per_device_batch']} images per device:", "",
             f"  {'system':18} {'peak':>10} {'batch':>7} {'predicted':>10}"]
    for a in r["at_100_pflops"]:
        lines.append(f"  {str(a['devices']) + ' x ' + a['accelerator']:18} {a['peak_pflops']:7.1f} PF "
                     f"{a['batch']:7d} {a['predicted_s']:9.1f}s")
    lines += ["", "  devices needed for under a minute:"]
    for u in r["under_a_minute"]:
        need = f"{u['devices']} (batch {u['batch']})" if u["devices"] else "not reachable"
        lines.append(f"    {u['accelerator']:8} at {u['epochs']} epochs: {need}")
    if r["plot"]:
        lines.append(f"\n  plot: {r['plot']}")
    return "\n".join(lines)
