"""Training modes other than synchronous data parallelism, and what they share with the sync loop.

``parallel.mode`` picks how N workers cooperate:

- ``sync`` (default): the loop in :mod:`scalelab.train` (all-reduce of the gradients every step).
- ``async``, ``ssp``, ``hybrid``: parameter-server training, :mod:`scalelab.parallel.ps`.
- ``localsgd``: local SGD and post-local SGD, :mod:`scalelab.parallel.localsgd`.

Every mode writes the same run directory as sync training: ``config.toml``, ``metrics.jsonl`` (and TensorBoard),
checkpoints with the model, optimizer, :class:`~scalelab.train.Counters` and RNG state, and ``summary.json`` with
the keys of :data:`~scalelab.train.SUMMARY_KEYS` plus the mode's own (staleness, pushes, deaths...).
:class:`RunBase` holds that shared part: data, model, recipe, resume, evaluation, checkpoints and the summary.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch

from scalelab import checkpoint as ckpt
from scalelab.data import load_dataset, steps_per_epoch
from scalelab.errors import ConfigError
from scalelab.models import build_model
from scalelab.recipe import build_optimizer, build_schedule
from scalelab.track import Tracker

PS_MODES = ("async", "ssp", "hybrid")


def check_layout(cfg, world: int) -> int:
    """Check that ``world`` processes fit the mode; returns the number of workers that compute gradients.

    Parameter-server modes use the first ``parallel.servers`` ranks as servers and the rest as workers; every
    worker takes ``B / workers`` samples of each global batch ``B``.
    """
    p, B = cfg.parallel, cfg.train.batch_size
    workers = world - p.servers if p.mode in PS_MODES else world
    if p.mode in PS_MODES and workers < 1:
        raise ConfigError(f"parallel.mode={p.mode}: {world} process(es) leave no worker beside "
                          f"parallel.servers={p.servers}; allowed: --nproc >= {p.servers + 1}")
    if p.mode == "hybrid" and workers % p.group_size:
        raise ConfigError(f"parallel.group_size: {p.group_size} does not divide the {workers} workers "
                          f"(--nproc minus parallel.servers)")
    if B % workers:
        raise ConfigError(f"train.batch_size: {B} is not divisible by the {workers} workers; each takes B/N")
    return workers


def run_mode(trainer) -> dict[str, Any]:
    """Run ``trainer.cfg`` in its ``parallel.mode`` (called by :meth:`scalelab.train.Trainer.run`)."""
    mode = trainer.cfg.parallel.mode
    if mode == "localsgd":
        from scalelab.parallel.localsgd import run_localsgd

        return run_localsgd(trainer)
    from scalelab.parallel.ps import run_ps

    return run_ps(trainer)


class RunBase:
    """The parts of a run every mode shares with the sync loop (same files, same records, same summary).

    Args:
        trainer: the :class:`~scalelab.train.Trainer` (config, run directory, resume flag, preloaded data).
        rt: this process's :class:`~scalelab.parallel.runtime.Runtime`; rank 0 writes the run directory.
    """

    def __init__(self, trainer, rt):
        self.trainer, self.cfg, self.rt = trainer, trainer.cfg, rt
        trainer.rt = rt
        self.out = trainer.out
        self.ckdir = self.out / "checkpoints" if self.out else None
        self.wall0 = time.perf_counter()

    def log(self, msg: str) -> None:
        self.trainer._log(msg)

    def load(self, read_per_step: int):
        """Data on the device; returns (steps per epoch of ``read_per_step`` samples, total steps of B, the LR
        schedule's length in steps of B)."""
        cfg, t = self.cfg, self.cfg.train
        data = self.trainer._data or load_dataset(cfg.data)
        self.data = data
        dtype = getattr(torch, t.dtype)
        self.x_train, self.y_train = data.x_train.to(self.rt.device, dtype), data.y_train.to(self.rt.device)
        self.x_test_all, self.y_test_all = data.x_test.to(self.rt.device, dtype), data.y_test.to(self.rt.device)
        spe = steps_per_epoch(len(self.x_train), read_per_step)
        total = t.max_steps or max(1, math.ceil(t.epochs * spe))
        return spe, total, t.schedule_steps or total

    def build(self, update_batch: int, spe: int, total: int, resume_state=None):
        """Model, optimizer and an LR schedule of ``total`` updates of ``update_batch`` samples; counters from a
        checkpoint."""
        from scalelab.train import Counters

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, self.data.input_shape, self.data.num_classes).to(
            self.rt.device, getattr(torch, cfg.train.dtype))
        opt = build_optimizer(cfg.recipe, model, spe, global_batch=update_batch)
        sched = build_schedule(cfg.recipe, update_batch, spe, total)
        c = Counters()
        if resume_state is not None:
            model.load_state_dict(resume_state["model"])
            opt.load_state_dict(resume_state["optimizer"])
            c = Counters.from_state(resume_state["counters"])
            c.restarts += 1
            ckpt.set_rng_state(resume_state["rng"])
            self.log(f"resumed from step {c.step} in {self.out}")
        c.world_size = self.rt.world_size
        self.model, self.opt, self.sched, self.c = model, opt, sched, c
        self.tracker = Tracker(self.out if self.rt.is_main else None,
                               resume_step=c.step if resume_state is not None else None)
        return model, opt, sched, c

    def save(self, step: int, extra: dict | None = None) -> None:
        if self.ckdir is None or not self.rt.is_main:
            return
        t0 = time.perf_counter()
        state = {"format": ckpt.FORMAT_VERSION, "config": self.cfg.to_dict(), "model": self.model.state_dict(),
                 "optimizer": self.opt.state_dict(), "counters": self.c.to_state(), "rng": ckpt.rng_state(),
                 **(extra or {})}
        ckpt.save_checkpoint(self.ckdir, step, state, keep=self.cfg.train.keep_checkpoints)
        self.c.ckpt_s += time.perf_counter() - t0

    def record_eval(self, loss: float, acc: float, n: int, spe: int) -> bool:
        """Book an evaluation into the counters and the log; True when the target accuracy is first reached."""
        c, t = self.c, self.cfg.train
        c.last_eval_step, c.last_test_acc, c.last_test_loss = c.step, acc, loss
        c.best_test_acc = max(c.best_test_acc, acc)
        reached = bool(t.target_acc) and acc >= t.target_acc and c.steps_to_target is None
        if reached:
            c.steps_to_target, c.time_to_target_s = c.step, c.train_s
        self.tracker.log("eval", c.step, epoch=c.step / spe, test_loss=loss, test_acc=acc, test_n=n,
                         train_s=c.train_s, eval_s=c.eval_s, wall_s=c.loop_s,
                         samples=c.samples_seen)
        return reached

    def finish(self, spe: int, B: int, stopped: str, extra: dict[str, Any]) -> dict[str, Any]:
        """The summary (sync's keys plus ``extra``), logged and written to ``summary.json`` by rank 0."""
        summary = self.trainer._summary(self.c, self.c.step / spe, B, self.model, stopped, time.perf_counter() - self.wall0)
        summary.update({"mode": self.cfg.parallel.mode, **extra})
        self.tracker.log("summary", self.c.step, **{k: v for k, v in summary.items()
                                                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
        self.tracker.close()
        if self.out is not None and self.rt.is_main:
            tmp = self.out / ".summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, self.out / "summary.json")
        return summary
