"""Parameter-server training: asynchronous (Downpour), bounded staleness (SSP) and hybrid groups.

``parallel.mode=async`` — Dean et al. 2012, "Large Scale Distributed Deep Networks" (Downpour SGD): the first
``parallel.servers`` ranks are parameter servers, each holding a shard of the parameters (whole tensors, balanced
by size) and the optimizer state of that shard; the other ranks are workers. A worker pulls the parameters,
computes a gradient on its batch, pushes it, and pulls again; a server applies every gradient as it arrives,
with the recipe's optimizer and schedule, without waiting for the others.

``parallel.mode=ssp`` — Ho et al. 2013, "More Effective Distributed ML via a Stale Synchronous Parallel Parameter
Server": the same, but a worker whose clock (gradients applied) is more than ``parallel.staleness_bound`` ahead
of the slowest live worker waits before it gets its next batch. ``s = 0`` is bulk-synchronous, ``s = inf`` async.

``parallel.staleness_lr`` — Zhang, Gupta, Lian, Liu 2016, "Staleness-aware Async-SGD for Distributed Deep
Learning" (arXiv 1511.05950): each gradient's learning rate is divided by its staleness ``max(tau, 1)``.

``parallel.mode=hybrid`` — Kurth et al. 2017, "Deep Learning at 15PF: Supervised and Semi-Supervised
Classification for Scientific Data": workers form groups of ``parallel.group_size``; inside a group they
all-reduce their gradients synchronously, and the group's leader pushes the group's gradient to the servers
asynchronously and broadcasts the parameters it pulls back.

Staleness: a server counts its updates (its *version*); a gradient computed on parameters of version ``v`` and
applied when the server is at version ``u`` has staleness ``tau = u - v``. Every applied gradient's ``tau`` goes
into a histogram, logged in ``metrics.jsonl`` (``train`` records: mean and max per interval; ``staleness``
records: the histogram) and in ``summary.json``.

Work and data: once every worker has joined, a server hands out *tickets*, one per update of the run (``train.epochs`` or ``train.max_steps``
global batches of ``B`` samples, ``B / clients`` samples per update, where a client is a worker, or a group in
hybrid mode). Ticket ``j`` names a fixed batch of the same data stream the sync loop reads (global batch
``j // clients``, part ``j % clients``), so every sample is seen once per epoch whichever worker computes it,
fast workers simply take more tickets, and with one worker the run is sequential SGD, step for step. The LR
schedule and scaling rule are those of a batch of ``B / clients`` over ``clients`` x as many steps.
``train.eval_every`` and ``train.checkpoint_every`` count global batches (``clients`` updates each); the
``step`` of metrics and checkpoints counts server updates.

Transport: torch.distributed gloo point-to-point. Each (server, client) pair has its own two-rank
``ProcessGroupGloo`` made through the job's store, so a dead worker breaks only its own pair: the server logs
it, hands its batch to another worker and goes on, and the worker (restarted by its supervising process up to
``parallel.rejoin`` times) joins again with a new pair. A dead server ends the job (its parameters are gone);
the last checkpoint stays intact and ``--resume`` continues from it.

Hybrid faults: a group whose member dies cannot finish its all-reduce, so the group restarts as a whole while
the other groups go on. Each group forms in numbered *formations* (a counter in the store); a member that sees
its group's communication fail, or a member restarted after it died, retires the formation (compare-and-set
``k`` to ``k + 1``, the same result whoever does it first) and every member joins formation ``k + 1`` with a new
group process group. Its leader joins the servers as a new generation of the client, the server counts the old
one as lost (its ticket goes to another group) and the new one as a rejoin, and the members start from the
server's parameters (which hold the model): only the group's gradient in flight is lost.
"""

from __future__ import annotations

import datetime
import math
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from scalelab.data import batch_indices, epoch_order
from scalelab.errors import DivergenceError, ScalelabError
from scalelab.parallel.modes import RunBase, check_layout
from scalelab.parallel.runtime import Runtime, _env_int, exit_worker
from scalelab.parallel.stragglers import straggler_delay

HELLO, PUSH, BYE = 0, 1, 2
TAG_UP_H, TAG_UP_P, TAG_DOWN_H, TAG_DOWN_P = 0, 1, 2, 3
H = 8  # header length (float64)
STOP = -1


def shard_owners(sizes: list[int], servers: int) -> list[int]:
    """Server of each parameter tensor: largest first onto the least-loaded server (deterministic)."""
    load, owner = [0] * servers, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        s = min(range(servers), key=lambda s: (load[s], s))
        owner[i], load[s] = s, load[s] + sizes[i]
    return owner


class Layout:
    """Which tensors travel between a client and server ``s``: its parameter shard, and (server 0) the float
    buffers (BN running statistics, kept as those of the latest push)."""

    def __init__(self, model: torch.nn.Module, servers: int):
        self.params = list(model.parameters())
        self.buffers = list(model.buffers())  # BN statistics and counts; sent in the parameters' dtype
        owner = shard_owners([p.numel() for p in self.params], servers)
        self.owned = [[p for p, o in zip(self.params, owner) if o == s] for s in range(servers)]

    def tensors(self, s: int) -> list[torch.Tensor]:
        return self.owned[s] + (self.buffers if s == 0 else [])

    def size(self, s: int) -> int:
        return sum(t.numel() for t in self.tensors(s))

    def pack(self, s: int, grads: bool) -> torch.Tensor:
        ts = [(p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p.detach()
              for p in self.owned[s]]
        dtype = self.params[0].dtype
        ts += [b.to(dtype) for b in self.buffers] if s == 0 else []
        return torch.cat([t.reshape(-1).to(dtype) for t in ts]) if ts else torch.zeros(0, dtype=dtype)

    def unpack_params(self, s: int, flat: torch.Tensor) -> None:
        off = 0
        for t in self.tensors(s):
            n = t.numel()
            t.data.copy_(flat[off:off + n].view_as(t))
            off += n

    def unpack_grads(self, s: int, flat: torch.Tensor) -> None:
        """Gradients into ``p.grad`` of the shard, and the pushed buffers into the buffers (server 0)."""
        off = 0
        for p in self.owned[s]:
            n = p.numel()
            p.grad = flat[off:off + n].view_as(p).clone()
            off += n
        if s == 0:
            for b in self.buffers:
                n = b.numel()
                b.data.copy_(flat[off:off + n].view_as(b))
                off += n


def _ps_runtime(cfg) -> Runtime:
    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    rt = Runtime(rank, world, _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1),
                 torch.device("cpu"), _env_int("TORCHELASTIC_RESTART_COUNT", 0))
    return rt


def _connect(rt: Runtime, cfg) -> None:
    """The job's store (torch's env:// rendezvous, as in :func:`~scalelab.parallel.runtime.init_runtime`)."""
    timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
    store, _, _ = next(dist.rendezvous("env://", rt.rank, rt.world_size, timeout=timeout))
    rt.store = dist.PrefixStore(f"scalelab/attempt-{rt.restart_count}/ps", store)
    rt.timeout_s = cfg.parallel.timeout_s
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // max(rt.local_world_size, 1))
    torch.set_num_threads(threads)


def _pair(store, s: int, client: int, gen: int, my_rank: int, timeout_s: float):
    return dist.ProcessGroupGloo(dist.PrefixStore(f"pair/{s}/{client}/{gen}", store), my_rank, 2,
                                 datetime.timedelta(seconds=timeout_s))


class _Geometry:
    """Servers, clients (workers or groups), and the batch of each update."""

    def __init__(self, cfg, world: int):
        p = cfg.parallel
        self.S = p.servers
        self.W = check_layout(cfg, world)
        self.G = p.group_size if p.mode == "hybrid" else 1
        self.clients = self.W // self.G
        self.B = cfg.train.batch_size
        self.update_batch = self.B // self.clients


# =============================================================================================== server
class ParameterServer(RunBase):
    """Server rank ``s``: applies every pushed gradient of its shard as it arrives; server 0 also hands out
    tickets, enforces the SSP bound, evaluates, checkpoints and writes the run directory."""

    def __init__(self, trainer, rt: Runtime):
        super().__init__(trainer, rt)
        cfg = self.cfg
        self.geo = g = _Geometry(cfg, rt.world_size)
        self.s = rt.rank
        self.mode = cfg.parallel.mode
        self.bound = cfg.parallel.staleness_bound if self.mode == "ssp" else None

        resume_state = trainer._prepare_out()
        spe_sync, total_sync, sched_sync = self.load(g.B)
        self.spe, self.T = spe_sync * g.clients, total_sync * g.clients  # in server updates
        t = cfg.train
        self.eval_u = (t.eval_every or spe_sync) * g.clients
        self.ckpt_u = (t.checkpoint_every or spe_sync) * g.clients
        self.build(g.update_batch, self.spe, sched_sync * g.clients, resume_state)
        self.layout = Layout(self.model, g.S)
        self.n = self.layout.size(self.s)
        self.version = self.c.step
        self.next_ticket = self.c.step  # after a resume, in-flight tickets of the dead session are redone
        self.q: queue.Queue = queue.Queue()
        self.pairs: dict[int, Any] = {}
        self.gen: dict[int, int] = {}
        self.live: set[int] = set()
        self.joining: set[int] = set()  # accepted, hello not yet received: the job does not end under them
        self.ever: set[int] = set()
        self.outstanding: dict[int, int] = {}
        self.requeue: list[int] = []
        self.blocked: set[int] = set()
        self.clock: dict[int, int] = {}
        self.applied = [0] * g.clients
        self.pushed = [0] * g.clients
        self.deaths = self.rejoins = 0
        self.hist: Counter = Counter()
        self.max_ahead = 0
        self.sending: dict[int, tuple] = {}
        self.retired: list[Any] = []  # pairs and sends of lost generations, kept so that no destructor waits on them
        self.threads: list[tuple[int, int, threading.Thread]] = []  # (client, generation, reader)
        self.stopping = False
        self._iv = self._interval()
        if g.S > 1:
            self.servers_pg = dist.ProcessGroupGloo(dist.PrefixStore("servers", rt.store), self.s, g.S,
                                                    datetime.timedelta(seconds=rt.timeout_s))

    @staticmethod
    def _interval() -> dict[str, Any]:
        return {"loss": 0.0, "correct": 0.0, "count": 0.0, "taus": [], "ahead": 0, "lr_min": math.inf,
                "t0": time.perf_counter()}

    # ---- membership -----------------------------------------------------------------------------------
    def _who(self, c: int) -> str:
        g = self.geo
        first = g.S + c * g.G
        return f"worker {c} (rank {first})" if g.G == 1 else f"group {c} (ranks {first}-{first + g.G - 1})"

    def _lose(self, c: int, why: str) -> None:
        """Client ``c`` is gone (its pair broke, or its group restarted): its ticket goes back to the queue, SSP
        stops waiting for it, and (server 0) the log and the counters say so."""
        self.joining.discard(c)
        if c not in self.live:
            return
        self.live.discard(c)
        self.blocked.discard(c)
        self.retired.append(self.sending.pop(c, None))  # a reply it will never read: do not wait for it
        if c in self.outstanding:
            self.requeue.append(self.outstanding.pop(c))
        if self.s == 0:
            self.deaths += 1
            what = "worker(s)" if self.geo.G == 1 else "group(s)"
            self.log(f"{self._who(c)} is gone at step {self.version} ({why}); the other {len(self.live)} {what} "
                     f"go on")
            self.tracker.log("worker_lost", self.version, worker=c, live=len(self.live))
            self._release()

    def _poll_joins(self) -> None:
        store = self.rt.store
        for c in range(self.geo.clients):
            key = f"join/{c}"
            if not store.check([key]):
                continue
            gen = int(store.get(key))
            if self.gen.get(c) == gen:
                continue
            # a new generation while the old one still counts as live: the group restarted without its leader's
            # pair breaking (another member died); the old generation is lost
            self._lose(c, "its group restarted")
            rejoin = c in self.ever
            self.gen[c] = gen
            self.joining.add(c)
            store.set(f"ack/{self.s}/{c}/{gen}", "1")
            pg = _pair(store, self.s, c, gen, 0, self.rt.timeout_s)
            self.retired.append(self.pairs.get(c))
            self.pairs[c] = pg
            th = threading.Thread(target=self._reader, args=(c, gen, pg), daemon=True)
            th.start()
            self.threads.append((c, gen, th))
            if rejoin and self.s == 0:
                self.rejoins += 1
                self.log(f"{self._who(c)} rejoined at step {self.version}")
                self.tracker.log("rejoin", self.version, worker=c, gen=gen)

    def _reader(self, c: int, gen: int, pg) -> None:
        """One thread per client: blocking receives (they release the GIL), handed to the main loop."""
        try:
            while True:
                head = torch.zeros(H, dtype=torch.float64)
                pg.recv([head], 1, TAG_UP_H).wait()
                payload = None
                if int(head[0]) == PUSH:
                    payload = torch.empty(self.n, dtype=self.layout.params[0].dtype)
                    pg.recv([payload], 1, TAG_UP_P).wait()
                self.q.put((int(head[0]), c, gen, head, payload))
                if int(head[0]) == BYE:
                    return
        except RuntimeError as e:
            self.q.put(("dead", c, gen, str(e).splitlines()[0][:160], None))

    # ---- replies and tickets --------------------------------------------------------------------------
    def _reply(self, c: int, ticket: int) -> None:
        prev = self.sending.pop(c, None)
        if prev is not None:
            try:
                for w in prev[0]:
                    w.wait()
            except RuntimeError:
                pass
        head = torch.tensor([self.version, ticket, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
        body = self.layout.pack(self.s, grads=False).clone()
        pg = self.pairs[c]
        try:
            works = [pg.send([head], 1, TAG_DOWN_H), pg.send([body], 1, TAG_DOWN_P)]
        except RuntimeError:
            return  # the client is gone; its reader thread reports it
        self.sending[c] = (works, head, body)
        self.c.comm_bytes += (head.numel() * head.element_size() + body.numel() * body.element_size())

    def _min_clock(self) -> int:
        return min(self.clock[u] for u in self.live) if self.live else 0

    def _exhausted(self) -> bool:
        return self.stopping or (self.next_ticket >= self.T and not self.requeue)

    def _grant(self, c: int) -> None:
        if self.s != 0:
            self._reply(c, 0)
            return
        if self._exhausted():
            self._reply(c, STOP)
            return
        ahead = self.clock[c] - self._min_clock()
        if self.bound is not None and ahead > self.bound:
            self.blocked.add(c)
            return
        self.max_ahead = max(self.max_ahead, ahead)
        self._iv["ahead"] = max(self._iv["ahead"], ahead)
        if self.requeue:
            ticket = self.requeue.pop(0)
        else:
            ticket, self.next_ticket = self.next_ticket, self.next_ticket + 1
        self.outstanding[c] = ticket
        self._reply(c, ticket)

    def _release(self) -> None:
        for c in sorted(self.blocked):
            if c in self.live and (self._exhausted() or self.clock[c] - self._min_clock() <= self.bound):
                self.blocked.discard(c)
                self._grant(c)

    # ---- applying a gradient --------------------------------------------------------------------------
    def _apply(self, c: int, head: torch.Tensor, payload: torch.Tensor) -> None:
        cfg, c_ = self.cfg, self.c
        self.c.comm_bytes += payload.numel() * payload.element_size() + H * 8
        tau = self.version - int(head[2])
        self.hist[tau] += 1
        self._iv["taus"].append(tau)
        loss_v = float(head[3]) / max(float(head[5]), 1.0)
        self._iv["loss"] += float(head[3])
        self._iv["correct"] += float(head[4])
        self._iv["count"] += float(head[5])
        lr = self.sched(self.version)
        if cfg.parallel.staleness_lr:
            lr /= max(tau, 1)
        self._iv["lr_min"] = min(self._iv["lr_min"], lr)
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        self.layout.unpack_grads(self.s, payload)
        finite = math.isfinite(loss_v)
        if finite and cfg.recipe.grad_clip:
            gn = torch.nn.utils.clip_grad_norm_(self.layout.owned[self.s], cfg.recipe.grad_clip)
            finite = bool(torch.isfinite(gn))
        if not finite:
            self.tracker.log("nonfinite", self.version, loss=loss_v, lr=lr)
            if cfg.train.on_nan == "stop":
                raise DivergenceError(f"loss is {loss_v} at step {self.version} (lr {lr:.4g}); stopped; "
                                      f"lower recipe.base_lr, add warmup, or set train.on_nan=skip")
            c_.skipped_steps += 1
        else:
            self.opt.step()
        self.version += 1
        c_.step = self.version
        c_.samples_seen += self.geo.update_batch
        self.applied[c] += 1
        self.clock[c] += 1
        self.outstanding.pop(c, None)
        self.last_lr = lr

    # ---- evaluation and gathering of shards -------------------------------------------------------------
    def _gather(self) -> None:
        """Other servers' shards into server 0's model (at evaluation, checkpoint and the end)."""
        if self.geo.S == 1:
            return
        if self.s == 0:
            for s in range(1, self.geo.S):
                flat = torch.empty(sum(p.numel() for p in self.layout.owned[s]), dtype=self.layout.params[0].dtype)
                self.servers_pg.recv([flat], s, 7).wait()
                off = 0
                for p in self.layout.owned[s]:
                    p.data.copy_(flat[off:off + p.numel()].view_as(p))
                    off += p.numel()
        else:
            flat = torch.cat([p.detach().reshape(-1) for p in self.layout.owned[self.s]])
            self.servers_pg.send([flat], 0, 7).wait()

    def _evaluate(self) -> bool:
        from scalelab.train import evaluate_sums

        t0 = time.perf_counter()
        loss_sum, correct, n = evaluate_sums(self.model, self.x_test_all, self.y_test_all,
                                             self.cfg.train.eval_batch)
        self.c.eval_s += time.perf_counter() - t0
        reached = self.record_eval(loss_sum / max(n, 1), correct / max(n, 1), n, self.spe)
        self.tracker.log("staleness", self.version, hist=self._hist_list())
        return reached

    def _hist_list(self) -> list[int]:
        return [self.hist.get(i, 0) for i in range(max(self.hist, default=-1) + 1)]

    def _log_train(self) -> None:
        iv, c = self._iv, self.c
        if not iv["taus"]:
            return
        dt = time.perf_counter() - iv["t0"]
        n = len(iv["taus"])
        self.tracker.log("train", self.version, epoch=self.version / self.spe,
                         loss=iv["loss"] / max(iv["count"], 1), acc=iv["correct"] / max(iv["count"], 1),
                         lr=self.last_lr, lr_min=iv["lr_min"], samples=c.samples_seen,
                         samples_per_s=n * self.geo.update_batch / dt if dt > 0 else 0.0,
                         train_s=c.train_s, wall_s=c.loop_s,
                         staleness_mean=sum(iv["taus"]) / n, staleness_max=max(iv["taus"]),
                         ssp_ahead_max=iv["ahead"], workers_live=len(self.live))
        self._iv = self._interval()

    # ---- the loop ----------------------------------------------------------------------------------------
    def serve(self) -> dict[str, Any]:
        cfg, c, g = self.cfg, self.c, self.geo
        kill = cfg.faults.kill_rank == self.s and c.restarts == 0
        t_loop, train0, ev0, ck0 = time.perf_counter(), c.train_s, c.eval_s, c.ckpt_s
        last_poll, alone_since = 0.0, time.monotonic()
        stopped = "completed"
        started = False
        self.last_lr = self.sched(self.version)
        if self.s == 0:
            self.log(f"run {cfg.run_name()}: parallel.mode={self.mode}, {g.S} server(s), {g.W} workers"
                     + (f" in {g.clients} groups of {g.G}" if g.G > 1 else "")
                     + (f", staleness bound {self.bound}" if self.bound is not None else "")
                     + (", staleness-aware LR" if cfg.parallel.staleness_lr else "")
                     + f", {self.T} updates of {g.update_batch} samples (B={g.B}), lr {self.sched}"
                     + (f" -> {self.out}" if self.out else ""))
        done_key = "done"
        while True:
            now = time.perf_counter()
            if now - last_poll > 0.1 or len(self.ever) < g.clients:
                self._poll_joins()
                last_poll = now
            if self.s == 0 and self._exhausted() and not self.live and not self.joining and self.ever:
                break
            if self.s != 0 and not self.live and self.ever and self.rt.store.check([done_key]):
                break
            if self.live:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since > max(30.0, cfg.parallel.timeout_s):
                raise ScalelabError(f"parameter server {self.s}: no live worker for "
                                    f"{max(30.0, cfg.parallel.timeout_s):g} s at step {self.version}")
            try:
                kind, cl, gen, head, payload = self.q.get(timeout=0.02)
            except queue.Empty:
                continue
            if gen != self.gen.get(cl):
                continue  # a message from a previous life of a worker that has rejoined since
            if kind == "dead":
                self._lose(cl, head)
                continue
            if kind == HELLO:
                # a worker that (re)joins starts at the slowest live clock, so SSP does not wait for its past
                self.clock[cl] = max(self.clock.get(cl, 0), self._min_clock())
                self.live.add(cl)
                self.joining.discard(cl)
                self.ever.add(cl)
                if started:
                    self._grant(cl)
                elif len(self.ever) == g.clients:
                    # every worker is in: start together (as the sync loop does after its process group forms),
                    # and start the training clock here, so that start-up is not counted as training
                    started, t_loop = True, time.perf_counter()
                    for u in sorted(self.live):
                        self._grant(u)
            elif kind == BYE:
                self.live.discard(cl)
                self.pushed[cl] += int(head[6])
            elif kind == PUSH:
                if kill and self.version >= cfg.faults.kill_step:
                    from scalelab.train import inject_kill

                    inject_kill(self.rt.rank, self.version)
                self._apply(cl, head, payload)
                c.train_s = train0 + (time.perf_counter() - t_loop) - (c.eval_s - ev0) - (c.ckpt_s - ck0)
                v = self.version
                if self.s == 0 and (v % cfg.train.log_every == 0 or v == self.T):
                    self._log_train()
                if v % self.eval_u == 0 or v % self.ckpt_u == 0 or v == self.T:
                    self._gather()
                    if self.s == 0 and (v % self.eval_u == 0 or v == self.T) and self._evaluate() \
                            and not self.stopping:
                        self.stopping, stopped = True, "target"
                    if self.s == 0 and (v % self.ckpt_u == 0 or v == self.T or stopped == "target"):
                        self.save(v)
                self._grant(cl)
            if self.s == 0:
                self._release()
        # the end: every client said goodbye or is gone
        for cl, gen, th in self.threads:  # readers of earlier generations may wait on a pair nobody closes
            if gen == self.gen.get(cl):
                th.join(timeout=5)
        if self.s == 0:
            self.rt.store.set(done_key, "1")
        self._gather()
        if self.s != 0:
            self.rt.store.set(f"hist/{self.s}", ",".join(f"{k}:{v}" for k, v in self.hist.items()))
            return {}
        self._log_train()
        if c.last_eval_step != c.step:
            self._evaluate()
        if self.ckdir is not None and c.step % self.ckpt_u:
            self.save(c.step)
        return self._finish(stopped)

    def _finish(self, stopped: str) -> dict[str, Any]:
        g = self.geo
        hist = Counter(self.hist)
        for s in range(1, g.S):  # staleness measured by the other servers, on their shards
            text = self.rt.store.get(f"hist/{s}").decode()
            for item in filter(None, text.split(",")):
                k, v = item.split(":")
                hist[int(k)] += int(v)
        self.hist = hist
        n = sum(hist.values())
        extra = {
            "servers": g.S, "workers": g.W, "group_size": g.G, "update_batch": g.update_batch,
            "global_batches": self.c.samples_seen / g.B,
            "staleness_bound": self.bound, "staleness_lr": self.cfg.parallel.staleness_lr,
            "staleness_mean": sum(k * v for k, v in hist.items()) / n if n else 0.0,
            "staleness_max": max(hist, default=0), "staleness_hist": self._hist_list(),
            "ssp_max_ahead": self.max_ahead, "applied_by_worker": self.applied, "pushed_by_worker": self.pushed,
            "worker_deaths": self.deaths, "worker_rejoins": self.rejoins,
        }
        return self.finish(self.spe, g.B, stopped, extra)


# =============================================================================================== worker
def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent (the supervising worker process) dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _retire(store, key: str, k: int) -> None:
    """Formation ``k`` of a hybrid group is over: the group's next one is ``k + 1`` (idempotent)."""
    store.compare_set(key, str(k), str(k + 1))


def _form_group(store, key: str, client: int, member: int, G: int, k: int, timeout_s: float):
    """Join formation ``k`` of hybrid group ``client``: its process group once all ``G`` members are in; ``None``
    when the job is done meanwhile, ``False`` when the formation was retired meanwhile (a member died again)."""
    store.set(f"{key}/{k}/in/{member}", "1")
    names = [f"{key}/{k}/in/{m}" for m in range(G)]
    deadline = time.monotonic() + timeout_s
    while not store.check(names):
        if store.check(["done"]):
            return None
        if store.add(key, 0) != k:
            return False
        if time.monotonic() > deadline:
            raise ScalelabError(f"group {client}: not every member joined within parallel.timeout_s={timeout_s:g} s")
        time.sleep(0.02)
    return dist.ProcessGroupGloo(dist.PrefixStore(f"group/{client}/{k}", store), member, G,
                                 datetime.timedelta(seconds=timeout_s))


def worker_loop(trainer, rt: Runtime, gen: int, formation=None) -> None:
    """One worker's life: join, then pull / compute / push until the server says stop.

    ``gen`` counts this worker's lives (its supervisor's restarts). In hybrid mode ``formation`` (a shared integer)
    holds the formation of the group this process is in, so that after it dies the next life retires that
    formation; a member whose group fails (another member died) retires it and joins the next one itself.
    """
    cfg, t = trainer.cfg, trainer.cfg.train
    g = _Geometry(cfg, rt.world_size)
    w = rt.rank - g.S
    client, member = divmod(w, g.G)
    leader = member == 0
    store = rt.store
    base = RunBase.__new__(RunBase)  # only for data loading
    base.trainer, base.cfg, base.rt = trainer, cfg, rt
    spe, _, _ = base.load(g.B)
    torch.manual_seed(t.seed)
    from scalelab.models import build_model

    model = build_model(cfg.model, base.data.input_shape, base.data.num_classes).to(getattr(torch, t.dtype))
    model.train()
    layout = Layout(model, g.S)
    dtype = layout.params[0].dtype
    kill = cfg.faults.kill_rank == rt.rank and gen == 0 and rt.restart_count == 0
    order, order_epoch = None, -1

    def life(life_gen: int, group) -> None:
        """Join the servers as generation ``life_gen`` of this client and train until the server says stop."""
        nonlocal order, order_epoch
        pairs = {}
        if leader:
            store.set(f"join/{client}", str(life_gen))
            for s in range(g.S):
                deadline = time.monotonic() + rt.timeout_s
                while not store.check([f"ack/{s}/{client}/{life_gen}"]):
                    if store.check(["done"]):  # rejoining a job that has just finished: nothing left to do
                        if group is not None:  # tell the members, who wait for the first pull
                            group.broadcast(torch.tensor([0, STOP], dtype=torch.float64), 0).wait()
                        return
                    if time.monotonic() > deadline:
                        raise ScalelabError(f"server {s} did not accept worker {w} within parallel.timeout_s="
                                            f"{rt.timeout_s:g} s")
                    time.sleep(0.02)
                pairs[s] = _pair(store, s, client, life_gen, 1, rt.timeout_s)

        pulled = [0] * g.S  # the version of each server's shard this worker computes on

        def exchange(kind: int, head_vals: list[float]) -> tuple[int, int]:
            """Leader: push (or hello/bye) to every server, then pull from every server. Returns (version, ticket)."""
            version, ticket = 0, STOP
            if kind == BYE and not leader:
                return 0, STOP
            if leader:
                for s, pg in pairs.items():
                    head = torch.tensor([kind, *head_vals], dtype=torch.float64)
                    head[2] = pulled[s]
                    pg.send([head], 0, TAG_UP_H).wait()
                    if kind == PUSH:
                        pg.send([layout.pack(s, grads=True).to(dtype)], 0, TAG_UP_P).wait()
                if kind == BYE:
                    return 0, STOP
                for s, pg in pairs.items():
                    head = torch.zeros(H, dtype=torch.float64)
                    body = torch.empty(layout.size(s), dtype=dtype)
                    pg.recv([head], 0, TAG_DOWN_H).wait()
                    pg.recv([body], 0, TAG_DOWN_P).wait()
                    layout.unpack_params(s, body)
                    pulled[s] = int(head[0])
                    if s == 0:
                        version, ticket = int(head[0]), int(head[1])
            if group is not None:  # the leader's pull goes to the whole group
                info = torch.tensor([version, ticket], dtype=torch.float64)
                group.broadcast(info, 0).wait()
                version, ticket = int(info[0]), int(info[1])
                if ticket != STOP:
                    for s in range(g.S):
                        flat = layout.pack(s, grads=False).clone()
                        group.broadcast(flat, 0).wait()
                        layout.unpack_params(s, flat)
            return version, ticket

        version, ticket = exchange(HELLO, [0, -1, 0, 0, 0, 0, life_gen])
        pushed = 0
        while ticket != STOP:
            if kill and version >= cfg.faults.kill_step:
                from scalelab.train import inject_kill

                inject_kill(rt.rank, version)
            k, part = divmod(ticket, g.clients)
            epoch, kk = divmod(k, spe)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(len(base.x_train), t.seed, epoch), epoch
            idx = batch_indices(order, kk, g.B, part * g.G + member, g.W)
            delay = straggler_delay(cfg.stragglers, w, ticket)
            if delay:
                time.sleep(delay)
            model.zero_grad(set_to_none=True)
            xb, yb = base.x_train[idx], base.y_train[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb, label_smoothing=cfg.recipe.label_smoothing)
            loss.backward()
            stats = [loss.item() * len(yb), (out.argmax(1) == yb).sum().item(), len(yb)]
            if group is not None:  # synchronous inside the group: the mean gradient over its members
                flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype)
                                  for p in layout.params] + [torch.tensor(stats, dtype=dtype)])
                group.allreduce(flat).wait()
                off = 0
                for p in layout.params:
                    p.grad = (flat[off:off + p.numel()] / g.G).view_as(p)
                    off += p.numel()
                stats = flat[off:].tolist()
            pushed += 1
            version, ticket = exchange(PUSH, [ticket, version, *stats, pushed, life_gen])
        exchange(BYE, [0, version, 0, 0, 0, pushed, life_gen])

    if g.G == 1:
        life(gen, None)
        return
    key = f"hybrid/{client}/formation"
    if formation is not None and formation.value >= 0:  # the previous life died in that formation
        _retire(store, key, formation.value)
    limit = g.G * cfg.parallel.rejoin  # the first formation, and at most one more per death a supervisor restarts
    while True:
        k = store.add(key, 0)
        if k > limit:
            raise ScalelabError(f"group {client} restarted more than parallel.rejoin x group_size = {limit} times")
        if formation is not None:
            formation.value = k
        group = _form_group(store, key, client, member, g.G, k, rt.timeout_s)
        if group is None:
            return
        if group is False:
            continue
        try:
            life(k, group)
            return
        except RuntimeError as e:  # a member died: the all-reduce or broadcast (or the leader's pair) broke
            if _server_gone(store):
                return
            print(f"scalelab: worker rank {rt.rank}: group {client} lost a member at formation {k} "
                  f"({str(e).splitlines()[0][:120]}); the group restarts from the server's parameters",
                  file=sys.stderr, flush=True)
            _retire(store, key, k)
        group = None  # closes this formation's connections (and, at the leader, its pairs to the servers)


def _server_gone(store) -> bool:
    """The job has ended, or server 0 (which hosts the store) is gone: a worker has nothing left to do."""
    try:
        return store.check(["done"])
    except RuntimeError:
        return True


def _worker_child(trainer, gen: int, formation=None) -> None:
    _die_with_parent()
    rt = _ps_runtime(trainer.cfg)
    try:
        _connect(rt, trainer.cfg)
        trainer.rt = rt
        worker_loop(trainer, rt, gen, formation)
    except ScalelabError as e:
        print(f"scalelab: error: worker rank {rt.rank}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    except RuntimeError as e:
        if getattr(rt, "store", None) is not None and _server_gone(rt.store):
            # a connection broke because the job ended meanwhile (a group restarting at the very end); if the
            # server died instead, the launcher reports the server's failure
            os._exit(0)
        print(f"scalelab: error: worker rank {rt.rank}: {str(e).splitlines()[0][:200]}", file=sys.stderr,
              flush=True)
        os._exit(1)
    exit_worker()


def supervise_worker(trainer, rt: Runtime) -> dict[str, Any]:
    """The process the launcher starts for a worker rank: runs the worker in a child process and starts it again
    when it dies (``parallel.rejoin`` times), so that it rejoins the job (in hybrid mode, with its group). The
    launcher's agent restarts the whole group when a process it watches dies; this keeps a worker's death
    from being one."""
    import multiprocessing as mp

    from scalelab.parallel.launch import WorkerFailure

    cfg = trainer.cfg
    ctx = mp.get_context("fork")
    hybrid = cfg.parallel.mode == "hybrid"
    formation = ctx.Value("i", -1, lock=False) if hybrid else None
    gen = 0
    while True:
        proc = ctx.Process(target=_worker_child, args=(trainer, gen, formation), daemon=False)
        proc.start()
        proc.join()
        code = proc.exitcode
        if code == 0:
            return {}
        if code is not None and code < 0 and gen < cfg.parallel.rejoin:
            name = signal.Signals(-code).name
            print(f"scalelab: worker rank {rt.rank} died ({name}); the "
                  + ("other groups go on; restarting it to rejoin with its group" if hybrid
                     else "job goes on without it; restarting it to rejoin")
                  + f" ({gen + 1}/{cfg.parallel.rejoin})", file=sys.stderr, flush=True)
            gen += 1
            continue
        how = f"was killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exited with {code}"
        raise WorkerFailure(f"worker rank {rt.rank} {how}")


def run_ps(trainer) -> dict[str, Any]:
    """Entry point of every process of a parameter-server job (``parallel.mode`` async, ssp or hybrid)."""
    cfg = trainer.cfg
    rt = _ps_runtime(cfg)
    check_layout(cfg, rt.world_size)
    if rt.rank >= cfg.parallel.servers:
        return supervise_worker(trainer, rt)
    _connect(rt, cfg)
    server = ParameterServer(trainer, rt)
    try:
        return server.serve()
    finally:
        server.tracker.close()
