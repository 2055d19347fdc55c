"""The training loop: config -> data -> model -> recipe -> loop -> tracking, with exact resume.

``train(cfg, out)`` is what ``scalelab train`` calls. Everything a run computes is a pure function of the config
and the step: the data order of an epoch comes from ``(seed, epoch)``, the learning rate from the step, and the
rest (model, optimizer, RNG, counters) is in the checkpoint. So a run killed at any point and resumed from its
last checkpoint ends with the same parameters, bit for bit, as one that never stopped.

Clocks: ``train_s`` counts only training steps; evaluation (``eval_s``), checkpoint writing (``ckpt_s``) and
the noise-scale measurements' own work (``noise_s``) are timed apart, so time-to-target and samples/s describe
training alone.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scalelab import checkpoint as ckpt
from scalelab.compress import dgc_optimizer, gather_state, restore_state
from scalelab.config import Config, save_config
from scalelab.data import DATASETS, Dataset, epoch_order, load_dataset
from scalelab.errors import ConfigError, DataError, DivergenceError, ScalelabError, unknown_name
from scalelab.lab.noise import NoiseMonitor, noise_method
from scalelab.parallel.launch import WorkerFailure
from scalelab.models import MODELS, build_model
from scalelab.recipe import build_optimizer, build_schedule, eval_weights
from scalelab.recipe.batch import BatchPlan
from scalelab.recipe.schedule import peak_lr
from scalelab.parallel.runtime import GradNormProbe, Runtime, init_runtime
from scalelab.parallel.stragglers import BackupSync, straggler_delay
from scalelab.track import Progress, Tracker, summary_table

SUMMARY_KEYS = [
    "final_test_acc", "best_test_acc", "final_test_loss", "steps", "epochs", "samples_seen", "wall_s",
    "train_s", "eval_s", "train_samples_per_s", "target_acc", "steps_to_target", "time_to_target_s",
    "world_size", "global_batch", "comm_bytes", "peak_rss_mb", "params_sha256",
]


@dataclass
class Counters:
    """Everything about a run's progress that is not model or optimizer state; saved in checkpoints."""

    step: int = 0
    samples_seen: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    ckpt_s: float = 0.0
    noise_s: float = 0.0  # noise-scale measurements outside the training clock (train.noise_every)
    best_test_acc: float = 0.0
    last_eval_step: int = -1
    last_test_acc: float = float("nan")
    last_test_loss: float = float("nan")
    steps_to_target: int | None = None
    time_to_target_s: float | None = None
    skipped_steps: int = 0
    restarts: int = 0
    comm_bytes: int = 0
    comm_s: float = 0.0
    dropped_grads: int = 0
    world_size: int = 1  # of the session that wrote the checkpoint
    epoch: int = 0  # data position: the epoch being read ...
    epoch_pos: int = 0  # ... and the samples of its permutation read so far (see scalelab.recipe.batch)
    base_batch: int = 0  # global batch before growth; 0 = train.batch_size (changes at a keep_worker resize)
    micro_batch: int = 0  # per-worker micro-batch set at an elastic resize (keep_global); 0 = none
    last_batch: int = 0  # global batch of the last step
    schedule_epochs: float = 0.0  # length of the LR schedule in epochs, fixed by the first session

    @property
    def loop_s(self) -> float:
        """Time in the training loop: training, evaluation, checkpoints and noise-scale measurements."""
        return self.train_s + self.eval_s + self.ckpt_s + self.noise_s

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "Counters":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def params_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the parameters in module order (name, dtype, shape and bytes), for exact comparisons."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def refuse_existing_run(out: Path) -> None:
    """A new run never overwrites one that is already in ``out``."""
    if ckpt.list_checkpoints(out / "checkpoints") or (out / "summary.json").exists():
        raise ConfigError(f"--out {out} already holds a run; add --resume to continue it, "
                          f"or choose another directory")


def workers_used(cfg: Config, world: int, check_batch: bool = True) -> int:
    """Workers whose gradients make a step (all but the backup workers); each takes B / that many samples."""
    if cfg.parallel.mode != "sync":
        from scalelab.parallel.modes import check_layout

        return check_layout(cfg, world)
    used = world - cfg.parallel.backup_workers
    if used < 1:
        raise ConfigError(f"parallel.backup_workers: {cfg.parallel.backup_workers} leaves no worker of "
                          f"{world}; allowed: 0 .. {world - 1}")
    if check_batch and cfg.train.batch_size % used:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the {used} workers "
                          f"whose gradients are used (workers minus parallel.backup_workers); each takes B/N")
    return used


def default_out_dir(cfg: Config) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.run_name()}"


def check_names(cfg: Config) -> None:
    """Registry names are checked before any work (no data generated, no directory created)."""
    if cfg.data.name not in DATASETS:
        raise DataError(unknown_name("dataset", cfg.data.name, DATASETS))
    if cfg.model.name not in MODELS:
        raise ConfigError(unknown_name("model", cfg.model.name, MODELS))


@torch.no_grad()
def evaluate_sums(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, int, int]:
    """Exact sums over a test set in eval mode: (summed cross-entropy, correct predictions, count)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        loss_sum += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    model.train(was_training)
    return loss_sum, correct, len(x)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float, int]:
    """Test (mean loss, accuracy, count) of one process."""
    loss_sum, correct, n = evaluate_sums(model, x, y, batch)
    return loss_sum / max(n, 1), correct / max(n, 1), n


class Trainer:
    """One training run. ``Trainer(cfg, out).run()`` returns the summary dict that is also ``summary.json``.

    The same loop runs alone or as one of N data-parallel workers (see :mod:`scalelab.parallel.runtime`): each
    worker takes its B/N share of every global batch, DDP averages the gradients, evaluation and logged metrics
    are summed over workers as counts, and only rank 0 writes the run directory.

    Args:
        cfg: the validated run config.
        out: run directory (created); None writes nothing (used for quick experiments and tests).
        resume: continue from the newest checkpoint in ``out`` (starts fresh if there is none).
        data: an already-loaded dataset to use instead of ``load_dataset(cfg.data)`` (sweeps reuse one).
    """

    def __init__(self, cfg: Config, out: str | Path | None = None, resume: bool = False,
                 data: Dataset | None = None):
        self.cfg = cfg
        self.out = Path(out) if out is not None else None
        self.resume = resume
        self.rt = Runtime()
        self._data = data
        self._step = 0  # the step in progress, for error messages

    # ---- set-up -------------------------------------------------------------------------------------
    def _prepare_out(self) -> dict[str, Any] | None:
        """Create the run directory (rank 0), or find the checkpoint to resume from. Nothing is overwritten."""
        if self.out is None:
            return None
        ckdir = self.out / "checkpoints"
        if self.resume:
            state = ckpt.load_latest(ckdir, log=self._log)
            if state is not None:
                ckpt.check_compatible(state["config"], self.cfg, self.out)
            else:
                self._log(f"no checkpoint in {ckdir}; starting from step 0")
        else:
            if self.rt.is_main:
                refuse_existing_run(self.out)
            state = None
        if self.rt.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.toml")
        return state

    def _log(self, msg: str) -> None:
        if self.rt.is_main:
            print(msg, flush=True)

    # ---- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        check_names(self.cfg)
        if self.cfg.parallel.mode != "sync":  # async, ssp, hybrid, localsgd: scalelab.parallel.modes
            from scalelab.parallel.modes import run_mode

            return run_mode(self)
        self.rt = init_runtime(self.cfg)
        try:
            summary = self._run()
            self.rt.barrier()  # leave together: a worker tearing down while others still talk can abort them
            return summary
        except DivergenceError as e:
            # every worker decides at the same step (from the all-reduced gradients): each says so, then they
            # leave together, since the launcher stops the job at the first worker's exit
            e.report()
            self.rt.barrier()
            raise
        except RuntimeError as e:
            if not self.rt.distributed or not _is_comm_failure(e):
                raise
            raise self._comm_failure(e) from None
        finally:
            self.rt.shutdown()

    def _comm_failure(self, e: RuntimeError) -> ScalelabError:
        """Turn gloo's timeout or closed-connection error into one line naming the ranks that stopped."""
        rt = self.rt
        silent = rt.silent_ranks(self._step, wait_s=min(10.0, max(2.0, rt.timeout_s)))
        who = (f"rank(s) {', '.join(map(str, silent))} stopped responding (hung or dead)" if silent
               else "a peer closed its connection")
        return WorkerFailure(f"rank {rt.rank}: a collective at step {self._step} failed after waiting up to "
                             f"parallel.timeout_s={rt.timeout_s:g} s: {who} ({str(e).splitlines()[0][:120]})")

    def _batch_plan(self, c: Counters, n: int, world: int, used: int, legacy: bool) -> tuple[BatchPlan, str]:
        """This session's batch plan; at a restart on another number of workers, apply ``parallel.resize`` and
        return the log line that says what changed (else ""). ``legacy``: the counters come from a checkpoint
        written before the data position was kept, so it is derived from the step."""
        cfg = self.cfg
        base_B, micro, msg = c.base_batch or cfg.train.batch_size, c.micro_batch, ""
        if c.step and c.world_size != world:
            old_share = base_B // max(1, c.world_size - cfg.parallel.backup_workers)
            msg = f"world size changed from {c.world_size} to {world} workers at restart: "
            if cfg.parallel.resize == "keep_global":
                new_share = base_B // used
                msg += (f"keeping the global batch {base_B} and the recipe; per-worker batch {old_share} -> "
                        f"{new_share}")
                kfac = "kfac" in (cfg.recipe.optimizer, cfg.recipe.precondition)  # one pass per step
                if not cfg.train.micro_batch and new_share > (micro or old_share) and not kfac:
                    micro = micro or old_share
                if micro and new_share > micro and not cfg.train.micro_batch:
                    msg += (f" in {math.ceil(new_share / micro)} micro-batches of {micro} (gradient "
                            f"accumulation keeps each worker's memory)")
                msg += " (parallel.resize=keep_global)"
            else:
                new_B = old_share * used
                msg += (f"keeping each worker's batch {old_share}; global batch {base_B} -> {new_B}, peak lr "
                        f"{peak_lr(cfg.recipe, base_B):.4g} -> {peak_lr(cfg.recipe, new_B):.4g} by the "
                        f"{cfg.recipe.scaling} scaling rule (parallel.resize=keep_worker)")
                base_B = new_B
        r = cfg.recipe
        plan = BatchPlan(base_B, n, used, world, tuple(r.batch_milestones), r.batch_growth,
                         cfg.train.micro_batch or micro)
        if legacy:
            c.epoch, k = divmod(c.step, plan.ref_steps_per_epoch)
            c.epoch_pos = k * plan.read(base_B)
        c.base_batch, c.micro_batch = base_B, micro
        return plan, msg

    def _run(self) -> dict[str, Any]:
        cfg, t, rt = self.cfg, self.cfg.train, self.rt
        wall0 = time.perf_counter()
        resume_state = self._prepare_out()
        device, rank, world = rt.device, rt.rank, rt.world_size

        data = self._data or load_dataset(cfg.data)
        dtype = getattr(torch, t.dtype)
        x_train, y_train = data.x_train.to(device, dtype), data.y_train.to(device)
        # each worker evaluates a contiguous share of the test set; the sums are reduced exactly
        lo, hi = rank * len(data.x_test) // world, (rank + 1) * len(data.x_test) // world
        x_test, y_test = data.x_test[lo:hi].to(device, dtype), data.y_test[lo:hi].to(device)
        B = t.batch_size
        used = workers_used(cfg, world, check_batch=False)
        c = Counters()
        if resume_state is not None:
            c = Counters.from_state(resume_state["counters"])
            c.restarts += 1
        legacy = resume_state is not None and "epoch_pos" not in resume_state["counters"]
        plan, resized = self._batch_plan(c, len(x_train), world, used, legacy)
        spe = plan.ref_steps_per_epoch
        # the LR schedule's length in steps of the base batch; kept in epochs across sessions, since a
        # keep_worker resize changes the base batch
        if not c.schedule_epochs:
            c.schedule_epochs = (t.schedule_steps or t.max_steps or max(1, math.ceil(t.epochs * spe))) / spe
        total_ref = max(1, round(c.schedule_epochs * spe))
        total = plan.count_steps(c.epoch, c.epoch_pos, total_ref, t.max_steps, done=c.step)
        eval_every, ckpt_every = t.eval_every, t.checkpoint_every  # 0: at the end of every epoch

        torch.manual_seed(t.seed)
        base = build_model(cfg.model, data.input_shape, data.num_classes).to(device, dtype)
        opt = build_optimizer(cfg.recipe, base, spe, global_batch=plan.base)
        sched = build_schedule(cfg.recipe, plan.base, spe, total_ref)
        if resume_state is not None:
            base.load_state_dict(resume_state["model"])
            opt.load_state_dict(resume_state["optimizer"])
            ckpt.set_rng_state(resume_state["rng"])
            self._log(f"resumed from step {c.step} (epoch {plan.ref_step(c.epoch, c.epoch_pos) / spe:.2f}) "
                      f"in {self.out}")
            if resized:
                self._log(resized)
        dgc_optimizer(opt, cfg, world)  # DGC keeps the gradient's momentum in the hook (after a resume too)
        c.world_size = world
        backup = BackupSync(rt, used) if cfg.parallel.backup_workers else None
        model = rt.wrap(base, cfg, ddp=backup is None, steps_per_epoch=spe)
        params = [p for p in base.parameters()]
        if rt.compress is not None:  # the compressor's state (per worker) comes back with the rest
            note = restore_state(rt, resume_state, params)
            if note:
                self._log(note)
        comm0_bytes, comm0_s = c.comm_bytes, c.comm_s
        if getattr(opt, "kfac", None) is not None:  # K-FAC's factor all-reduces and inverse broadcasts count too
            opt.kfac.comm = rt.comm
        tracker = Tracker(self.out if rt.is_main else None,
                          resume_step=c.step if resume_state is not None else None)
        self._log(f"run {cfg.run_name()}: {data.name} ({len(x_train)} train / {len(data.x_test)} test), "
                  f"{cfg.model.name}, {cfg.recipe.optimizer}, B={plan.base}"
                  + (f" = {used} workers x {plan.share(plan.base)}" if world > 1 else "")
                  + (f" (+{world - used} backup)" if world > used else "")
                  + (f", batch x{cfg.recipe.batch_growth:g} at epochs "
                     f"{', '.join(f'{m:g}' for m in cfg.recipe.batch_milestones)}"
                     if cfg.recipe.batch_milestones else "")
                  + (f", micro-batches of {plan.micro}" if plan.micro else "")
                  + f", {total} steps ({spe}/epoch), lr {sched}, device {device}, "
                  f"{torch.get_num_threads()} threads" + ("/worker" if world > 1 else "")
                  + (f", {cfg.parallel.emulate_workers} emulated workers"
                     if cfg.parallel.emulate_workers > 1 else "")
                  + (f" -> {self.out}" if self.out else ""))

        progress = Progress(total, c.step, enabled=t.progress and rt.is_main, desc=cfg.run_name())
        # gradient noise scale (McCandlish et al. 2018), measured outside the training clock: scalelab.lab.noise
        # ("workers": from the step's own per-worker and averaged gradients, read by the DDP hook)
        method = (noise_method(t.noise_method, world, cfg.compress.method, cfg.parallel.backup_workers)
                  if t.noise_every else None)
        noise = (NoiseMonitor(B // used, t.noise_shards if method == "shards" else None, seed=t.seed,
                              label_smoothing=cfg.recipe.label_smoothing) if t.noise_every else None)
        ckdir = self.out / "checkpoints" if self.out else None

        def save(step: int) -> None:
            if ckdir is None:
                return
            t0 = time.perf_counter()
            compress = gather_state(rt, params)  # every worker's compressor state (a collective: all take part)
            if not rt.is_main:
                return
            state = {"format": ckpt.FORMAT_VERSION, "config": cfg.to_dict(), "model": base.state_dict(),
                     "optimizer": opt.state_dict(), "counters": c.to_state(), "rng": ckpt.rng_state()}
            if compress is not None:
                state["compress"] = compress
            ckpt.save_checkpoint(ckdir, step, state, keep=t.keep_checkpoints)
            c.ckpt_s += time.perf_counter() - t0

        def do_eval() -> bool:
            t0 = time.perf_counter()
            rt.broadcast_state(base, buffers_only=True)  # every worker evaluates with rank 0's BN statistics
            with eval_weights(opt):  # Neumann evaluates w - mu*m, not its displaced weights
                loss_sum, correct, n = evaluate_sums(base, x_test, y_test, t.eval_batch)
            sums = rt.all_reduce_sum(torch.tensor([loss_sum, correct, n], dtype=torch.float64))
            loss, acc, n = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item(), int(sums[2])
            c.eval_s += time.perf_counter() - t0
            c.last_eval_step, c.last_test_acc, c.last_test_loss = c.step, acc, loss
            c.best_test_acc = max(c.best_test_acc, acc)
            reached = bool(t.target_acc) and acc >= t.target_acc and c.steps_to_target is None
            if reached:
                c.steps_to_target, c.time_to_target_s = c.step, c.train_s
            tracker.log("eval", c.step, epoch=epochs_done(), test_loss=loss, test_acc=acc, test_n=n,
                        train_s=c.train_s, eval_s=c.eval_s, wall_s=c.loop_s, samples=c.samples_seen)
            progress.update(0, test_acc=acc)
            return reached

        def epochs_done() -> float:
            return plan.ref_step(c.epoch, c.epoch_pos) / spe

        model.train()
        order, order_epoch = None, -1
        log_t0, log_samples0 = c.train_s, c.samples_seen
        stopped = "completed"
        smoothing = cfg.recipe.label_smoothing
        try:
            while c.step < total:
                if rank == cfg.faults.kill_rank and c.step == cfg.faults.kill_step and c.restarts == 0:
                    inject_kill(rank, c.step)
                if rank == cfg.faults.hang_rank and c.step == cfg.faults.hang_step and c.restarts == 0:
                    inject_hang(rank, c.step)
                step_t0 = time.perf_counter()
                self._step = rt.step = c.step
                epoch, pos, Bs = plan.start(c.epoch, c.epoch_pos)
                if epoch != order_epoch:
                    order, order_epoch = epoch_order(len(x_train), t.seed, epoch).to(device), epoch
                read, share = plan.read(Bs), plan.share(Bs)
                idx = order[pos + rank * share:pos + (rank + 1) * share]
                lr = rt.lr = sched(plan.ref_step(epoch, pos))
                for g in opt.param_groups:
                    g["lr"] = lr
                xb, yb = x_train[idx], y_train[idx]
                chunks = plan.micro_batches(Bs)
                log_now = (c.step + 1) % t.log_every == 0 or c.step + 1 == total
                delay = straggler_delay(cfg.stragglers, rank, c.step)
                opt.zero_grad(set_to_none=True)
                hits = probe = None
                if backup is None:
                    if delay:
                        time.sleep(delay)
                    if method == "workers" and (c.step + 1) % t.noise_every == 0:
                        rt.norm_probe = GradNormProbe()
                    loss, hits = forward_backward(model, xb, yb, chunks, smoothing, log_now)
                    rt.end_backward()
                    probe, rt.norm_probe = rt.norm_probe, None
                    loss_v = loss.item()  # this worker's; the mean over workers is reduced at log steps
                    # after DDP's all-reduce every worker holds the same gradients, so every worker takes the
                    # same decision about a non-finite step (a NaN loss anywhere makes them NaN)
                    finite = grads_finite(params) if world > 1 else math.isfinite(loss_v)
                else:
                    loss, included = torch.zeros((), dtype=dtype), False
                    if backup.wait(delay, c.step):
                        loss, hits = forward_backward(model, xb, yb, chunks, smoothing, log_now)
                        included = backup.arrive(c.step)
                    loss_v, dropped = backup.reduce(params, loss, included, c.step)
                    c.dropped_grads += len(dropped)
                    tracker.log("backup", c.step, dropped=dropped)
                    finite = math.isfinite(loss_v)
                if finite and cfg.recipe.grad_clip:
                    gn = torch.nn.utils.clip_grad_norm_(base.parameters(), cfg.recipe.grad_clip)
                    finite = bool(torch.isfinite(gn))
                if not finite:
                    tracker.log("nonfinite", c.step, loss=loss_v, lr=lr)
                    if t.on_nan == "stop":
                        kept = ckpt.list_checkpoints(ckdir) if ckdir else []
                        what = (f"loss is {loss_v}" if not math.isfinite(loss_v)
                                else f"gradients are not finite (loss {loss_v:.4g})")
                        raise DivergenceError(
                            f"{what} at step {c.step} (epoch {epochs_done():.2f}, lr {lr:.4g}); "
                            f"stopped, last good checkpoint: {kept[-1][1].name if kept else 'none'}; "
                            f"lower recipe.base_lr, add warmup, or set train.on_nan=skip")
                    c.skipped_steps += 1
                    opt.zero_grad(set_to_none=True)
                else:
                    opt.step()
                c.step += 1
                c.samples_seen += Bs
                c.epoch, c.epoch_pos, c.last_batch = epoch, pos + read, Bs
                epoch_end = plan.epoch_ends(c.epoch, c.epoch_pos)
                c.train_s += time.perf_counter() - step_t0
                c.comm_bytes, c.comm_s = comm0_bytes + rt.comm.bytes_sent, comm0_s + rt.comm.exposed_s
                noise_t0 = time.perf_counter()
                if probe is not None and finite:  # every worker has the same `finite`: all take part
                    local_sq, big_sq = probe.sums()
                    small_sq = rt.all_reduce_sum(torch.tensor([local_sq], dtype=torch.float64)).item() / world
                    c.noise_s += time.perf_counter() - noise_t0
                    tracker.log("noise", c.step,
                                **noise.record(small_sq, big_sq, share, share * world, method))
                elif method == "shards" and c.step % t.noise_every == 0:
                    rec = noise.measure(base, x_train, y_train, rt.all_reduce_sum)
                    c.noise_s += time.perf_counter() - noise_t0
                    tracker.log("noise", c.step, **rec)

                if rt.compress is not None and c.step % (cfg.compress.log_every or t.log_every) == 0:
                    tracker.log("compress", c.step, **rt.compress.step_record())
                if log_now:
                    # the mean loss over workers (equal shares) and the accuracy over all their samples
                    mine = [hits, len(yb), loss_v] if hits is not None else [0, 0, 0.0]
                    counts = rt.all_reduce_sum(torch.tensor(mine, dtype=torch.float64))
                    acc = (counts[0] / counts[1]).item()
                    if backup is None:
                        loss_v = counts[2].item() / world
                    dt = c.train_s - log_t0
                    sps = (c.samples_seen - log_samples0) / dt if dt > 0 else 0.0
                    log_t0, log_samples0 = c.train_s, c.samples_seen
                    tracker.log("train", c.step, epoch=epochs_done(), loss=loss_v, acc=acc, lr=lr, batch=Bs,
                                samples=c.samples_seen, samples_per_s=sps, train_s=c.train_s,
                                wall_s=c.loop_s,
                                comm_bytes=c.comm_bytes, comm_s=c.comm_s)
                    progress.update(1, epoch=f"{epochs_done():.2f}", loss=loss_v, acc=acc, lr=lr,
                                    samples_s=round(sps))
                else:
                    progress.update(1)

                if (c.step % eval_every == 0 if eval_every else epoch_end) or c.step == total:
                    if do_eval():
                        stopped = "target"
                        save(c.step)
                        break
                if (c.step % ckpt_every == 0 if ckpt_every else epoch_end) or c.step == total:
                    save(c.step)
        finally:
            progress.close()
            tracker.flush()

        if c.last_eval_step != c.step:
            do_eval()
        summary = self._summary(c, epochs_done(), plan.base, base, stopped, time.perf_counter() - wall0)
        tracker.log("summary", c.step, **{k: v for k, v in summary.items() if not isinstance(v, str)})
        tracker.close()
        if self.out is not None and rt.is_main:
            tmp = self.out / ".summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, self.out / "summary.json")
        return summary

    def _summary(self, c: Counters, epochs: float, B: int, model, stopped: str, wall_s: float) -> dict[str, Any]:
        t = self.cfg.train
        return {
            "final_test_acc": c.last_test_acc,
            "best_test_acc": c.best_test_acc,
            "final_test_loss": c.last_test_loss,
            "steps": c.step,
            "epochs": epochs,
            "samples_seen": c.samples_seen,
            "wall_s": wall_s,
            "train_s": c.train_s,
            "eval_s": c.eval_s,
            "checkpoint_s": c.ckpt_s,
            "noise_s": c.noise_s,
            "train_samples_per_s": c.samples_seen / c.train_s if c.train_s > 0 else 0.0,
            "target_acc": t.target_acc or None,
            "steps_to_target": c.steps_to_target,
            "time_to_target_s": c.time_to_target_s,
            "stopped": stopped,
            "skipped_steps": c.skipped_steps,
            "world_size": self.rt.world_size,
            "emulated_workers": self.cfg.parallel.emulate_workers,
            "global_batch": B,
            "last_global_batch": c.last_batch or B,
            "comm_bytes": c.comm_bytes,
            "comm_s": c.comm_s,
            "compute_s": c.train_s - c.comm_s,
            "restarts": c.restarts,
            "backup_workers": self.cfg.parallel.backup_workers,
            "dropped_grads": c.dropped_grads,
            **(self.rt.compress.summary() if self.rt.compress is not None else {}),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "params_sha256": params_sha256(model),
        }


def grads_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def forward_backward(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor, chunks: int,
                     label_smoothing: float, count_hits: bool) -> tuple[torch.Tensor, int | None]:
    """Gradient of this worker's mean loss over ``xb``, in ``chunks`` forward/backward passes (accumulation).

    Each micro-batch's loss is weighted by its share of the samples, so the accumulated gradient is the mean
    over all of them; under DDP every pass but the last skips the all-reduce (``no_sync``).
    Returns ``(the mean loss, detached; correct predictions or None)``.
    """
    xs, ys = xb.tensor_split(chunks), yb.tensor_split(chunks)
    total, hits = None, 0 if count_hits else None
    for i, (xc, yc) in enumerate(zip(xs, ys)):
        last = i == chunks - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            out = model(xc)
            loss = F.cross_entropy(out, yc, label_smoothing=label_smoothing)
            if chunks > 1:
                loss = loss * (len(yc) / len(yb))
            total = loss.detach() if total is None else total + loss.detach()
            loss.backward()
        if count_hits:
            hits += (out.argmax(1) == yc).sum().item()
    return total, hits


def _is_comm_failure(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(k in text for k in ("timeout", "timed out", "connection closed", "connection reset", "pair closure"))


def inject_hang(rank: int, step: int) -> None:
    """Fault injection (``faults.hang_rank``): this worker stops responding, as in a deadlock or a stuck disk."""
    print(f"faults: rank {rank} hangs at step {step}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def inject_kill(rank: int, step: int) -> None:
    """Fault injection (``faults.kill_rank`` / ``faults.kill_step``): this worker dies as from ``kill -9``."""
    print(f"faults: killing rank {rank} at step {step} (SIGKILL)", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: Config, out: str | Path | None = None, resume: bool = False, *,
          data: Dataset | None = None) -> dict[str, Any]:
    """Train one run and return its summary (see :data:`SUMMARY_KEYS`).

    Example:
        >>> from scalelab import load_config, train
        >>> cfg = load_config(None, ["data.name=synthetic", "model.name=mlp", "train.epochs=1",
        ...                          "train.progress=false"])
        >>> summary = train(cfg)            # doctest: +SKIP
        >>> summary["final_test_acc"] > 0.5  # doctest: +SKIP
        True
    """
    return Trainer(cfg, out, resume, data=data).run()


def print_summary(summary: dict[str, Any]) -> None:
    print(summary_table(summary))
