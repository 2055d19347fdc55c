"""``scalelab train --nproc N``: start N workers on this machine through torch's elastic launcher.

This is the machinery behind ``torchrun`` (``torch.distributed.launcher.api.elastic_launch``: an elastic agent, a
c10d rendezvous, worker monitoring and restarts), not a home-made spawner. Each worker is a real
``python -m scalelab train`` process that finds its rank in the environment the agent sets, exactly as under
``torchrun --nproc-per-node N -m scalelab train ...``.

Before any worker starts, this process validates the config, creates the run directory and prepares the data
(so that N workers do not generate or download the same dataset at once). When a worker dies, the agent stops
the group and starts it again, up to ``max_restarts`` times; the workers then resume from the latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from pathlib import Path

from scalelab.errors import ScalelabError


class WorkerFailure(ScalelabError):
    """A worker failed and the restarts allowed were used up."""

    exit_code = 1


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now (for the c10d rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(worker_args: list[str], nproc: int, max_restarts: int = 0, out: Path | None = None) -> None:
    """Run ``python -m scalelab <worker_args>`` as ``nproc`` workers of one elastic job on this machine.

    Raises:
        WorkerFailure: when a worker failed ``max_restarts + 1`` times; the message names the rank, its exit
            code or signal, and how to continue from the last checkpoint.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the agent logs every rendezvous and restart at INFO; keep warnings (a restart is one) and errors
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"scalelab-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=max_restarts,
        monitor_interval=0.1)
    os.environ["SCALELAB_LAUNCHER"] = "1"  # workers inherit it: the parent prints the summary, not rank 0
    try:
        elastic_launch(config, sys.executable)("-m", "scalelab", *worker_args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = (f"was killed by signal {failure.signal_name()}" if failure.signal_name() != "<N/A>"
               else f"exited with code {failure.exitcode}")
        cont = f"; continue with: scalelab train --out {out} --resume --nproc {nproc}" if out else ""
        err = WorkerFailure(f"worker rank {rank} {how} after {max_restarts} restart(s) allowed "
                            f"(--max-restarts){cont}")
        err.rank, err.how = rank, how  # for callers that name the rank's role (a parameter server)
        raise err from None
