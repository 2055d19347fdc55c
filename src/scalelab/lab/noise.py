"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 and the critical batch size it predicts.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv 1812.06162), §2 and
Appendix A. With ``G`` the true gradient and ``Sigma`` the per-example gradient covariance, a batch-``B`` gradient
``G_B`` has ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``. Two batch sizes ``b < B`` therefore give unbiased estimates

    |G|^2     ~  (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~  (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

In data-parallel training they come for free (``train.noise_method=workers``, the default with several
workers): ``G_b`` is a worker's gradient of the training step before DDP's all-reduce (``b`` its share),
``|G_b|^2`` averaged over the workers, and ``G_B`` the averaged gradient (``B`` the global batch), read by
the trainer's DDP communication hook (:class:`scalelab.parallel.runtime.GradNormProbe`). In one process
(``shards``) a fresh batch is split into ``k`` shards of ``b = B/k``: ``|G_b|^2`` is the mean over shards
of the squared shard-gradient norm, ``G_B`` the mean of the shard gradients. A single estimate is noisy
(and can be negative), so, as in the paper, each of the two is smoothed with an exponential moving average before
the ratio is taken. The critical batch size is about ``B_noise`` (at ``B = B_noise`` a run takes twice the
minimum steps and twice the minimum examples, eq. 2.11); ``B_simple`` equals ``B_noise`` when the Hessian is a
multiple of the identity and is what is measured here.

Pieces:

* :func:`estimate` -- the two unbiased estimates from ``|G_b|^2`` and ``|G_B|^2``;
* :func:`noise_method` -- ``workers`` where the run allows it, else ``shards``;
* :class:`NoiseMonitor` -- what the trainer calls every ``train.noise_every`` steps (kind ``"noise"`` records in
  ``metrics.jsonl``): :meth:`~NoiseMonitor.record` with the two norms of the step's own gradients
  (``workers``), or :meth:`~NoiseMonitor.measure` on a fresh batch of the run's global batch size drawn from
  the training set with its own generator (the run's data order and RNG are untouched), its shard gradients
  at the current parameters, BN statistics restored afterwards (``shards``);
* ``scalelab noise --config ... [--set ...] [--nproc N] --out DIR``: a training run with the monitor on, then
  the curve (``noise.png``), ``noise.json`` and the critical batch it predicts.

With batch norm each shard is normalised with its own statistics (as ghost batch norm would), so ``G_b`` is the
gradient of a ghost-BN model; the estimators stay self-consistent because ``G_B`` is the mean of those same shard
gradients.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scalelab.lab.plotting import finish
from scalelab.errors import ConfigError, DataError


def estimate(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from ``E|G_b|^2`` at two batch sizes (McCandlish et al. 2018, App. A).

    Example:
        >>> # |G|^2 = 1, tr(Sigma) = 64: E|G_8|^2 = 1 + 64/8 = 9, E|G_64|^2 = 1 + 64/64 = 2
        >>> estimate(9.0, 2.0, 8, 64)
        (1.0, 64.0)
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


@dataclass
class EMA:
    """Bias-corrected exponential moving average (as Adam corrects its moments), so early values are usable."""

    decay: float
    value: float = 0.0
    n: int = 0

    def update(self, x: float) -> float:
        self.n += 1
        self.value = self.decay * self.value + (1 - self.decay) * x
        return self.get()

    def get(self) -> float:
        return self.value / (1 - self.decay ** self.n) if self.n else float("nan")


def ema_curve(records: list[dict[str, Any]], decay: float) -> list[float]:
    """B_simple from EMAs of the logged ``g2`` and ``trace`` estimates, one value per record."""
    eg, et, out = EMA(decay), EMA(decay), []
    for r in records:
        g, t = eg.update(r["g2"]), et.update(r["trace"])
        out.append(t / g if g > 0 else float("nan"))
    return out


def flat_grad(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def shard_norms(shard_grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``k`` shard gradients (rows, each the mean over ``b`` examples): ``(|G_b|^2, |G_B|^2)`` with
    ``|G_b|^2`` the mean squared norm of the shards and ``G_B`` their mean (the gradient of all ``B = k b``)."""
    small_sq = (shard_grads * shard_grads).sum(1).mean()
    big = shard_grads.mean(0)
    return small_sq, (big * big).sum()


def noise_method(requested: str, world_size: int, compress: str = "none", backup_workers: int = 0) -> str:
    """Which estimator a run uses (``train.noise_method``): ``workers`` takes ``|G_b|^2`` and ``|G_B|^2`` from
    the training step itself, each worker's gradient before DDP's all-reduce and the averaged one after it, at
    the cost of two squared norms and one scalar all-reduce; that needs several workers whose gradients are
    averaged exactly (no compression, no backup workers). ``shards`` measures on a fresh batch split into
    shards, extra forward and backward passes outside the training clock, in any run. ``auto`` takes
    ``workers`` where it can."""
    free = world_size > 1 and compress == "none" and not backup_workers
    if requested == "workers" and not free:
        why = ("one worker has no second batch size" if world_size <= 1 else
               f"compress.method={compress} sends a compressed gradient" if compress != "none" else
               "backup workers average a subset of the gradients")
        raise ConfigError(f"train.noise_method=workers: {why}; it needs >= 2 workers averaging their "
                          f"gradients exactly; allowed here: shards, auto")
    if requested == "auto":
        return "workers" if free else "shards"
    return requested


class NoiseMonitor:
    """Measures B_simple during training (see the module docstring) and keeps the moving averages.

    Args:
        batch: the (per-worker) batch B whose gradient is ``G_B`` in :meth:`measure`.
        shards: ``k``; the small batch of :meth:`measure` is ``b = B / k``. ``None``: the estimates come from
            elsewhere through :meth:`record` (the ``workers`` method), and :meth:`measure` is not used.
        ema: decay of the moving averages of ``|G|^2`` and ``tr(Sigma)``.
        seed: seed of the monitor's own sample generator.
        label_smoothing: as in the training loss.
    """

    def __init__(self, batch: int, shards: int | None, ema: float = 0.9, seed: int = 0,
                 label_smoothing: float = 0.0):
        if shards is not None and (shards < 2 or batch % shards):
            raise ConfigError(f"train.noise_shards: {shards} must be >= 2 and divide the batch {batch}")
        self.batch, self.shards = batch, shards
        self.small = batch // shards if shards else None
        self.g2, self.trace = EMA(ema), EMA(ema)
        self.gen = torch.Generator().manual_seed(10007 + seed)
        self.label_smoothing = label_smoothing

    def measure(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                reduce=None) -> dict[str, float]:
        """One measurement at the current parameters; returns the record to log.

        ``reduce`` (optional) sums a float64 tensor over data-parallel workers; the two squared norms are then
        averaged over workers (each worker's ``B`` is its share of the global batch).
        """
        idx = torch.randint(0, len(x), (self.batch,), generator=self.gen).to(x.device)
        xb, yb = x[idx], y[idx]
        params = [p for p in model.parameters() if p.requires_grad]
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        try:
            shard_grads = []
            for i in range(self.shards):
                sl = slice(i * self.small, (i + 1) * self.small)
                loss = F.cross_entropy(model(xb[sl]), yb[sl], label_smoothing=self.label_smoothing)
                shard_grads.append(flat_grad(params, loss).double())
        finally:
            with torch.no_grad():  # the measurement must not move BN running statistics
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])
        small_sq, big_sq = shard_norms(torch.stack(shard_grads))
        vals = torch.stack([small_sq, big_sq, torch.ones((), dtype=torch.float64)])
        if reduce is not None:
            vals = reduce(vals)
        small_sq, big_sq = (vals[0] / vals[2]).item(), (vals[1] / vals[2]).item()
        return self.record(small_sq, big_sq, self.small, self.batch, "shards")

    def record(self, small_sq: float, big_sq: float, b_small: int, b_big: int, method: str) -> dict[str, Any]:
        """The two unbiased estimates from ``|G_b|^2`` and ``|G_B|^2``, into the moving averages; the record
        to log (``method``: which estimator measured them)."""
        g2, trace = estimate(small_sq, big_sq, b_small, b_big)
        eg, et = self.g2.update(g2), self.trace.update(trace)
        return {"g2": g2, "trace": trace, "b_simple_raw": trace / g2 if g2 > 0 else float("nan"),
                "b_simple": et / eg if eg > 0 else float("nan"), "g_small_sq": small_sq, "g_big_sq": big_sq,
                "b_small": b_small, "b_big": b_big, "method": method}


# ---- analysis of a run's noise curve -----------------------------------------------------------------------------
def noise_records(run_dir: Path) -> list[dict[str, Any]]:
    from scalelab.lab.report import read_metrics

    return [r for r in read_metrics(run_dir) if r.get("kind") == "noise" and r.get("g2") is not None]


def analyze(run_dir: Path, ema: float = 0.9, tail: float = 0.2) -> dict[str, Any]:
    """The noise curve of a run and its summary: B_simple at the end (EMA), averaged over the last ``tail`` of
    the measurements (ratio of the averaged estimates), and at the step the run reached its target if it did."""
    run_dir = Path(run_dir)
    recs = noise_records(run_dir)
    if not recs:
        raise DataError(f"{run_dir}: no noise-scale records in metrics.jsonl; train with train.noise_every=N")
    curve = ema_curve(recs, ema)
    n_tail = max(1, int(len(recs) * tail))
    tail_recs = recs[-n_tail:]
    g2 = sum(r["g2"] for r in tail_recs) / n_tail
    tr = sum(r["trace"] for r in tail_recs) / n_tail
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    at_target = None
    if summary.get("steps_to_target") is not None:
        before = [c for r, c in zip(recs, curve) if r["step"] <= summary["steps_to_target"]]
        at_target = before[-1] if before else None
    b_tail = tr / g2 if g2 > 0 else float("nan")
    return {"run_dir": str(run_dir), "measurements": len(recs), "ema": ema,
            "b_simple_final": curve[-1], "b_simple_tail": b_tail, "tail_fraction": tail,
            "b_simple_at_target": at_target, "steps_to_target": summary.get("steps_to_target"),
            "target_acc": summary.get("target_acc"), "final_test_acc": summary.get("final_test_acc"),
            "batch": recs[0]["b_big"], "shards_batch": recs[0]["b_small"],
            "method": recs[0].get("method", "shards"),
            "predicted_critical_batch": next((v for v in (at_target, b_tail, curve[-1])
                                              if v is not None and math.isfinite(v) and v > 0), None),
            "curve": [{"step": r["step"], "b_simple": c, "b_simple_raw": r["b_simple_raw"], "g2": r["g2"],
                       "trace": r["trace"]} for r, c in zip(recs, curve)]}


def plot_noise(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    steps = [c["step"] for c in curve]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    raw = [c["b_simple_raw"] if c["b_simple_raw"] is not None and c["b_simple_raw"] > 0 else float("nan")
           for c in curve]
    ax.plot(steps, raw, ".", alpha=0.35, label="single-measurement tr(Σ)/|G|²")
    ax.plot(steps, [c["b_simple"] for c in curve], "-", lw=2, label=f"B_simple (EMA {result['ema']:g})")
    if result.get("steps_to_target") is not None:
        ax.axvline(result["steps_to_target"], color="gray", ls="--",
                   label=f"target {result['target_acc']:g} reached")
    return finish(fig, ax, path, xlabel="step", ylabel="gradient noise scale (examples)",
                  title=f"gradient noise scale, B={result['batch']}, b={result['shards_batch']} "
                        f"({result.get('method', 'shards')}; McCandlish et al. 2018)")


def write_result(run_dir: Path, ema: float = 0.9) -> tuple[dict[str, Any], list[Path]]:
    result = analyze(run_dir, ema)
    (Path(run_dir) / "noise.json").write_text(json.dumps(result, indent=1) + "\n")
    return result, [Path(run_dir) / "noise.json", plot_noise(result, Path(run_dir) / "noise.png")]


def small_batches(r: dict[str, Any]) -> str:
    """What the small batch b of a noise result was: each worker's share, or shards of one batch."""
    return "each worker's share" if r.get("method") == "workers" else "shards"


def format_result(r: dict[str, Any]) -> str:
    small = small_batches(r)
    lines = [f"gradient noise scale B_simple (McCandlish et al. 2018), {r['measurements']} measurements at "
             f"B={r['batch']} with {small} of b={r['shards_batch']}:",
             f"  at the end (EMA {r['ema']:g}):          {r['b_simple_final']:.1f}",
             f"  last {r['tail_fraction']:.0%} of the run:          {r['b_simple_tail']:.1f}"]
    if r["b_simple_at_target"] is not None:
        lines.append(f"  when test acc {r['target_acc']:g} was reached (step {r['steps_to_target']}): "
                     f"{r['b_simple_at_target']:.1f}")
    if r["predicted_critical_batch"] is None:
        lines.append("|G|^2 is not resolved above the noise: no prediction (measure more often or longer)")
        return "\n".join(lines)
    lines.append(f"predicted critical batch B_crit ~ B_simple = {r['predicted_critical_batch']:.0f}; the knee "
                 f"where steps leave perfect scaling by 1.25x ~ B_crit/4 + 1.25 b0")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="analyse an existing run trained with "
                   "train.noise_every (instead of training one)")
    p.add_argument("--config", metavar="FILE.toml", help="config of the run to train")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one config field; repeatable")
    p.add_argument("--every", type=int, default=10, help="measure every N steps (default 10)")
    p.add_argument("--method", choices=("auto", "workers", "shards"), default="auto",
                   help="workers: from each worker's and the all-reduced gradient of the training step "
                        "(free, needs --nproc >= 2); shards: a fresh batch in shards; auto (default): "
                        "workers if it can")
    p.add_argument("--shards", type=int, default=8, help="shards per batch, shards method (default 8)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel workers, as in scalelab train")
    p.add_argument("--ema", type=float, default=0.9, help="EMA decay of the two estimates (default 0.9)")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/noise-<date>-<time>)")


def run(args) -> int:
    import datetime as dt

    from scalelab.config import load_config
    from scalelab.train import train

    if not 0 <= args.ema < 1:
        raise ConfigError(f"--ema {args.ema}: allowed: >= 0 and < 1")
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: allowed: N >= 1")
    if args.run_dir:
        out = Path(args.run_dir)
    else:
        cfg = load_config(args.config, list(args.overrides) + [f"train.noise_every={args.every}",
                                                                f"train.noise_shards={args.shards}",
                                                                f"train.noise_method={args.method}"])
        noise_method(args.method, args.nproc, cfg.compress.method, cfg.parallel.backup_workers)  # refused now
        out = Path(args.out) if args.out else Path("runs") / f"noise-{dt.datetime.now():%Y%m%d-%H%M%S}"
        if args.nproc > 1:
            from scalelab.cli import launch_job

            launch_job(cfg, out, args.nproc)
        else:
            train(cfg, out)
    result, paths = write_result(out, args.ema)
    print(format_result(result))
    for p in paths:
        print(f"wrote {p}")
    return 0

