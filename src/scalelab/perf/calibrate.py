"""Measure this machine and check the model against it: compute throughput of a real model, gloo all-reduce
latency and bandwidth at 2 and 4 processes, and the step time of real ``scalelab train --nproc N`` runs.

Everything runs for real: training steps of a scalelab model timed with ``torch`` (warm-up excluded, median of
repeats), ``torch.distributed.all_reduce`` with the gloo backend on 127.0.0.1 in 2 and 4 spawned processes,
and ``scalelab train --nproc N`` (DDP over gloo, started by torch's elastic launcher) in a subprocess, whose
``summary.json`` gives ``train_s / steps``. The prediction of an N-process step uses only the one-process
compute measurement, a buffer-copy timing and the fitted alpha-beta (``2(p-1) alpha + 2(p-1)/p S / bw``,
:func:`scalelab.perf.comm.ring_allreduce`): no N-process training timing enters it. On a CPU the all-reduce
does not overlap with backward (gloo's transfers and reductions need the same cores), so it is added in full.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalelab.perf import comm

# name, width, depth, input shape, classes: ~4.3M parameters, 17 MB of gradients
MODEL = ("mlp", 2048, 2, (1, 40), 10)
BATCH = 512
SIZES = (4 * 1024, 64 * 1024 * 1024)       # bytes: latency probe and bandwidth probe


def _model(threads: int):
    from scalelab.config import ModelConfig
    from scalelab.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    name, width, depth, shape, classes = MODEL
    return build_model(ModelConfig(name=name, width=width, depth=depth), shape, classes), shape, classes


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compute_step(batch: int, threads: int, repeats: int = 7) -> dict:
    """Median seconds of one forward+backward+SGD step of MODEL on ``batch`` samples, ``threads`` threads."""
    from scalelab.perf.workload import count_module

    model, shape, classes = _model(threads)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    t = _median_time(step, repeats)
    flops = count_module(_model(threads)[0].to("meta"), torch.zeros(2, *shape, device="meta"))["flops"]
    return {"batch": batch, "threads": threads, "step_s": t, "flop_per_s": flops * batch / t,
            "params": sum(p.numel() for p in model.parameters())}


def copy_time(nbytes: int, threads: int) -> float:
    """Median seconds to copy ``nbytes`` (a clone reads and writes once): one pass over a buffer."""
    torch.set_num_threads(threads)
    buf = torch.ones(nbytes // 4)
    return _median_time(lambda: buf.clone(), 9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, queue) -> None:
    """One rank of the all-reduce probe: median times of SIZES, gathered to rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for size in SIZES:
            buf = torch.ones(size // 4)
            out[size] = _median_time(lambda: dist.all_reduce(buf), 9 if size < 1e6 else 5)
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        if rank == 0:
            queue.put(gathered)
    finally:
        dist.destroy_process_group()


def _spawn(world: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), queue), nprocs=world, start_method="spawn")
    return queue.get()


def scalelab_train_step(world: int, steps: int = 60) -> dict:
    """Run ``scalelab train --nproc world`` for ``steps`` steps; seconds per step from its summary."""
    name, width, depth, _, _ = MODEL
    with tempfile.TemporaryDirectory(prefix="scalelab-calibrate-") as tmp:
        cmd = [sys.executable, "-m", "scalelab", "train", "--nproc", str(world), "--no-progress",
               "--out", tmp, "--set", f"model.name={name}", "--set", f"model.width={width}",
               "--set", f"model.depth={depth}",
               "--set", f"train.batch_size={BATCH}", "--set", f"train.max_steps={steps}",
               "--set", "data.name=mnist1d"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"scalelab train --nproc {world} failed:\n{proc.stderr[-2000:]}")
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    return {"step_s": summary["train_s"] / summary["steps"], "steps": summary["steps"],
            "comm_bytes_per_step": summary.get("comm_bytes", 0) / summary["steps"]}


def allreduce_fit(world: int) -> dict:
    """gloo all-reduce times at SIZES on ``world`` processes, and the alpha/bandwidth of the ring formula."""
    per_rank = _spawn(world)
    t = {s: max(r[s] for r in per_rank) for s in SIZES}
    small, large = SIZES
    alpha = t[small] / (2 * (world - 1))
    bw = 2 * (world - 1) / world * large / max(t[large] - 2 * (world - 1) * alpha, 1e-9)
    return {"world": world, "times_s": {str(s): v for s, v in t.items()}, "alpha_s": alpha,
            "bus_bandwidth": bw}


def calibrate(worlds: tuple[int, ...] = (1, 2, 4), rounds: int = 3) -> dict:
    """Measure compute and gloo all-reduce, predict ``scalelab train --nproc N`` steps, and measure them.

    Every worker uses ``cores // N`` threads (at least one), as ``scalelab train`` does; N workers beyond the
    core count time-share the cores, so their compute is the one-process time times N / cores. Prediction
    inputs and the measurement are taken in interleaved rounds and the median ratio is reported, because a
    shared machine's load changes from minute to minute (the load average is recorded).
    """
    cores = os.cpu_count() or 1
    single = compute_step(BATCH, cores)
    grad_bytes = single["params"] * 4
    rows = []
    for world in worlds:
        threads = max(1, cores // world)
        share = max(1.0, world / cores)
        per_round = []
        for _ in range(rounds):
            fit = allreduce_fit(world) if world > 1 else None
            local = compute_step(BATCH // world, threads)
            t_comm = 0.0
            t_pack = 0.0
            if fit:
                net = comm.Net(fit["alpha_s"], fit["bus_bandwidth"])
                t_comm = comm.ring_allreduce(grad_bytes, world, net)
                # DDP copies the gradients into its buckets, divides by N and copies them back: three passes
                t_pack = 3 * copy_time(grad_bytes, threads) * share
            predicted = local["step_s"] * share + t_pack + t_comm
            measured = scalelab_train_step(world)
            per_round.append({"allreduce": fit, "compute_s": local["step_s"] * share, "pack_s": t_pack,
                              "comm_s": t_comm, "predicted_step_s": predicted,
                              "measured_step_s": measured["step_s"],
                              "measured_comm_bytes": measured["comm_bytes_per_step"],
                              "ratio": predicted / measured["step_s"], "load": os.getloadavg()[0]})
        mid = sorted(per_round, key=lambda r: r["ratio"])[len(per_round) // 2]
        rows.append({"world": world, **mid, "ratios": [r["ratio"] for r in per_round], "rounds": per_round})
    return {"cores": cores, "model": {"name": MODEL[0], "width": MODEL[1], "depth": MODEL[2],
                                      "params": single["params"], "batch": BATCH, "grad_bytes": grad_bytes},
            "single_process": single, "data_parallel": rows, "torch": torch.__version__,
            "load_average": os.getloadavg()}


def format_calibration(r: dict) -> str:
    s = r["single_process"]
    lines = [f"this machine: {r['cores']} cores, torch {r['torch']}",
             f"  compute: {r['model']['name']} {r['model']['params'] / 1e6:.2f}M params, batch {s['batch']}: "
             f"{s['step_s'] * 1e3:.1f} ms/step = {s['flop_per_s'] / 1e9:.1f} GFLOP/s"]
    for row in r["data_parallel"]:
        f = row["allreduce"]
        if f:
            lines.append(f"  gloo {row['world']} processes: alpha {f['alpha_s'] * 1e6:.0f} us, bus bandwidth "
                         f"{f['bus_bandwidth'] / 1e9:.2f} GB/s")
        lines.append(f"    scalelab train --nproc {row['world']} step: predicted "
                     f"{row['predicted_step_s'] * 1e3:.1f} ms (compute {row['compute_s'] * 1e3:.1f}"
                     f" + packing {row['pack_s'] * 1e3:.1f} + all-reduce {row['comm_s'] * 1e3:.1f}), "
                     f"measured "
                     f"{row['measured_step_s'] * 1e3:.1f} ms, ratio {row['ratio']:.2f} (median of "
                     f"{', '.join(f'{x:.2f}' for x in row['ratios'])}; load {row['load']:.1f})")
    return "\n".join(lines)
