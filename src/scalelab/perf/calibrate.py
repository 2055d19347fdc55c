"""Measure this machine and check the model against it: the step time of real ``scalelab train --nproc N`` runs
predicted from separate measurements of its parts.

Everything runs for real, with the trainer's own code (:func:`scalelab.train.forward_backward`,
:func:`scalelab.train.grads_finite`, the default optimizer of :func:`scalelab.recipe.build_optimizer`, DDP with
scalelab's communication hook). A data-parallel step of N workers is predicted as the sum of two separately
measured parts; no N-process training step with gradient communication is timed to make the prediction:

* **local step** (``local_s``): N processes run at once, each on B/N samples with its share of the cores (cores/N
  threads, at least one), as ``scalelab train --nproc N`` starts them. Each wraps the model in DDP over a
  process group **of itself alone**, so every step does DDP's real local work (copying gradients into buckets
  from autograd hooks, the hook's division, copying the reduced buckets back) and the trainer's gradient check,
  but sends nothing. The N workers start every step together (a barrier, outside the clock) and a step counts
  as the slowest worker's time, because a synchronous step waits for it. So contention between workers for the
  cores, memory bandwidth and caches is in this figure, and so is whatever else the machine is running. The
  same workers also time the plain step (no DDP), which splits ``local_s`` into compute (``compute_s``) and
  DDP's local work (``ddp_local_s``) for the report. For comparison, not for the prediction, one process alone
  on B/N samples with the same threads is timed too (``compute_alone_s``): the difference is the contention.
* **communication** (``comm_s``): afterwards, in the same N processes, what DDP sends in one step, sent the way DDP sends it:
  the broadcast of the model's buffers from rank 0 (DDP's ``broadcast_buffers``, one broadcast per dtype), then
  one asynchronous gloo all-reduce per gradient bucket, in DDP's order and with DDP's bucket sizes (recorded
  from the real DDP of the local-step probe), waiting for all of them. On a CPU this is not overlapped with
  backward, because gloo's transfers and reductions need the same cores, so it is added in full.

For the record the probe also times gloo all-reduce of 4 KB and 64 MB and fits alpha (latency) and bus
bandwidth of the ring formula ``2(p-1) alpha + 2(p-1)/p S / bw`` (:func:`scalelab.perf.comm.ring_allreduce`);
the earlier form of this check predicted with that formula for one flat buffer and one process's compute.

The prediction is compared with ``scalelab train --nproc N`` (DDP over gloo, torch's elastic launcher), whose
steady-state step time is taken from its metrics log after the first logging interval (warm-up: thread pools,
DDP's bucket rebuild after the first step); the mean over all steps including warm-up is kept too. The run's
own record of its exposed communication (the trainer's ``comm_s``: from the last bucket's launch to the end of
backward, on rank 0) is kept next to the prediction's ``comm_s``, so a miss can be placed in the communication
or in the local part of the step. It is a check, not an input of the prediction.
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

from scalelab.parallel.runtime import exit_worker
from scalelab.perf import comm

# name, width, depth, input shape, classes: ~4.3M parameters, 17 MB of gradients
MODEL = ("mlp", 2048, 2, (1, 40), 10)
BATCH = 512
SIZES = (4 * 1024, 64 * 1024 * 1024)       # bytes: latency probe and bandwidth probe
LOG_EVERY = 10                             # scalelab train's logging interval; the first one is warm-up


def _setup(batch: int, threads: int):
    """The model, the trainer's default optimizer and one batch, as ``scalelab train`` builds them."""
    from scalelab.config import ModelConfig, RecipeConfig
    from scalelab.models import build_model
    from scalelab.recipe import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    name, width, depth, shape, classes = MODEL
    model = build_model(ModelConfig(name=name, width=width, depth=depth), shape, classes)
    opt = build_optimizer(RecipeConfig(), model, steps_per_epoch=1)
    return model, opt, torch.randn(batch, *shape), torch.randint(0, classes, (batch,))


def _step_fn(model, params, opt, x, y, check: bool):
    """One training step as the trainer does it: zero, forward and backward, (gradient check), optimizer."""
    from scalelab.train import forward_backward, grads_finite

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = forward_backward(model, x, y, 1, 0.0, False)
        loss.item()
        if check:
            grads_finite(params)
        opt.step()
    return step


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
    """Median seconds of one training step of MODEL on ``batch`` samples and ``threads`` threads, one process."""
    from scalelab.perf.workload import count_module

    model, opt, x, y = _setup(batch, threads)
    t = _median_time(_step_fn(model, list(model.parameters()), opt, x, y, False), repeats)
    shape = MODEL[3]
    flops = count_module(_setup(2, threads)[0].to("meta"), torch.zeros(2, *shape, device="meta"))["flops"]
    return {"batch": batch, "threads": threads, "step_s": t, "flop_per_s": flops * batch / t,
            "params": sum(p.numel() for p in model.parameters())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _spawn(fn, world: int, *args):
    """Run ``fn(rank, world, port, queue, *args)`` in ``world`` spawned processes; rank 0's answer."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(fn, args=(world, _free_port(), queue, *args), nprocs=world, start_method="spawn")
    return queue.get()


def _slowest_median(per_rank: list[list[float]]) -> float:
    """Median over steps of the slowest worker's time: a synchronous step lasts as long as its slowest worker."""
    return statistics.median(max(ts) for ts in zip(*per_rank))


def _probe_worker(rank: int, world: int, port: int, queue, steps: int, repeats: int) -> None:
    """One of N workers: first the local step (plain and DDP on a group of itself), then the communication."""
    _join(rank, world, port)
    try:
        local, buckets, buffers = _local_steps(rank, world, steps)
        comm_times = _communication(buckets, buffers, repeats)
        gathered = [None] * world
        dist.all_gather_object(gathered, (local, comm_times))
        if rank == 0:
            queue.put({"threads": max(1, (os.cpu_count() or 1) // world),
                       **{f"{k}_s": _slowest_median([g[0][k] for g in gathered]) for k in local},
                       "bucket_bytes": buckets, "buffer_bytes": buffers,
                       "sizes_s": {str(s): max(g[1][0][str(s)] for g in gathered) for s in SIZES},
                       "comm_step_s": _slowest_median([g[1][1] for g in gathered])})
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_worker()


def _local_steps(rank: int, world: int, steps: int):
    """Per-step times of the plain and the DDP-on-a-group-of-itself step, every step started together."""
    from torch.nn.parallel import DistributedDataParallel

    from scalelab.parallel.runtime import Runtime, _allreduce_hook

    threads = max(1, (os.cpu_count() or 1) // world)
    alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
    plain, plain_opt, x, y = _setup(BATCH // world, threads)
    wrapped, ddp_opt, _, _ = _setup(BATCH // world, threads)
    state = Runtime(0, 1)
    state.group = alone
    buckets: list[int] = []

    def hook(st, bucket):  # scalelab's hook, recording DDP's bucket sizes (bytes) in launch order
        buckets.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return _allreduce_hook(st, bucket)

    ddp = DistributedDataParallel(wrapped, process_group=alone)
    ddp.register_comm_hook(state, hook)
    check = world > 1  # the trainer checks gradients for non-finite values only with several workers
    steps_of = {"plain": _step_fn(plain, list(plain.parameters()), plain_opt, x, y, check),
                "ddp": _step_fn(ddp, list(wrapped.parameters()), ddp_opt, x, y, check)}
    times: dict[str, list[float]] = {k: [] for k in steps_of}
    for i in range(steps + 2):
        for k, fn in steps_of.items():
            if k == "ddp":
                buckets.clear()
            dist.barrier()
            t = time.perf_counter()
            fn()
            if i >= 2:  # warm-up, and DDP rebuilds its buckets after the first step
                times[k].append(time.perf_counter() - t)
    buffers: dict[str, int] = {}
    for b in wrapped.buffers():
        buffers[str(b.dtype)] = buffers.get(str(b.dtype), 0) + b.numel() * b.element_size()
    return times, list(buckets), buffers


def _communication(buckets: list[int], buffers: dict[str, int], repeats: int):
    """Median times of flat all-reduces of SIZES, and per-repeat times of one DDP step's communication."""
    flat = {}
    for size in SIZES:
        buf = torch.ones(size // 4)
        flat[str(size)] = _median_time(lambda: dist.all_reduce(buf), min(repeats, 9 if size < 1e6 else 5))
    grads = [torch.ones(n // 4) for n in buckets]
    bufs = [torch.zeros(n // 4) for n in buffers.values()]

    def ddp_step():
        for b in bufs:
            dist.broadcast(b, src=0)
        for w in [dist.all_reduce(g, async_op=True) for g in grads]:
            w.wait()

    ddp_step()
    ddp_step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        ddp_step()
        times.append(time.perf_counter() - t)
    return flat, times


def probe(world: int, steps: int = 10, repeats: int = 9) -> dict:
    """The two parts of an N-worker step, measured in ``world`` processes (see the module docstring).

    ``local_s`` = ``compute_s`` + ``ddp_local_s``: the slowest worker's step with DDP's local work but no
    communication; ``comm_s``: one step's DDP communication (buffer broadcast and bucketed all-reduce). Also
    the flat all-reduce times of SIZES and the ring formula's alpha and bus bandwidth fitted to them.
    """
    r = _spawn(_probe_worker, world, steps, repeats)
    t = {s: r["sizes_s"][str(s)] for s in SIZES}
    small, large = SIZES
    alpha = t[small] / (2 * (world - 1))
    bw = 2 * (world - 1) / world * large / max(t[large] - 2 * (world - 1) * alpha, 1e-9)
    return {"world": world, "threads": r["threads"], "compute_s": r["plain_s"],
            "ddp_local_s": r["ddp_s"] - r["plain_s"], "local_s": r["ddp_s"], "comm_s": r["comm_step_s"],
            "bucket_bytes": r["bucket_bytes"], "buffer_bytes": r["buffer_bytes"],
            "times_s": {str(s): v for s, v in t.items()}, "alpha_s": alpha, "bus_bandwidth": bw}


def scalelab_train_step(world: int, steps: int = 40) -> dict:
    """Run ``scalelab train --nproc world`` for ``steps`` steps: seconds per step in steady state and overall."""
    name, width, depth, _, _ = MODEL
    with tempfile.TemporaryDirectory(prefix="scalelab-calibrate-") as tmp:
        cmd = [sys.executable, "-m", "scalelab", "train", "--nproc", str(world), "--no-progress",
               "--out", tmp, "--set", f"model.name={name}", "--set", f"model.width={width}",
               "--set", f"model.depth={depth}", "--set", f"train.log_every={LOG_EVERY}",
               "--set", f"train.batch_size={BATCH}", "--set", f"train.max_steps={steps}",
               "--set", "data.name=mnist1d"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"scalelab train --nproc {world} failed:\n{proc.stderr[-2000:]}")
        summary = json.loads((Path(tmp) / "summary.json").read_text())
        logged = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r.get("kind") == "train"]
    first, last = train[0], train[-1]
    n = last["step"] - first["step"]
    return {"step_s": (last["train_s"] - first["train_s"]) / n,
            "comm_exposed_s": (last.get("comm_s", 0.0) - first.get("comm_s", 0.0)) / n,
            "mean_step_s": summary["train_s"] / summary["steps"], "steps": summary["steps"],
            "comm_bytes_per_step": summary.get("comm_bytes", 0) / summary["steps"]}


def calibrate(worlds: tuple[int, ...] = (1, 2, 4), rounds: int = 3) -> dict:
    """Measure the parts, predict ``scalelab train --nproc N`` steps, and measure them, in interleaved rounds.

    The median ratio over rounds is reported, because a shared machine's load changes from minute to minute
    (the load average is recorded with every round).
    """
    cores = os.cpu_count() or 1
    single = compute_step(BATCH, cores)
    rows = []
    for world in worlds:
        per_round = []
        for _ in range(rounds):
            if world == 1:  # scalelab train does not wrap one process in DDP
                step = compute_step(BATCH, cores)["step_s"]
                part = {"world": 1, "threads": cores, "compute_s": step, "ddp_local_s": 0.0, "local_s": step,
                        "comm_s": 0.0}
                flat = 0.0
            else:
                part = probe(world)
                # the peer of the concurrent compute: one process alone on B/N with the same threads
                part["compute_alone_s"] = compute_step(BATCH // world, part["threads"])["step_s"]
                flat = comm.ring_allreduce(single["params"] * 4, world,
                                           comm.Net(part["alpha_s"], part["bus_bandwidth"]))
            predicted = part["local_s"] + part["comm_s"]
            measured = scalelab_train_step(world)
            per_round.append({"probe": part, "compute_s": part["compute_s"], "ddp_local_s": part["ddp_local_s"],
                              "comm_s": part["comm_s"], "flat_ring_s": flat,
                              "compute_alone_s": part.get("compute_alone_s", part["compute_s"]),
                              "predicted_step_s": predicted, "measured_step_s": measured["step_s"],
                              "measured_mean_step_s": measured["mean_step_s"],
                              "measured_comm_exposed_s": measured["comm_exposed_s"],
                              "measured_comm_bytes": measured["comm_bytes_per_step"],
                              "ratio": predicted / measured["step_s"], "load": os.getloadavg()[0]})
        mid = sorted(per_round, key=lambda r: r["ratio"])[len(per_round) // 2]
        rows.append({"world": world, **mid, "ratios": [r["ratio"] for r in per_round], "rounds": per_round})
    return {"cores": cores, "model": {"name": MODEL[0], "width": MODEL[1], "depth": MODEL[2],
                                      "params": single["params"], "batch": BATCH,
                                      "grad_bytes": single["params"] * 4},
            "single_process": single, "data_parallel": rows, "torch": torch.__version__,
            "load_average": os.getloadavg()}


def format_calibration(r: dict) -> str:
    s = r["single_process"]
    lines = [f"this machine: {r['cores']} cores, torch {r['torch']}",
             f"  compute: {r['model']['name']} {r['model']['params'] / 1e6:.2f}M params, batch {s['batch']}: "
             f"{s['step_s'] * 1e3:.1f} ms/step = {s['flop_per_s'] / 1e9:.1f} GFLOP/s"]
    for row in r["data_parallel"]:
        f = row["probe"]
        if row["world"] > 1:
            lines.append(f"  gloo {row['world']} processes: alpha {f['alpha_s'] * 1e6:.0f} us, bus bandwidth "
                         f"{f['bus_bandwidth'] / 1e9:.2f} GB/s; DDP's buckets "
                         f"{[round(b / 1e6, 2) for b in f['bucket_bytes']]} MB")
        lines.append(f"    scalelab train --nproc {row['world']} step: predicted "
                     f"{row['predicted_step_s'] * 1e3:.1f} ms (compute {row['compute_s'] * 1e3:.1f}"
                     f" [one process alone {row['compute_alone_s'] * 1e3:.1f}]"
                     f" + DDP local {row['ddp_local_s'] * 1e3:.1f} + communication {row['comm_s'] * 1e3:.1f}), "
                     f"measured {row['measured_step_s'] * 1e3:.1f} ms (exposed communication in the run "
                     f"{row['measured_comm_exposed_s'] * 1e3:.1f}), ratio {row['ratio']:.2f} (median of "
                     f"{', '.join(f'{x:.2f}' for x in row['ratios'])}; load {row['load']:.1f})")
    return "\n".join(lines)
