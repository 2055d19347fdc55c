"""``scalelab train --nproc N``: start N workers on this machine through torch's elastic launcher.

This is the machinery behind ``torchrun`` (``torch.distributed.launcher.api.elastic_launch``: an elastic agent, a
c10d rendezvous, worker monitoring and restarts), not a home-made spawner. Each worker is a real
``python -m scalelab train`` process that finds its rank in the environment the agent sets, exactly as under
``torchrun --nproc-per-node N -m scalelab train ...``.

Before any worker starts, this process validates the config, creates the run directory and prepares the data
(so that N workers do not generate or download the same dataset at once). When a worker dies, the agent stops
the group and starts it again, up to ``max_restarts`` times; the workers then resume from the latest checkpoint.

Elastic membership: with ``nnodes=(MIN, MAX)`` and a shared rendezvous endpoint, this process is one node of a job
whose size may change (``scalelab train --nnodes 1:4 --rdzv-endpoint HOST:PORT``, like ``torchrun --nnodes 1:4``).
When a node joins or leaves, every agent stops its workers, a new rendezvous forms the new group, and the workers
resume from the latest checkpoint on the new world size (see ``parallel.resize``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from scalelab.errors import ConfigError, DivergenceError, ScalelabError


class WorkerFailure(ScalelabError):
    """A worker failed and the restarts allowed were used up."""

    exit_code = 1


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the previous values."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now (for the c10d rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_nnodes(text: str) -> tuple[int, int]:
    """``"N"`` or ``"MIN:MAX"`` (torchrun's ``--nnodes``) as ``(min, max)``."""
    try:
        lo, _, hi = text.partition(":")
        nodes = (int(lo), int(hi or lo))
    except ValueError:
        nodes = (0, 0)
    if not 1 <= nodes[0] <= nodes[1]:
        raise ConfigError(f"--nnodes {text!r}: expected N or MIN:MAX with 1 <= MIN <= MAX, e.g. 2 or 1:4")
    return nodes


def launch_workers(worker_args: list[str], nproc: int, max_restarts: int = 0, out: Path | None = None, *,
                   nnodes: tuple[int, int] = (1, 1), rdzv_endpoint: str = "", rdzv_id: str = "",
                   last_call_s: float = 5.0) -> None:
    """Run ``python -m scalelab <worker_args>`` as ``nproc`` workers of one elastic job on this machine.

    With ``nnodes`` other than ``(1, 1)`` this machine is one node of a multi-node (or elastic) job that meets at
    ``rdzv_endpoint`` under ``rdzv_id``; ``last_call_s`` is how long a rendezvous that has its minimum of nodes
    waits for more.

    Raises:
        WorkerFailure: when a worker failed ``max_restarts + 1`` times; the message names the rank, its exit
            code or signal, and how to continue from the last checkpoint.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the agent logs every rendezvous and restart at INFO; keep warnings (a restart is one) and errors
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    config = LaunchConfig(
        min_nodes=nnodes[0], max_nodes=nnodes[1], nproc_per_node=nproc,
        run_id=rdzv_id or f"scalelab-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
        rdzv_endpoint=rdzv_endpoint or f"127.0.0.1:{free_port()}", max_restarts=max_restarts,
        monitor_interval=0.1 if nnodes == (1, 1) else 0.5,
        rdzv_configs={"last_call_timeout": last_call_s, "join_timeout": 600})
    # SCALELAB_LAUNCHER: the parent prints the summary, not rank 0. TORCH_DISABLE_SHARE_RDZV_TCP_STORE: with
    # torch 2.13 and the agents' TCP store shared with the workers (the default), a node that joins a running
    # job waits forever for MASTER_ADDR, because the rank-0 agent publishes it only at its first rendezvous;
    # without sharing, rank 0 publishes it at every rendezvous and the workers get a fresh store each round.
    env = {"SCALELAB_LAUNCHER": "1",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")}
    try:
        with _environment(env):  # the agent and its workers inherit them; the caller's environment is restored
            elastic_launch(config, sys.executable)("-m", "scalelab", *worker_args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == DivergenceError.exit_code:
            raise DivergenceError(f"the training diverged (worker rank {rank}'s error above says where); "
                                  f"{out or 'the run directory'} keeps the last good checkpoint") from None
        how = (f"was killed by signal {failure.signal_name()}" if failure.signal_name() != "<N/A>"
               else f"exited with code {failure.exitcode}")
        cont = f"; continue with: scalelab train --out {out} --resume --nproc {nproc}" if out else ""
        err = WorkerFailure(f"worker rank {rank} {how} after {max_restarts} restart(s) allowed "
                            f"(--max-restarts){cont}")
        err.rank, err.how = rank, how  # for callers that name the rank's role (a parameter server)
        raise err from None
