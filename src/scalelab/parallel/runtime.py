"""The parallel runtime of one worker: process group, device, threads, DDP wrapping and communication accounting.

A worker started by ``scalelab train --nproc N`` or by ``torchrun ... -m scalelab train`` finds its place in the job
in the environment the elastic agent sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_RESTART_COUNT``). Without those it is the single process of a
plain run, and everything here reduces to no-ops.

Synchronous data parallelism is PyTorch's DistributedDataParallel (bucketed all-reduce overlapped with the
backward pass; Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training",
arXiv 2006.15704), with a communication hook that does DDP's own averaging all-reduce and also counts what it
sends and how long the step waited for it.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from scalelab.config import Config
from scalelab.errors import ConfigError


def ring_bytes_sent(payload_bytes: int, world_size: int) -> int:
    """Bytes one rank sends in a bandwidth-optimal (ring) all-reduce of ``payload_bytes``: 2 (n-1)/n of them.

    Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce algorithms for clusters of workstations".
    """
    return 0 if world_size <= 1 else (2 * (world_size - 1) * payload_bytes) // world_size


@dataclass
class CommStats:
    """What this worker sent through collectives and how long it waited for them."""

    bytes_sent: int = 0
    exposed_s: float = 0.0  # communication time not hidden behind the backward pass
    calls: int = 0
    last_launch: float = field(default=0.0, repr=False)


@dataclass
class GradNormProbe:
    """The squared norms of one step's gradient before and after DDP's averaging all-reduce, per bucket.

    In data-parallel training the gradient noise scale's two batch sizes come for free (McCandlish et al.
    2018, arXiv 1812.06162, Appendix A): ``local`` holds ``|G_b|^2`` of this worker's gradient over its share
    ``b`` of the batch, ``reduced`` ``|G_B|^2`` of the averaged gradient over the whole batch ``B``. Buckets
    may complete on gloo's threads, so each appends its own entry (an atomic list append) and :meth:`sums`
    adds them up once the backward pass has returned (DDP waits for every bucket before it does).
    """

    local: list = field(default_factory=list)
    reduced: list = field(default_factory=list)

    def sums(self) -> tuple[float, float]:
        return float(sum(self.local)), float(sum(self.reduced))


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().double()
    return (t * t).sum()


def _allreduce_hook(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP's averaging all-reduce of one ``dist.GradBucket``, with its bytes and launch time recorded, and the
    bucket's squared norms before and after when the step carries a :class:`GradNormProbe`."""
    buf = bucket.buffer()
    state.comm.bytes_sent += ring_bytes_sent(buf.numel() * buf.element_size(), state.world_size)
    state.comm.calls += 1
    state.comm.last_launch = time.perf_counter()
    probe = state.norm_probe
    if probe is not None:
        probe.local.append(_sq_norm(buf))
    buf.div_(state.world_size)
    fut = dist.all_reduce(buf, group=state.group, async_op=True).get_future()
    if probe is None:
        return fut.then(lambda f: f.value()[0])

    def done(f):
        out = f.value()[0]
        probe.reduced.append(_sq_norm(out))
        return out
    return fut.then(done)


class Runtime:
    """This process's place in the job: ``rank``, ``world_size``, ``device``; collectives with accounting.

    Create it with :func:`init_runtime`. With ``world_size == 1`` no process group exists and every method is
    a cheap local no-op, so the training loop has one code path.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, local_world_size: int = 1,
                 device: torch.device | None = None, restart_count: int = 0):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self.device = device or torch.device("cpu")
        self.restart_count = restart_count
        self.group = None
        self.store = None  # the job's key-value store (for diagnosing hangs); None when alone
        self.timeout_s = 0.0
        self.comm = CommStats()
        self.step = 0  # the training step in progress (set by the trainer; compression hooks read it)
        self.lr = None  # the learning rate of the step in progress (set by the trainer; DGC may read it)
        self.compress = None  # the compression hook state, when compress.method is set
        self.norm_probe = None  # a GradNormProbe for the step in progress (the noise scale from the workers)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- model ---------------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, cfg: Config, ddp: bool = True, steps_per_epoch: int = 1) -> nn.Module:
        """Wrap in DDP (with the accounting hook) and set up cross-replica BN groups; identity when alone.

        ``ddp=False`` leaves gradient averaging to the caller (backup workers average a subset). With
        ``compress.method`` set, the hook is :func:`scalelab.compress.compress_hook` instead (it counts bytes too).
        """
        from scalelab.recipe.norm import set_cross_replica, set_emulated_workers

        p = cfg.parallel
        if not self.distributed:
            set_emulated_workers(model, p.emulate_workers, p.bn_group)
            return model
        if p.emulate_workers > 1:
            raise ConfigError("parallel.emulate_workers: emulation is for one process; with --nproc N the "
                              "workers are real (leave emulate_workers at 1)")
        if p.bn_group != 1:
            size = p.bn_group or self.world_size
            if self.world_size % size:
                raise ConfigError(f"parallel.bn_group: {p.bn_group} must divide the world size {self.world_size}")
            # every rank must create every subgroup, in the same order (torch.distributed.new_group contract)
            mine = None
            for start in range(0, self.world_size, size):
                g = dist.new_group(list(range(start, start + size)))
                if start <= self.rank < start + size:
                    mine = g
            set_cross_replica(model, mine, size)
        if not ddp:
            self.broadcast_state(model)  # start from rank 0's state, as DDP does
            return model
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compress.method != "none":
            from scalelab.compress import CompressionHook, compress_hook
            self.compress = CompressionHook(self, cfg, steps_per_epoch)
            ddp.register_comm_hook(self.compress, compress_hook)
        else:
            ddp.register_comm_hook(self, _allreduce_hook)
        return ddp

    # ---- collectives ---------------------------------------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over workers in place (counted in ``comm``); returns ``t``."""
        if self.distributed:
            self.comm.bytes_sent += ring_bytes_sent(t.numel() * t.element_size(), self.world_size)
            t0 = time.perf_counter()
            dist.all_reduce(t, group=self.group)
            self.comm.exposed_s += time.perf_counter() - t0
        return t

    def end_backward(self) -> None:
        """Call right after ``loss.backward()``: time since the last bucket was launched was spent waiting."""
        if self.distributed and self.comm.last_launch:
            self.comm.exposed_s += max(0.0, time.perf_counter() - self.comm.last_launch)
            self.comm.last_launch = 0.0

    def silent_ranks(self, step: int, wait_s: float = 10.0) -> list[int]:
        """After a collective timed out: the ranks that do not answer within ``wait_s`` (hung or dead).

        Every worker that is still alive posts its step to the job's store and waits for the others' posts; a
        rank that posts nothing is stuck somewhere outside the collective (or gone).
        """
        if self.store is None:
            return []
        self.store.set(f"alive/{self.rank}", str(step))
        deadline = time.monotonic() + wait_s
        missing = [r for r in range(self.world_size) if r != self.rank]
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not self.store.check([f"alive/{r}"])]
            time.sleep(0.1)
        return missing

    def broadcast_state(self, model: nn.Module, buffers_only: bool = False) -> None:
        """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every worker."""
        if not self.distributed:
            return
        tensors = ([] if buffers_only else list(model.parameters())) + list(model.buffers())
        for t in tensors:
            dist.broadcast(t.data, src=0, group=self.group)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def exit_worker(code: int = 0) -> None:
    """End a worker process of a distributed job once everything it owes is written: leave the process group,
    flush stdout and stderr, and exit without running C++ static destructors.

    With torch 2.13 and gloo those destructors sometimes find a communication thread still joinable and abort
    ("terminate called without an active exception", SIGABRT) after work that succeeded, which a launcher or
    ``torch.multiprocessing.spawn`` would report as a failed worker.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def init_runtime(cfg: Config) -> Runtime:
    """Join the job described by the environment (torchrun / ``--nproc``), or run alone.

    Picks the device (``train.device``; with CUDA one GPU per local rank), the backend (NCCL on CUDA, gloo on
    CPU, unless ``parallel.backend`` says otherwise), and the threads: ``train.threads`` or this worker's share
    of the cores (cores / local workers, at least 1).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    restarts = _env_int("TORCHELASTIC_RESTART_COUNT", 0)

    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for but no CUDA device is available; use auto or cpu")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // max(local_world, 1))
    torch.set_num_threads(threads)

    rt = Runtime(rank, world_size, local_rank, local_world, device, restarts)
    if world_size > 1:
        backend = cfg.parallel.backend
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        if backend == "nccl" and not use_cuda:
            raise ConfigError("parallel.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
        timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
        # torch's env:// rendezvous gives the store (the elastic agent's, under torchrun); keys are prefixed
        # with the restart count because after a restart the agent's store still holds the dead group's
        # addresses, and gloo would otherwise connect to them (seen with torch 2.13: "Connection refused").
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        store = dist.PrefixStore(f"scalelab/attempt-{restarts}", store)
        rt.store, rt.timeout_s = store, cfg.parallel.timeout_s
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                                **({"device_id": device} if use_cuda else {}))
    return rt
