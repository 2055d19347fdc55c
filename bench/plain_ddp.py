"""The peer of ``bench/scaling.py``: a minimal hand-written data-parallel training script (torchrun style).

    python bench/plain_ddp.py --nproc N [--set section.key=value ...]      # starts N workers itself
    torchrun --standalone --nproc-per-node N bench/plain_ddp.py [--set ...]  # the same, under torchrun

What a PyTorch user writes by hand: ``init_process_group("gloo")`` from the environment the launcher sets,
``DistributedDataParallel`` with its default all-reduce, ``torch.optim.SGD``, and a loop. It trains what
``scalelab train --nproc N`` trains with the same config: the model from ``scalelab.models.build_model``, the
data from ``scalelab.data.load_dataset`` in the same order and with the same sharding (``epoch_order`` /
``batch_indices``), the same global batch split B/N per worker, SGD with the same momentum, Nesterov and
weight decay (none on biases and norm parameters, as scalelab's param groups), the same LR schedule, and
``torch.set_num_threads(cores // N)`` as scalelab's runtime sets it. Alone (WORLD_SIZE 1) it makes no process
group and no DDP wrapper, as scalelab does not either.

Only the training steps are timed (batch indexing, forward, backward with DDP's all-reduce, optimizer step),
as scalelab's training clock does. Rank 0 prints one JSON line:
``{"samples_per_s": ..., "train_s": ..., ...}``.

With ``--nproc N`` and no launcher environment, the script starts itself as N workers through torch's
``elastic_launch`` with the launch settings ``scalelab train --nproc N`` uses (c10d rendezvous on the
loopback, one node), so that in the benchmark only the training loop differs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
import uuid

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from scalelab.config import load_config
from scalelab.data import batch_indices, epoch_order, load_dataset, steps_per_epoch
from scalelab.models import build_model
from scalelab.recipe import build_schedule


def launch(nproc: int, argv: list[str]) -> None:
    """Start this script as ``nproc`` workers with the launch settings of scalelab's ``launch_workers``."""
    import logging

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=f"plain-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0, monitor_interval=0.1)
    elastic_launch(config, sys.executable)(os.path.abspath(__file__), *argv)


def worker(cfg) -> dict | None:
    t = cfg.train
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        dist.init_process_group("gloo")

    data = load_dataset(cfg.data)
    x, y = data.x_train, data.y_train
    B = t.batch_size
    spe = steps_per_epoch(len(x), B)
    total = t.max_steps or math.ceil(t.epochs * spe)
    sched = build_schedule(cfg.recipe, B, spe, total)

    torch.manual_seed(t.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    r = cfg.recipe
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": r.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=sched(0), momentum=r.momentum, nesterov=r.nesterov)
    ddp = DDP(model) if world > 1 else model

    ddp.train()
    train_s = 0.0
    for step in range(total):
        t0 = time.perf_counter()
        epoch, k = divmod(step, spe)
        if k == 0:
            order = epoch_order(len(x), t.seed, epoch)
        idx = batch_indices(order, k, B, rank, world)
        for g in opt.param_groups:
            g["lr"] = sched(step)
        loss = F.cross_entropy(ddp(x[idx]), y[idx], label_smoothing=r.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t0

    result = None
    if rank == 0:  # untimed: the test accuracy, only to show both loops trained the same thing
        model.eval()
        with torch.no_grad():
            correct = sum((model(data.x_test[i:i + 4096]).argmax(1) == data.y_test[i:i + 4096]).sum().item()
                          for i in range(0, len(data.x_test), 4096))
        result = {"samples_per_s": total * B / train_s, "train_s": train_s, "steps": total,
                  "world_size": world, "global_batch": B, "threads": torch.get_num_threads(),
                  "final_test_acc": correct / len(data.x_test), "final_train_loss": loss.item()}
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=0, help="start N workers (omit under torchrun)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="scalelab config overrides")
    args = ap.parse_args(argv)
    if args.nproc and "RANK" not in os.environ:
        launch(args.nproc, [a for o in args.overrides for a in ("--set", o)])
        return 0
    result = worker(load_config(None, args.overrides))
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
