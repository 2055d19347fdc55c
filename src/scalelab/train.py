"""The training loop: config -> data -> model -> recipe -> loop -> tracking, with exact resume.

``train(cfg, out)`` is what ``scalelab train`` calls. Everything a run computes is a pure function of the config
and the step: the data order of an epoch comes from ``(seed, epoch)``, the learning rate from the step, and the
rest (model, optimizer, RNG, counters) is in the checkpoint. So a run killed at any point and resumed from its
last checkpoint ends with the same parameters, bit for bit, as one that never stopped.

Clocks: ``train_s`` counts only training steps; evaluation (``eval_s``) and checkpoint writing (``ckpt_s``) are
timed apart, so time-to-target and samples/s describe training alone.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scalelab import checkpoint as ckpt
from scalelab.config import Config, save_config
from scalelab.data import DATASETS, Dataset, batch_indices, epoch_order, load_dataset, steps_per_epoch
from scalelab.errors import ConfigError, DataError, DivergenceError, unknown_name
from scalelab.models import MODELS, build_model
from scalelab.recipe import build_optimizer, build_schedule
from scalelab.recipe.norm import set_emulated_workers
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
    best_test_acc: float = 0.0
    last_eval_step: int = -1
    last_test_acc: float = float("nan")
    last_test_loss: float = float("nan")
    steps_to_target: int | None = None
    time_to_target_s: float | None = None
    skipped_steps: int = 0
    restarts: int = 0

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


def default_out_dir(cfg: Config) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.run_name()}"


def check_names(cfg: Config) -> None:
    """Registry names are checked before any work (no data generated, no directory created)."""
    if cfg.data.name not in DATASETS:
        raise DataError(unknown_name("dataset", cfg.data.name, DATASETS))
    if cfg.model.name not in MODELS:
        raise ConfigError(unknown_name("model", cfg.model.name, MODELS))


def _device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for but no CUDA device is available; use auto or cpu")
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float, int]:
    """Test (loss, accuracy, count) from exact sums over the set, batch by batch, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        loss_sum += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    model.train(was_training)
    n = len(x)
    return loss_sum / max(n, 1), correct / max(n, 1), n


class Trainer:
    """One training run. ``Trainer(cfg, out).run()`` returns the summary dict that is also ``summary.json``.

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
        self.rank, self.world_size = 0, 1
        self._data = data

    # ---- set-up -------------------------------------------------------------------------------------
    def _prepare_out(self) -> dict[str, Any] | None:
        """Create the run directory, or find the checkpoint to resume from. Nothing is overwritten."""
        if self.out is None:
            return None
        ckdir = self.out / "checkpoints"
        if self.resume:
            state = ckpt.load_latest(ckdir, log=self._log)
            if state is not None:
                ckpt.check_compatible(state["config"], self.cfg, self.out)
            else:
                self._log(f"no checkpoint in {ckdir}; starting from step 0")
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.toml")
            return state
        if ckpt.list_checkpoints(ckdir) or (self.out / "summary.json").exists():
            raise ConfigError(f"--out {self.out} already holds a run; add --resume to continue it, "
                              f"or choose another directory")
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out / "config.toml")
        return None

    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # ---- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        wall0 = time.perf_counter()
        check_names(cfg)
        device = _device(cfg)
        if t.threads:
            torch.set_num_threads(t.threads)
        resume_state = self._prepare_out()

        data = self._data or load_dataset(cfg.data)
        x_train, y_train = data.x_train.to(device), data.y_train.to(device)
        x_test, y_test = data.x_test.to(device), data.y_test.to(device)
        B = t.batch_size
        spe = steps_per_epoch(len(x_train), B)
        total = t.max_steps or max(1, math.ceil(t.epochs * spe))
        eval_every = t.eval_every or spe
        ckpt_every = t.checkpoint_every or spe

        torch.manual_seed(t.seed)
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
        set_emulated_workers(model, cfg.parallel.emulate_workers)
        opt = build_optimizer(cfg.recipe, model, spe, global_batch=B)
        sched = build_schedule(cfg.recipe, B, spe, total)

        c = Counters()
        if resume_state is not None:
            model.load_state_dict(resume_state["model"])
            opt.load_state_dict(resume_state["optimizer"])
            c = Counters.from_state(resume_state["counters"])
            ckpt.set_rng_state(resume_state["rng"])
            self._log(f"resumed from step {c.step} (epoch {c.step / spe:.2f}) in {self.out}")
        tracker = Tracker(self.out if self.rank == 0 else None,
                          resume_step=c.step if resume_state is not None else None)
        self._log(f"run {cfg.run_name()}: {data.name} ({len(x_train)} train / {len(x_test)} test), "
                  f"{cfg.model.name}, {cfg.recipe.optimizer}, B={B}, {total} steps ({spe}/epoch), "
                  f"lr {sched}, device {device}, {torch.get_num_threads()} threads"
                  + (f", {cfg.parallel.emulate_workers} emulated workers"
                     if cfg.parallel.emulate_workers > 1 else "")
                  + (f" -> {self.out}" if self.out else ""))

        progress = Progress(total, c.step, enabled=t.progress and self.rank == 0, desc=cfg.run_name())
        ckdir = self.out / "checkpoints" if self.out else None

        def save(step: int) -> None:
            if ckdir is None or self.rank != 0:
                return
            t0 = time.perf_counter()
            state = {"format": ckpt.FORMAT_VERSION, "config": cfg.to_dict(), "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "counters": c.to_state(), "rng": ckpt.rng_state()}
            ckpt.save_checkpoint(ckdir, step, state, keep=t.keep_checkpoints)
            c.ckpt_s += time.perf_counter() - t0

        def do_eval() -> bool:
            t0 = time.perf_counter()
            loss, acc, n = evaluate(model, x_test, y_test, t.eval_batch)
            c.eval_s += time.perf_counter() - t0
            c.last_eval_step, c.last_test_acc, c.last_test_loss = c.step, acc, loss
            c.best_test_acc = max(c.best_test_acc, acc)
            reached = bool(t.target_acc) and acc >= t.target_acc and c.steps_to_target is None
            if reached:
                c.steps_to_target, c.time_to_target_s = c.step, c.train_s
            tracker.log("eval", c.step, epoch=c.step / spe, test_loss=loss, test_acc=acc, test_n=n,
                        train_s=c.train_s, eval_s=c.eval_s, samples=c.samples_seen)
            progress.update(0, test_acc=acc)
            return reached

        model.train()
        order, order_epoch = None, -1
        log_t0, log_step0 = c.train_s, c.step
        stopped = "completed"
        try:
            while c.step < total:
                step_t0 = time.perf_counter()
                epoch, k = divmod(c.step, spe)
                if epoch != order_epoch:
                    order, order_epoch = epoch_order(len(x_train), t.seed, epoch).to(device), epoch
                idx = batch_indices(order, k, B)
                lr = sched(c.step)
                for g in opt.param_groups:
                    g["lr"] = lr
                xb, yb = x_train[idx], y_train[idx]
                out = model(xb)
                loss = F.cross_entropy(out, yb, label_smoothing=cfg.recipe.label_smoothing)
                loss_v = loss.item()
                opt.zero_grad(set_to_none=True)
                finite = math.isfinite(loss_v)
                if finite:
                    loss.backward()
                    if cfg.recipe.grad_clip:
                        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.recipe.grad_clip)
                        finite = bool(torch.isfinite(gn))
                if not finite:
                    tracker.log("nonfinite", c.step, loss=loss_v, lr=lr)
                    if t.on_nan == "stop":
                        last = ckpt.list_checkpoints(ckdir)[-1][1].name if ckdir and ckpt.list_checkpoints(
                            ckdir) else "none"
                        raise DivergenceError(
                            f"loss is {loss_v} at step {c.step} (epoch {c.step / spe:.2f}, lr {lr:.4g}); "
                            f"stopped, last good checkpoint: {last}; lower recipe.base_lr, add warmup, "
                            f"or set train.on_nan=skip")
                    c.skipped_steps += 1
                    opt.zero_grad(set_to_none=True)
                else:
                    opt.step()
                c.step += 1
                c.samples_seen += B
                c.train_s += time.perf_counter() - step_t0

                if c.step % t.log_every == 0 or c.step == total:
                    acc = (out.argmax(1) == yb).float().mean().item()
                    dt = c.train_s - log_t0
                    sps = (c.step - log_step0) * B / dt if dt > 0 else 0.0
                    log_t0, log_step0 = c.train_s, c.step
                    tracker.log("train", c.step, epoch=c.step / spe, loss=loss_v, acc=acc, lr=lr,
                                samples=c.samples_seen, samples_per_s=sps, train_s=c.train_s)
                    progress.update(1, epoch=f"{c.step / spe:.2f}", loss=loss_v, acc=acc, lr=lr,
                                    samples_s=round(sps))
                else:
                    progress.update(1)

                if c.step % eval_every == 0 or c.step == total:
                    if do_eval():
                        stopped = "target"
                        save(c.step)
                        break
                if c.step % ckpt_every == 0 or c.step == total:
                    save(c.step)
        finally:
            progress.close()
            tracker.flush()

        if c.last_eval_step != c.step:
            do_eval()
        summary = self._summary(c, spe, B, model, stopped, time.perf_counter() - wall0)
        tracker.log("summary", c.step, **{k: v for k, v in summary.items() if not isinstance(v, str)})
        tracker.close()
        if self.out is not None and self.rank == 0:
            tmp = self.out / ".summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, self.out / "summary.json")
        return summary

    def _summary(self, c: Counters, spe: int, B: int, model, stopped: str, wall_s: float) -> dict[str, Any]:
        t = self.cfg.train
        return {
            "final_test_acc": c.last_test_acc,
            "best_test_acc": c.best_test_acc,
            "final_test_loss": c.last_test_loss,
            "steps": c.step,
            "epochs": c.step / spe,
            "samples_seen": c.samples_seen,
            "wall_s": wall_s,
            "train_s": c.train_s,
            "eval_s": c.eval_s,
            "checkpoint_s": c.ckpt_s,
            "train_samples_per_s": c.samples_seen / c.train_s if c.train_s > 0 else 0.0,
            "target_acc": t.target_acc or None,
            "steps_to_target": c.steps_to_target,
            "time_to_target_s": c.time_to_target_s,
            "stopped": stopped,
            "skipped_steps": c.skipped_steps,
            "world_size": self.world_size,
            "emulated_workers": self.cfg.parallel.emulate_workers,
            "global_batch": B,
            "comm_bytes": 0,
            "restarts": c.restarts,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "params_sha256": params_sha256(model),
        }


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
