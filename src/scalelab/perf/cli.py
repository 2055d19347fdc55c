"""``scalelab project``: predict time-to-train on other hardware, with its breakdown.

    scalelab project --model resnet50 --dataset imagenet --hardware h100 --devices 64 --per-node 8 \\
                     --interconnect 8xib-ndr --batch 3264 --epochs 40 [--compress dgc:0.999] \\
                     [--parallel data|hybrid:MxD|pipeline:S] [--json]
    scalelab project --devices 1..4096 --per-device-batch 32 ... [--plot FILE.png]   # sweep
    scalelab project --records records.csv [--json]                                  # check published records
    scalelab project --workshop [--plot docs/perf_devices.png]                      # the NIPS 2017 question
    scalelab project --calibrate [--json]                                            # measure this machine
"""

from __future__ import annotations

import argparse
import json

from scalelab.errors import ConfigError
from scalelab.perf.catalog import load_catalog
from scalelab.perf.project import Projection, Setup, project
from scalelab.perf.stats import Steps
from scalelab.perf.sweep import fastest, parse_devices, plot, sweep
from scalelab.perf.workload import workload


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet50",
                   help="a scalelab model, bert-large or gpt2 (default resnet50)")
    p.add_argument("--dataset", default=None, help="imagenet, cifar10, mnist1d, digits, wikibooks-512, "
                   "webtext-1024 (default: the model's)")
    p.add_argument("--hardware", default="h100", help="accelerator name from the catalog (default h100)")
    p.add_argument("--devices", default="64", help="N, or a sweep LO..HI (powers of two) or N,M,...")
    p.add_argument("--per-node", type=int, default=None, help="devices per node (default: the accelerator's)")
    p.add_argument("--interconnect", default=None, help="network between nodes, [N x]name, e.g. 8xib-ndr")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch (default per-device-batch x devices)")
    p.add_argument("--per-device-batch", type=int, default=32, help="sweeps: batch per device (default 32)")
    p.add_argument("--max-batch", type=int, default=None, help="sweeps: cap on the global batch")
    p.add_argument("--epochs", type=float, default=None, help="epochs to the target (default 35 if no "
                   "McCandlish parameters)")
    p.add_argument("--noise-scale", type=float, default=None, help="McCandlish B_noise (with --min-steps; "
                   "with --workshop: overrides its assumed 32768)")
    p.add_argument("--min-steps", type=float, default=None, help="McCandlish S_min (with --noise-scale)")
    p.add_argument("--steps-table", default=None, metavar="FILE.csv|SWEEP_DIR", help="measured steps-to-target "
                   "per global batch: a CSV with columns batch,steps, or a scalelab sweep directory")
    p.add_argument("--compress", default=None,
                   help="none, fp16, sign, qsgd:BITS, powersgd:FACTOR, dgc:SPARSITY")
    p.add_argument("--parallel", default="data", help="data, hybrid:MxD or pipeline:S")
    p.add_argument("--microbatches", type=int, default=None,
                   help="pipeline micro-batches (default 4 x stages)")
    p.add_argument("--algorithm", default="auto",
                   help="all-reduce: auto, ring, tree, hierarchical, torus, ps")
    p.add_argument("--input-rate", type=float, default=None, help="input pipeline samples/s per node")
    p.add_argument("--catalog", default=None, metavar="FILE.toml", help="extra/overriding catalog entries")
    p.add_argument("--records", default=None, metavar="FILE.csv", help="predict every record of the file")
    p.add_argument("--workshop", action="store_true", help="ResNet-50 at ~100 PFLOP/s and what under a "
                   "minute needs")
    p.add_argument("--calibrate", action="store_true", help="measure this machine (compute, gloo all-reduce)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="sweeps/--workshop: write the plot here")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    cat = load_catalog(args.catalog)
    if args.records:
        return _records(args, cat)
    if args.calibrate:
        from scalelab.perf.calibrate import calibrate, format_calibration
        result = calibrate()
        print(json.dumps(result, indent=2) if args.json else format_calibration(result))
        return 0
    if args.workshop:
        return _workshop(args, cat)
    wl = workload(args.model, args.dataset)
    steps = _steps(args)
    devices = parse_devices(args.devices)
    base = Setup(wl, args.hardware, devices[0], args.batch or args.per_device_batch * devices[0], steps,
                 args.per_node, args.interconnect, args.compress, args.parallel, args.algorithm,
                 args.microbatches, None, args.input_rate)
    if len(devices) == 1:
        p = project(base, cat)
        print(json.dumps(p.to_dict(), indent=2) if args.json else format_projection(p))
        return 0
    if args.parallel != "data":
        raise ConfigError("device sweeps support --parallel data only")
    ps = sweep(base, devices, args.per_device_batch, cat, args.max_batch or args.batch)
    best = fastest(ps)
    if args.plot:
        plot({args.hardware: ps}, args.plot, f"{wl.name} on {args.hardware}, {steps.describe()}")
    if args.json:
        print(json.dumps([p.to_dict() for p in ps], indent=2))
    else:
        print(format_sweep(ps))
        print(f"fastest: {best.setup['devices']} devices, {_dur(best.total_s)}; beyond it more devices do "
              "not "
              "pay" if best is not ps[-1] else f"still falling at {best.setup['devices']} devices")
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def _steps(args) -> Steps:
    if args.steps_table:
        from scalelab.perf.stats import read_steps_table
        return read_steps_table(args.steps_table)
    if args.noise_scale is not None or args.min_steps is not None:
        return Steps(epochs=args.epochs, noise_scale=args.noise_scale, min_steps=args.min_steps) \
            if args.epochs is None else Steps(epochs=args.epochs)
    return Steps(epochs=args.epochs if args.epochs is not None else 35.0)


def _records(args, cat) -> int:
    from scalelab.perf.records import predict_records, read_records, summary

    results = predict_records(read_records(args.records, cat), cat)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "projection"} for r in results], indent=2))
        return 0
    print(f"{'name':24} {'hardware':>14} {'predicted':>11} {'actual':>9} {'ratio':>6}")
    for r in results:
        print(f"{r['name']:24} {str(r['count']) + 'x' + r['accelerator']:>14} {r['predicted_s']:10.1f}s "
              f"{r['actual_s']:8.1f}s {r['ratio']:6.2f}")
        for note in r["assumptions"]:
            print(f"{'':26}assumed: {note}")
    s = summary(results)
    print(f"median error {s['median_error']:.2f}x, worst {s['max_error']:.2f}x, {s['within_1.5x']}/{s['n']} "
          f"within 1.5x (goal: all within 1.5x, median < 1.25x: {'met' if s['goal_met'] else 'NOT met'})")
    return 0


def _workshop(args, cat) -> int:
    from scalelab.perf.workshop import NOISE_SCALE, format_workshop, workshop

    result = workshop(cat, plot_path=args.plot, noise_scale=args.noise_scale or NOISE_SCALE)
    print(json.dumps(result, indent=2) if args.json else format_workshop(result))
    return 0


def _dur(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def format_projection(p: Projection) -> str:
    """The human-readable breakdown of one projection."""
    s = p.setup
    ms = 1e3
    lines = [
        f"{s['model']} on {s['dataset']}: {s['devices']} x {s['accelerator']} ({s['nodes']} nodes of "
        f"{s['per_node']}, {s['interconnect']}), batch {s['batch']} ({p.per_device_batch:g} per device), "
        f"parallel {s['parallel']}",
        f"  compute per step     {p.compute_s * ms:9.2f} ms  ({p.compute_bound}-bound; {p.dtype} peak "
        f"{p.peak_flops / 1e12:g} TFLOP/s x {s['compute_eff']:g}, memory x {s['memory_eff']:g})",
        f"    HBM traffic        {p.hbm_bytes / 1e9:9.2f} GB" + (
            f"  (tensors kept in {s['onchip_memory'] / 2**20:g} MiB on chip between kernels: "
            f"{s['onchip_saving']:.2f}x less)" if s["onchip_memory"] else ""),
        f"    forward / backward {p.forward_s * ms:9.2f} / {p.backward_s * ms:.2f} ms",
        f"    of which kernels   {p.kernel_overhead_s * ms:9.2f} ms  (a fixed {s['kernel_s'] * 1e6:g} us "
        f"per kernel, independent of the batch)",
        f"  optimizer update     {p.optimizer_s * ms:9.2f} ms",
        f"  communication        {p.comm_s * ms:9.2f} ms  ({p.algorithm}, {p.comm_bytes / 1e6:.1f} MB "
        f"{s['comm_dtype']} in {p.buckets} bucket(s), compress {s['compress']})",
        f"    overlapped         {p.comm_overlap_s * ms:9.2f} ms  with backward; exposed "
        f"{p.comm_exposed_s * ms:.2f} ms",
    ]
    if p.model_parallel_s or p.bubble_fraction:
        lines.append(f"  model/pipeline comm  {p.model_parallel_s * ms:9.2f} ms  (bubble "
                     f"{p.bubble_fraction:.1%})")
    lines += [
        f"  input pipeline       {p.input_s * ms:9.2f} ms  " + ("(overlapped)" if p.input_s else
                                                                "(not limiting: no --input-rate)"),
        f"  step                 {p.step_s * ms:9.2f} ms  = {p.achieved_flops / 1e12:.1f} TFLOP/s per device "
        f"({p.achieved_flops / p.peak_flops:.1%} of peak)",
        f"  steps                {p.steps:9.0f}     ({p.steps_per_epoch:.1f} per epoch; {s['steps_rule']})",
        f"  time-to-train        {_dur(p.total_s)} ({p.total_s:.1f} s)",
    ]
    lines += [f"  assumed: {a}" for a in p.assumptions]
    return "\n".join(lines)


def format_sweep(ps: list[Projection]) -> str:
    rows = [f"{'devices':>8} {'batch':>8} {'steps':>9} {'step ms':>9} {'comm exp ms':>11} {'time':>10}"]
    for p in ps:
        rows.append(f"{p.setup['devices']:8d} {p.setup['batch']:8d} {p.steps:9.0f} {p.step_s * 1e3:9.2f} "
                    f"{p.comm_exposed_s * 1e3:11.2f} {_dur(p.total_s):>10}")
    return "\n".join(rows)

