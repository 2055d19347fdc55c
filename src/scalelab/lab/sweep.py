"""``scalelab sweep``: steps-to-target against batch size, with a learning-rate search per batch and optimizer.

    scalelab sweep --config BASE.toml --batch 32..8192 --target-acc 0.98 --optimizers sgd,lars,lamb \\
                   [--lr-guess sgd=0.05@32:linear ...] [--lr-mults 0.5,1,2] [--budget-epochs 30] \\
                   [--budget-steps 400] [--warmup-epochs 1] [--jobs 2] [--out DIR]
                   [--search quasi-random --trials 16 --lr-range 0.25,4 [--horizon-range 0.5,8]]

The measurement follows Shallue et al. 2018, "Measuring the Effects of Data Parallelism on Neural Network
Training" (arXiv 1811.03600): for every batch size B and optimizer, train to a fixed test-accuracy goal with each
learning rate of a search space, and take the fewest steps any of them needed. Steps-to-target against B then
shows perfect scaling (steps halve when B doubles), diminishing returns and the end of useful parallelism; the
knee (:mod:`scalelab.lab.knee`) is where perfect scaling ends.

The grid search (the default), per cell (optimizer, batch, warmup, horizon):

* The LRs are ``guess(B) * m`` for each multiplier ``m`` of ``--lr-mults``, with ``guess(B)`` from the
  optimizer's ``--lr-guess LR@BATCH:RULE`` scaled to B by the rule (``linear``, ``sqrt`` or ``none``).
* The middle multiplier runs first. The other points run after it, and are stopped at the best step count the
  cell has so far (``pruned``): a trial that has not reached the target by then cannot be the fastest, so
  stopping it does not change the minimum. (The stop leaves the trial's LR schedule as long as its budget,
  ``train.schedule_steps``, so a pruned trial is the full trial cut short, with a decaying LR too.)
* When the fastest LR lies on the edge of the points tried, the search goes one factor further out, up to
  ``--extend`` times per side (Shallue et al. check that the best point is not on the edge of the search
  space); when every point diverged it goes lower; when none reached the target, towards the edge point with
  the highest accuracy; and when no trial got half-way from chance accuracy to the target, in both directions
  (the best accuracy among trials near chance is no direction).

The budget of a trial is ``max(round(budget_epochs * (N // B)), budget_steps)`` steps (N training examples):
``--budget-epochs`` alone gives a large batch few steps (10 epochs of 45,000 examples are 50 steps at B = 8192),
which says more about the budget than about the batch; ``--budget-steps`` guarantees every batch at least that
many steps, and leaves the budget of the small batches, where the epochs give more, unchanged. Each trial
records its ``budget`` and its ``cap`` (the steps it was allowed: the budget, or the pruning limit if lower).

A decaying LR schedule (``recipe.schedule`` cosine, step, poly...) runs over the trial's budget, so the budget is
also the schedule's length, which Shallue et al. tune as well: ``--horizons 1,2,4,8`` searches budgets of 1, 2,
4 and 8 epochs (each at least ``--budget-steps``), each its own cell with its own LR search, and the best per
(optimizer, batch) is taken over them, as over the warm-ups.

The quasi-random search (``--search quasi-random``), the search Shallue et al. used: per cell (optimizer, batch,
warmup), ``--trials`` points of a scrambled Sobol sequence (the same points in every cell), each an LR
multiplier drawn log-uniformly from ``--lr-range LO,HI`` (times ``guess(B)``) and, with ``--horizon-range
LO,HI`` and a decaying LR, a horizon in epochs drawn log-uniformly too. It does not adapt to the results, but
it covers the ranges without a grid's gaps: with a decaying LR a run crosses the target late in its horizon, so
on a grid of horizons a cell's steps move with the grid. Every trial is stopped at its cell's best so far when
it starts, across horizons (a shorter or longer schedule that has not reached the target by then cannot be the
fastest either).

Every trial is a separate worker process (``train.threads=1``, no run directory), up to ``--jobs`` at a time
(``--jobs 1`` runs them in the sweep's own process).
Each trial's result is written atomically to ``OUT/trials/<id>.json`` the moment it ends, so a killed sweep,
run again with the same arguments, skips the finished trials and goes on. Failed trials (``diverged``,
``missed``: the budget ended first, ``pruned``, ``error``) are kept and marked.

Output in OUT: ``sweep.json`` (spec, every trial, the best per cell, knees), ``sweep.csv`` (every trial, with a
``best`` column that marks the fastest trial of each (optimizer, batch)), ``best.csv`` (one row per optimizer and
batch: ``batch,optimizer,steps_to_target,steps,lr,...``), ``steps_<optimizer>.csv`` (``batch,steps`` of the
batches that reached the target, which ``scalelab project --steps-table`` reads), and ``plots/``:
steps-to-target and examples-to-target against batch (log-log, per optimizer, with the perfect-scaling line and
the knee marked) and the best LR against batch.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import csv
import functools
import io
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from scalelab.errors import ConfigError, DivergenceError

__all__ = ["LRGuess", "SweepSpec", "Trial", "best_of", "cell_of", "next_mults", "next_trials", "run_sweep",
           "summarize"]

RULES = ("linear", "sqrt", "none")
FAILED = ("diverged", "missed", "pruned", "error")
SEARCHES = ("grid", "quasi-random")


# ---- the specification -----------------------------------------------------------------------------------------
@functools.cache
def _sobol(n: int, dims: int) -> tuple[tuple[float, ...], ...]:
    """The first ``n`` points in [0, 1)^dims of a scrambled Sobol sequence with a fixed seed."""
    import torch

    u = torch.quasirandom.SobolEngine(dims, scramble=True, seed=0).draw(n, dtype=torch.float64)
    return tuple(map(tuple, u.tolist()))


@dataclass(frozen=True)
class LRGuess:
    """An LR that works at one batch size, and the rule that carries it to other batch sizes."""

    lr: float
    batch: int
    rule: str = "linear"

    def at(self, batch: int) -> float:
        r = batch / self.batch
        return self.lr * {"linear": r, "sqrt": math.sqrt(r), "none": 1.0}[self.rule]

    @classmethod
    def parse(cls, text: str) -> "LRGuess":
        """``LR@BATCH[:RULE]``, e.g. ``0.05@32:linear``."""
        try:
            lr_batch, _, rule = text.partition(":")
            lr, _, batch = lr_batch.partition("@")
            g = cls(float(lr), int(batch), rule or "linear")
        except ValueError:
            raise ConfigError(f"--lr-guess {text!r}: expected OPT=LR@BATCH[:RULE], e.g. sgd=0.05@32:linear")
        if g.rule not in RULES or g.lr <= 0 or g.batch <= 0:
            raise ConfigError(f"--lr-guess {text!r}: need LR > 0, BATCH > 0 and RULE one of {', '.join(RULES)}")
        return g


@dataclass
class SweepSpec:
    """Everything that decides which trials a sweep runs; saved as ``sweep_spec.json`` and checked on resume.

    Attributes:
        base: the base run config (``Config.to_dict()``); each trial overrides optimizer, batch, LR, warmup,
            target, budget and evaluation cadence.
        batches: global batch sizes.
        optimizers: ``recipe.optimizer`` names.
        target_acc: the test-accuracy goal.
        guesses: per optimizer, the LR guess (:class:`LRGuess` as a dict).
        lr_mults: multipliers of the guess that make the LR grid.
        warmups: warm-up lengths in epochs to search over (one value: no warm-up search).
        warmup_search_from: search the warm-ups after the first only at batches >= this (0: at every batch);
            the first warm-up runs at every batch. Warm-up matters at large batches (Goyal et al. 2017, You
            et al. 2017), and searching it only there saves the trials at the small ones.
        budget_epochs: a trial that has not reached the target after this many epochs is ``missed`` ...
        budget_steps: ... unless the epochs are fewer steps than this: a trial's budget is the larger of the two
            (:meth:`budget`); 0 = epochs only.
        horizons: budgets in epochs to search over instead of ``budget_epochs``, for a decaying LR schedule
            (whose length is the trial's budget); each is a cell of its own. Empty: ``budget_epochs`` alone.
        eval_examples: evaluate every ``max(1, round(eval_examples / B))`` steps (the steps resolution).
        extend: how many extra LR points the search may add beyond each edge of the grid.
        tol: the knee tolerance (see :mod:`scalelab.lab.knee`).
        search: ``grid`` (``lr_mults``, extended at the edges) or ``quasi-random``.
        trials: quasi-random: trials per (optimizer, batch, warm-up) cell.
        lr_range: quasi-random: the LR multipliers' range ``[lo, hi]`` (log-uniform; lo = hi: that one LR).
        horizon_range: quasi-random with a decaying LR: the horizons' range in epochs ``[lo, hi]`` (log-uniform);
            empty: every trial's budget is ``budget_epochs``.
    """

    base: dict[str, Any]
    batches: list[int]
    optimizers: list[str]
    target_acc: float
    guesses: dict[str, dict[str, Any]]
    lr_mults: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    warmups: list[float] = field(default_factory=lambda: [1.0])
    warmup_search_from: int = 0
    budget_epochs: float = 30.0
    budget_steps: int = 0
    horizons: list[float] = field(default_factory=list)
    eval_examples: int = 2048
    extend: int = 2
    tol: float = 1.25
    search: str = "grid"
    trials: int = 16
    lr_range: list[float] = field(default_factory=lambda: [0.25, 4.0])
    horizon_range: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.batches or not self.optimizers or not self.lr_mults or not self.warmups:
            raise ConfigError("a sweep needs at least one batch, optimizer, LR multiplier and warm-up")
        if any(b < 1 for b in self.batches) or any(m <= 0 for m in self.lr_mults):
            raise ConfigError("batch sizes and LR multipliers must be > 0")
        if not 0 < self.target_acc <= 1:
            raise ConfigError(f"--target-acc {self.target_acc}: allowed: > 0 and <= 1")
        if (self.budget_epochs <= 0 or self.budget_steps < 0 or self.eval_examples < 1 or self.extend < 0
                or self.tol < 1):
            raise ConfigError("need --budget-epochs > 0, --budget-steps >= 0, --eval-examples >= 1, --extend >= 0, "
                              "--tol >= 1")
        if self.horizons and (any(h <= 0 for h in self.horizons) or len(set(self.horizons)) < len(self.horizons)):
            raise ConfigError(f"--horizons {','.join(f'{h:g}' for h in self.horizons)}: must be > 0 and distinct")
        decaying = self.base["recipe"]["schedule"] != "constant"
        for flag, value in (("--horizons", self.horizons), ("--horizon-range", self.horizon_range)):
            if value and not decaying:
                raise ConfigError(f"{flag} needs a decaying LR (--set recipe.schedule=cosine, step, poly...); with "
                                  "recipe.schedule=constant a longer budget only adds steps")
        if self.search not in SEARCHES:
            raise ConfigError(f"--search {self.search!r}: allowed: {', '.join(SEARCHES)}")
        if self.search == "grid" and self.horizon_range:
            raise ConfigError("--horizon-range is a range for --search quasi-random; the grid search takes "
                              "--horizons E1,E2,...")
        if self.search == "quasi-random":
            if self.horizons:
                raise ConfigError("--horizons is the grid search's; with --search quasi-random give "
                                  "--horizon-range LO,HI")
            for flag, pair in (("--lr-range", self.lr_range), ("--horizon-range", self.horizon_range)):
                if pair and not (len(pair) == 2 and 0 < pair[0] <= pair[1]):
                    raise ConfigError(f"{flag} {','.join(f'{v:g}' for v in pair)}: expected LO,HI with "
                                      "0 < LO <= HI")
            if self.trials < 1:
                raise ConfigError(f"--trials {self.trials}: must be >= 1")
            if self.lr_range[0] == self.lr_range[1] and not self.horizon_range:
                raise ConfigError(f"--lr-range {self.lr_range[0]:g},{self.lr_range[1]:g} without --horizon-range: "
                                  "every trial would be the same; give LO < HI")
        self.batches = sorted(set(self.batches))
        self.lr_mults = sorted(set(self.lr_mults))

    def cells(self) -> list[tuple[str, int, float, float | None]]:
        """The (optimizer, batch, warm-up, horizon) cells, each with its own LR search (horizon None: no
        horizon search, the budget is ``budget_epochs``)."""
        return [(o, b, w, h) for o in self.optimizers for b in self.batches for i, w in enumerate(self.warmups)
                if i == 0 or b >= self.warmup_search_from for h in (self.horizons or [None])]

    def quasi_trials(self, cell: tuple[str, int, float, float | None]) -> list["Trial"]:
        """The quasi-random search's trials of ``cell``: the first ``trials`` points of a scrambled Sobol
        sequence (fixed seed, the same in every cell) mapped log-uniformly to the LR and horizon ranges."""
        opt, b, w, _ = cell
        ranges = [self.lr_range] + ([self.horizon_range] if self.horizon_range else [])
        out = []
        for i, row in enumerate(_sobol(self.trials, len(ranges))):
            vals = [float(f"{lo * (hi / lo) ** x:.4g}") for (lo, hi), x in zip(ranges, row)]
            m, h = vals[0], (vals[1] if self.horizon_range else None)
            out.append(Trial(opt, b, w, m, self.guess(opt).at(b) * m, h, index=i))
        return out

    def guess(self, opt: str) -> LRGuess:
        return LRGuess(**self.guesses[opt])

    def budget(self, batch: int, n_train: int, horizon: float | None = None) -> int:
        """A trial's budget in steps at ``batch`` with ``n_train`` training examples: the larger of
        ``horizon`` (or, without one, ``budget_epochs``) epochs, counted as the trainer counts them,
        ``round(epochs * (n_train // batch))``, and ``budget_steps``."""
        epochs = self.budget_epochs if horizon is None else horizon
        return max(1, round(epochs * (n_train // batch)), self.budget_steps)

    def eval_every(self, batch: int) -> int:
        return max(1, round(self.eval_examples / batch))


@dataclass(frozen=True)
class Trial:
    optimizer: str
    batch: int
    warmup: float
    mult: float
    lr: float
    horizon: float | None = None
    index: int | None = None  # the quasi-random search's point number (None: a grid trial)

    @property
    def id(self) -> str:
        if self.index is not None:
            return f"{self.optimizer}-b{self.batch}-w{self.warmup:g}-q{self.index}"
        h = "" if self.horizon is None else f"-h{self.horizon:g}"
        return f"{self.optimizer}-b{self.batch}-w{self.warmup:g}{h}-x{self.mult:g}"

    @property
    def cell(self) -> tuple[str, int, float, float | None]:
        return cell_of(asdict(self))


def cell_of(r: dict[str, Any]) -> tuple[str, int, float, float | None]:
    """The search cell of a trial (or its result): a grid trial's horizon is part of its cell, a quasi-random
    trial's is one of its searched values."""
    return r["optimizer"], r["batch"], r["warmup"], None if r.get("index") is not None else r.get("horizon")


def trial_config(spec: SweepSpec, trial: Trial, cap: int | None, budget: int) -> dict[str, Any]:
    """The full config dict of one trial (the base with the trial's fields set): an LR schedule of ``budget``
    steps, run to its end or stopped at ``cap`` (the pruning limit) if that is fewer."""
    from scalelab.config import from_dict

    d = json.loads(json.dumps(spec.base))
    d["recipe"].update(optimizer=trial.optimizer, base_lr=trial.lr, scaling="none",
                       warmup_epochs=trial.warmup)
    if trial.optimizer == "sgd" and d["recipe"]["momentum"] == 0:
        d["recipe"]["nesterov"] = False
    epochs = spec.budget_epochs if trial.horizon is None else trial.horizon
    d["train"].update(batch_size=trial.batch, target_acc=spec.target_acc, epochs=epochs,
                      max_steps=min(cap, budget) if cap else budget, schedule_steps=budget,
                      eval_every=spec.eval_every(trial.batch),
                      threads=1, progress=False, name=trial.id)
    from_dict(d)  # validate here, in the parent, so a bad combination fails before any process starts
    return d


# ---- one trial, in a worker process ------------------------------------------------------------------------------
_DATA_CACHE: dict[str, Any] = {}


def run_trial(trial: Trial, cfg_dict: dict[str, Any], cap: int | None, budget: int, out: str) -> dict[str, Any]:
    """Train one trial and write its result atomically to ``out/trials/<id>.json``; returns the result.

    ``cap`` is the pruning limit (None: none), ``budget`` the trial's step budget: a trial that stops at the
    pruning limit is ``pruned``, one that used its budget ``missed``.

    Runs in a worker process; the trainer's printed lines go to ``out/trials/<id>.log``.
    """
    from scalelab.config import from_dict
    from scalelab.data import load_dataset
    from scalelab.train import train

    tdir = Path(out) / "trials"
    limit = min(cap, budget) if cap else budget
    result: dict[str, Any] = {"id": trial.id, **asdict(trial), "cap": limit, "budget": budget, "status": "error",
                              "steps_to_target": None, "examples_to_target": None, "time_to_target_s": None,
                              "steps": None, "final_test_acc": None, "best_test_acc": None, "error": None}
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            cfg = from_dict(cfg_dict)
            key = json.dumps(cfg_dict["data"], sort_keys=True)
            if key not in _DATA_CACHE:
                _DATA_CACHE[key] = load_dataset(cfg.data)
            s = train(cfg, data=_DATA_CACHE[key])
            result.update(steps=s["steps"], final_test_acc=s["final_test_acc"], best_test_acc=s["best_test_acc"],
                          train_s=s["train_s"])
            if s["steps_to_target"] is not None:
                result.update(status="reached", steps_to_target=s["steps_to_target"],
                              examples_to_target=s["steps_to_target"] * trial.batch,
                              time_to_target_s=s["time_to_target_s"])
            else:
                result["status"] = "pruned" if limit < budget and s["steps"] >= limit else "missed"
        except DivergenceError as e:
            result.update(status="diverged", error=str(e))
        except Exception as e:  # a trial's failure is a result of the sweep; the traceback goes to its log
            traceback.print_exc()
            result.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
    result["wall_s"] = time.perf_counter() - t0
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / f"{trial.id}.log").write_text(log.getvalue())
    _write_json_atomic(tdir / f"{trial.id}.json", result)
    return result


class _InlineExecutor:
    """``--jobs 1``: trials run one after another in this process (no start-up cost of a worker process)."""

    def submit(self, fn, *args) -> cf.Future:
        fut: cf.Future = cf.Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _worker_init() -> None:
    """Trial workers die with the sweep process (Linux ``PR_SET_PDEATHSIG``), so a killed sweep leaves none."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- the search ----------------------------------------------------------------------------------------------------
def _reached(r: dict[str, Any]) -> bool:
    return r.get("status") == "reached"


def best_of(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest trial that reached the target (ties: the smaller LR), or None."""
    ok = [r for r in results if _reached(r)]
    return min(ok, key=lambda r: (r["steps_to_target"], r["lr"])) if ok else None


def made_progress(spec: SweepSpec, r: dict[str, Any], chance: float) -> bool:
    """Whether a trial got at least half-way from chance accuracy to the target (a trial that stayed near chance
    says nothing about which way the good LRs lie)."""
    acc = r.get("best_test_acc")
    return acc is not None and acc >= chance + 0.5 * (spec.target_acc - chance)


def next_mults(spec: SweepSpec, done: list[dict[str, Any]], running: set[float],
               chance: float = 0.0) -> list[float]:
    """The LR multipliers a cell should try next, given its finished trials and those still running.

    ``chance``: the accuracy of guessing (1 / classes), for the rule on cells where no trial made progress."""
    grid = spec.lr_mults
    center = grid[(len(grid) - 1) // 2] if 1.0 not in grid else 1.0
    tried = {r["mult"] for r in done} | running
    if center not in {r["mult"] for r in done}:
        return [] if center in running else [center]
    rest = [m for m in grid if m not in tried]
    if rest or running:
        return rest
    lo, hi = min(tried), max(tried)
    step_lo = grid[1] / grid[0] if len(grid) > 1 else 2.0
    step_hi = grid[-1] / grid[-2] if len(grid) > 1 else 2.0
    n_lo = sum(m < grid[0] for m in tried)
    n_hi = sum(m > grid[-1] for m in tried)
    best = best_of(done)
    if best is None:
        # nothing reached the target: go lower if everything diverged, else towards the edge point with the
        # best accuracy (when an edge has it), as the optimum may lie outside the grid
        if all(r["status"] == "diverged" for r in done):
            return [lo / step_lo] if n_lo < spec.extend else []
        if not any(made_progress(spec, r, chance) for r in done):
            # every trial stayed near chance: the best of them is noise, not a direction, so look both ways
            # (e.g. momentum SGD at batch 4096 with the linear rule's LRs, which all need a far lower LR)
            return ([lo / step_lo] if n_lo < spec.extend else []) + ([hi * step_hi] if n_hi < spec.extend else [])
        top = max((r for r in done if r.get("best_test_acc") is not None), key=lambda r: r["best_test_acc"],
                  default=None)
        if top is not None and top["mult"] == lo and n_lo < spec.extend and len(tried) > 1:
            return [lo / step_lo]
        if top is not None and top["mult"] == hi and n_hi < spec.extend and len(tried) > 1:
            return [hi * step_hi]
        return []
    # go further out only when the edge point is strictly faster than every point inside it (a tie at the
    # evaluation resolution says nothing about which side the optimum is on)
    def strictly_best(m: float) -> bool:
        others = [r["steps_to_target"] for r in done if _reached(r) and r["mult"] != m]
        mine = [r["steps_to_target"] for r in done if _reached(r) and r["mult"] == m]
        return bool(mine) and (not others or min(mine) < min(others))

    out = []
    if strictly_best(hi) and n_hi < spec.extend and len(tried) > 1:
        out.append(hi * step_hi)
    if strictly_best(lo) and n_lo < spec.extend and len(tried) > 1:
        out.append(lo / step_lo)
    return out


def next_trials(spec: SweepSpec, cell: tuple[str, int, float, float | None], done: list[dict[str, Any]],
                running: list[Trial], chance: float = 0.0) -> list[Trial]:
    """The trials ``cell`` should run next, given its finished trials and those still running: the grid
    search's next LR multipliers (:func:`next_mults`), or the quasi-random points not yet run."""
    if spec.search == "quasi-random":
        taken = {r["id"] for r in done} | {t.id for t in running}
        return [t for t in spec.quasi_trials(cell) if t.id not in taken]
    opt, b, w, h = cell
    return [Trial(opt, b, w, m, spec.guess(opt).at(b) * m, h)
            for m in next_mults(spec, done, {t.mult for t in running}, chance)]


def load_trials(out: Path) -> dict[str, dict[str, Any]]:
    """Finished trials in ``out/trials`` by id (a torn or unreadable file is ignored and its trial re-run)."""
    found = {}
    for p in sorted((out / "trials").glob("*.json")):
        try:
            r = json.loads(p.read_text())
            found[r["id"]] = r
        except (json.JSONDecodeError, KeyError, OSError):
            continue
    return found


def _check_spec(spec: SweepSpec, out: Path) -> None:
    path = out / "sweep_spec.json"
    mine = json.loads(json.dumps(asdict(spec)))
    if path.exists():
        theirs = json.loads(path.read_text())
        # config keys added to scalelab since the sweep started (with their defaults) do not stop a resume
        for sec, table in mine["base"].items():
            for k in set(table) - set(theirs.get("base", {}).get(sec, {})):
                theirs.setdefault("base", {}).setdefault(sec, {})[k] = table[k]
        # ... nor do sweep settings added since, when this sweep leaves them at their defaults
        for k, f in SweepSpec.__dataclass_fields__.items():
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if k not in theirs and default is not MISSING and mine[k] == default:
                theirs[k] = mine[k]
        if theirs != mine:
            keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ConfigError(f"--out {out} holds a sweep with other settings ({', '.join(keys)} differ); "
                              f"rerun with the same arguments to resume it, or choose another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, mine)


def run_sweep(spec: SweepSpec, out: str | Path, jobs: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a sweep in ``out``; returns the summary also written to ``out/sweep.json``.

    Args:
        spec: what to sweep.
        out: the sweep directory; finished trials in it are not run again.
        jobs: worker processes (0 = the number of cores).
        progress: show a progress bar over all trials.
    """
    from tqdm import tqdm

    from scalelab.config import from_dict
    from scalelab.data import load_dataset

    out = Path(out)
    _check_spec(spec, out)
    jobs = jobs or os.cpu_count() or 1
    # generate/cache the data once, here, not in every worker; its size sets the budgets in epochs
    data = load_dataset(from_dict(spec.base).data)
    n_train, chance = len(data.y_train), 1.0 / data.num_classes
    del data
    done = load_trials(out)
    cells = spec.cells()
    by_cell: dict[tuple, list[dict]] = {c: [] for c in cells}
    for r in done.values():
        if cell_of(r) in by_cell:
            by_cell[cell_of(r)].append(r)
    resumed = len(done)
    per_cell = spec.trials if spec.search == "quasi-random" else len(spec.lr_mults)
    bar = tqdm(total=len(cells) * per_cell, initial=resumed, desc="sweep", unit="trial",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    running: dict[cf.Future, Trial] = {}
    t_start = time.perf_counter()
    ctx = mp.get_context("spawn")
    ex = (cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) if jobs > 1
          else _InlineExecutor())
    try:
        while True:
            ready = []
            for cell in cells:
                busy = [t for t in running.values() if t.cell == cell]
                # resumed trials are skipped: their results are already in by_cell
                ready += [t for t in next_trials(spec, cell, by_cell[cell], busy, chance) if t.id not in done]
            # longest trials first (large batch), a grid's centre points before the rest (they set the pruning
            # cap); a quasi-random cell's in the sequence's order
            ready.sort(key=lambda t: (-t.batch, t.mult != 1.0 and t.index is None))
            bar.total = max(bar.total, len(done) + len(running) + len(ready))
            while ready and len(running) < jobs:
                t = ready.pop(0)
                best = best_of(by_cell[t.cell])
                cap = best["steps_to_target"] if best is not None else None
                budget = spec.budget(t.batch, n_train, t.horizon)
                running[ex.submit(run_trial, t, trial_config(spec, t, cap, budget), cap, budget, str(out))] = t
            if not running:
                break
            finished, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                t = running.pop(fut)
                try:
                    r = fut.result()
                except Exception as e:  # the worker process died (killed, out of memory): record and go on
                    r = {"id": t.id, **asdict(t), "cap": None, "budget": None, "status": "error",
                         "steps_to_target": None,
                         "error": f"worker died: {type(e).__name__}: {e}"[:300]}
                    (out / "trials").mkdir(exist_ok=True)
                    _write_json_atomic(out / "trials" / f"{t.id}.json", r)
                done[t.id] = r
                by_cell[t.cell].append(r)
                bar.update(1)
                n_ok = sum(_reached(x) for x in done.values())
                bar.set_postfix(reached=f"{n_ok}/{len(done)}", last=f"{t.id}:{r['status']}", refresh=False)
    except KeyboardInterrupt:
        ex.shutdown(wait=False, cancel_futures=True)
        for p in list(getattr(ex, "_processes", {}).values()):
            p.terminate()
        bar.close()
        raise
    ex.shutdown(wait=True)
    bar.close()
    summary = summarize(spec, list(done.values()))
    summary["wall_s_this_session"] = time.perf_counter() - t_start
    summary["resumed_trials"] = resumed
    write_outputs(spec, summary, out)
    return summary


# ---- results ---------------------------------------------------------------------------------------------------------
def summarize(spec: SweepSpec, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Best trial per (optimizer, batch) over LRs and warm-ups, the knee of each optimizer and a McCandlish fit."""
    from scalelab.lab.knee import find_knee, fit_mccandlish

    trials = sorted(trials, key=lambda r: (r["optimizer"], r["batch"], r["warmup"], r.get("horizon") or 0,
                                           r["mult"]))
    best_rows, knees, curves = [], {}, {}
    for opt in spec.optimizers:
        steps = []
        for b in spec.batches:
            cell = [r for r in trials if r["optimizer"] == opt and r["batch"] == b]
            best = best_of(cell)
            statuses = {s: sum(r["status"] == s for r in cell) for s in ("reached",) + FAILED}
            budgets = [r["budget"] for r in cell if r.get("budget")]
            row = {"batch": b, "optimizer": opt, "steps_to_target": None, "examples_to_target": None,
                   "time_to_target_s": None, "lr": None, "warmup": None, "horizon": None, "trials": len(cell),
                   "budget": max(budgets) if budgets else None,
                   **{f"n_{k}": v for k, v in statuses.items()}}
            if best is not None:
                # reached at the first evaluation: only an upper bound, as coarse as the interval
                row["first_eval"] = best["steps_to_target"] <= spec.eval_every(b)
                row.update(steps_to_target=best["steps_to_target"], examples_to_target=best["examples_to_target"],
                           time_to_target_s=best["time_to_target_s"], lr=best["lr"], warmup=best["warmup"],
                           horizon=best.get("horizon"),
                           edge=best["mult"] in (min(r["mult"] for r in cell), max(r["mult"] for r in cell))
                           and len(cell) > 1)
            best_rows.append(row)
            steps.append(row["steps_to_target"])
        knee = find_knee(spec.batches, steps, spec.tol)
        fit = fit_mccandlish(spec.batches, steps)
        knees[opt] = {**knee.to_dict(),
                      "mccandlish_b_noise": fit[0] if fit else None, "mccandlish_s_min": fit[1] if fit else None}
        curves[opt] = steps
    # the common reference: the fewest steps any optimizer needed at the smallest batch any of them reached
    firsts = [(b, s) for steps in curves.values() for b, s in zip(spec.batches, steps) if s is not None]
    if firsts:
        b0 = min(b for b, _ in firsts)
        ref = (b0, min(s for b, s in firsts if b == b0))
        for opt, steps in curves.items():
            common = find_knee(spec.batches, steps, spec.tol, ref=ref).to_dict()
            knees[opt]["common"] = {k: common[k] for k in ("batch", "ref_batch", "ref_steps", "first_off", "ratios")}
    best_ids = set()
    for row in best_rows:
        cell = [r for r in trials if r["optimizer"] == row["optimizer"] and r["batch"] == row["batch"]]
        b = best_of(cell)
        if b is not None:
            best_ids.add(b["id"])
    for r in trials:
        r["best"] = r["id"] in best_ids
    return {"spec": asdict(spec), "trials": trials, "best": best_rows, "knees": knees,
            "counts": {s: sum(r["status"] == s for r in trials) for s in ("reached",) + FAILED}}


CSV_COLUMNS = ["batch", "optimizer", "steps_to_target", "lr", "mult", "warmup", "horizon", "status", "best",
               "examples_to_target", "time_to_target_s", "steps", "cap", "budget", "final_test_acc", "best_test_acc",
               "wall_s", "id", "error"]
BEST_COLUMNS = ["batch", "optimizer", "steps_to_target", "steps", "examples_to_target", "time_to_target_s", "lr",
                "warmup", "horizon", "budget", "trials", "n_reached", "n_diverged", "n_missed", "n_pruned", "n_error"]


def write_outputs(spec: SweepSpec, summary: dict[str, Any], out: Path) -> list[Path]:
    """``sweep.json``, the CSV tables and the plots."""
    _write_json_atomic(out / "sweep.json", summary)
    write_tables(summary, out)
    from scalelab.lab.sweep_plots import plot_sweep

    return plot_sweep(summary, out / "plots")


def write_tables(summary: dict[str, Any], out: Path) -> None:
    """``sweep.csv`` (every trial), ``best.csv`` (best per optimizer and batch) and, per optimizer,
    ``steps_<optimizer>.csv`` with the columns ``batch,steps`` of the batches that reached the target: the
    format ``scalelab project --steps-table`` reads."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in summary["trials"]:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    (out / "sweep.csv").write_text(buf.getvalue())
    buf = io.StringIO()
    w = csv.DictWriter(buf, BEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in summary["best"]:
        w.writerow({k: ("" if (v := (r.get(k) if k != "steps" else r.get("steps_to_target"))) is None else v)
                    for k in BEST_COLUMNS})
    (out / "best.csv").write_text(buf.getvalue())
    for opt in summary["spec"]["optimizers"]:
        rows = [r for r in summary["best"] if r["optimizer"] == opt and r["steps_to_target"] is not None]
        (out / f"steps_{opt}.csv").write_text("batch,steps\n" + "".join(
            f"{r['batch']},{r['steps_to_target']}\n" for r in rows))


def format_table(summary: dict[str, Any]) -> str:
    """Steps-to-target per batch (rows) and optimizer (columns), then each optimizer's knee."""
    opts = summary["spec"]["optimizers"]
    lines = [f"{'batch':>7}  " + "  ".join(f"{o:>18}" for o in opts)]
    for b in summary["spec"]["batches"]:
        cells = []
        for o in opts:
            row = next(r for r in summary["best"] if r["batch"] == b and r["optimizer"] == o)
            s = row["steps_to_target"]
            cells.append(f"{s:>8} (lr {row['lr']:.3g})" if s is not None
                         else f"missed in {row['budget']}" if row.get("budget") else f"{'-':>8} {'(none)':>9}")
        lines.append(f"{b:>7}  " + "  ".join(f"{c:>18}" for c in cells))
    lines.append("")
    for o in opts:
        k = summary["knees"][o]
        fit = (f", McCandlish fit B_noise {k['mccandlish_b_noise']:.0f}" if k["mccandlish_b_noise"] else "")
        lines.append(f"{o}: knee at batch {k['batch']} (steps within {k['tol']:g}x of perfect scaling from batch "
                     f"{k['ref_batch']}; first batch off: {k['first_off']}){fit}")
        if k.get("common"):
            c = k["common"]
            lines.append(f"{o}: from the common reference ({c['ref_steps']} steps at batch {c['ref_batch']}, the "
                         f"fastest there): knee {c['batch']}, first batch off: {c['first_off']}")
    coarse = [r for r in summary["best"] if r.get("first_eval")]
    if coarse:
        cells = ", ".join(f"{r['optimizer']} at {r['batch']}" for r in coarse)
        lines.append(f"note: {cells} reached the target at the first evaluation: those steps are upper "
                     f"bounds at the evaluation interval (max(1, round(--eval-examples / B)) steps); a "
                     f"smaller --eval-examples resolves them")
    c = summary["counts"]
    lines.append("trials: " + ", ".join(f"{v} {k}" for k, v in c.items()))
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------------------
def parse_batches(text: str) -> list[int]:
    """``32,64,128`` or ``32..8192`` (powers of two between)."""
    try:
        if ".." in text:
            lo, hi = (int(x) for x in text.split(".."))
            if lo < 1 or hi < lo:
                raise ValueError
            out, b = [], lo
            while b <= hi:
                out.append(b)
                b *= 2
            return out
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--batch {text!r}: expected N,M,... or LO..HI (powers of two), e.g. 32..8192") from None


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected numbers separated by commas") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="base run config")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override a field of the base config; repeatable")
    p.add_argument("--batch", required=True, help="global batch sizes: N,M,... or LO..HI (powers of two)")
    p.add_argument("--target-acc", type=float, required=True, help="test-accuracy goal")
    p.add_argument("--optimizers", default="sgd", help="comma-separated recipe.optimizer names (default sgd)")
    p.add_argument("--lr-guess", action="append", default=[], metavar="OPT=LR@BATCH[:RULE]",
                   help="an LR that works for OPT at BATCH and the rule (linear, sqrt, none) to scale it; "
                        "default: the base config's base_lr@base_batch:scaling; repeatable")
    p.add_argument("--lr-mults", default="0.5,1,2", help="multipliers of the guess to try (default 0.5,1,2)")
    p.add_argument("--extend", type=int, default=2, help="extra LR points beyond each grid edge when the best "
                   "lies on it (default 2)")
    p.add_argument("--warmup-epochs", default=None, help="warm-up lengths to search, e.g. 0.5,2 (default: "
                   "the base config's)")
    p.add_argument("--warmup-search-from", type=int, default=0, metavar="BATCH", help="search the warm-ups "
                   "after the first only at batches >= BATCH (default 0: at every batch)")
    p.add_argument("--budget-epochs", type=float, default=30.0, help="epochs after which a trial is 'missed'")
    p.add_argument("--budget-steps", type=int, default=0, help="but at least this many steps: a trial's budget "
                   "is max(budget-epochs in steps, budget-steps), so large batches get steps enough (default 0)")
    p.add_argument("--horizons", default=None, metavar="E1,E2,...", help="with a decaying recipe.schedule: "
                   "budgets in epochs to search (each the LR schedule's length), instead of --budget-epochs")
    p.add_argument("--search", default="grid", choices=SEARCHES, help="grid: --lr-mults, extended at the edges "
                   "(default); quasi-random: --trials points in --lr-range (and --horizon-range), Shallue et al.")
    p.add_argument("--trials", type=int, default=None, help="quasi-random: trials per optimizer, batch and "
                   "warm-up (default 16)")
    p.add_argument("--lr-range", default=None, metavar="LO,HI", help="quasi-random: range of the multipliers "
                   "of the LR guess, log-uniform (default 0.25,4)")
    p.add_argument("--horizon-range", default=None, metavar="LO,HI", help="quasi-random with a decaying "
                   "recipe.schedule: range of the horizons in epochs, log-uniform (each the LR schedule's length)")
    p.add_argument("--eval-examples", type=int, default=2048, help="evaluate every max(1, round(this / B)) "
                   "steps (default 2048)")
    p.add_argument("--tol", type=float, default=1.25, help="knee tolerance over perfect scaling (default 1.25)")
    p.add_argument("--jobs", type=int, default=0, help="trial processes at a time (default: the cores)")
    p.add_argument("--out", metavar="DIR", help="sweep directory (default runs/sweep-<date>-<time>); "
                   "an existing one with the same settings is resumed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def spec_from_args(args) -> SweepSpec:
    from scalelab.config import load_config

    cfg = load_config(args.config, args.overrides)
    opts = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    from scalelab.config import RecipeConfig

    known = RecipeConfig.__dataclass_fields__["optimizer"].metadata["choices"]
    for o in opts:
        if o not in known:
            raise ConfigError(f"--optimizers: unknown optimizer {o!r}; known: {', '.join(known)}")
    guesses = {o: LRGuess(cfg.recipe.base_lr, cfg.recipe.base_batch, cfg.recipe.scaling) for o in opts}
    for item in args.lr_guess:
        opt, eq, rest = item.partition("=")
        if not eq or opt not in opts:
            raise ConfigError(f"--lr-guess {item!r}: expected OPT=LR@BATCH[:RULE] with OPT one of {', '.join(opts)}")
        guesses[opt] = LRGuess.parse(rest)
    quasi_only = [f for f, v in (("--trials", args.trials), ("--lr-range", args.lr_range)) if v is not None]
    if args.search == "grid" and quasi_only:
        raise ConfigError(f"{' and '.join(quasi_only)}: only with --search quasi-random (the grid search takes "
                          "--lr-mults)")
    warmups = _floats(args.warmup_epochs, "--warmup-epochs") if args.warmup_epochs else [cfg.recipe.warmup_epochs]
    if any(w < 0 for w in warmups) or len(set(warmups)) < len(warmups):
        raise ConfigError("--warmup-epochs must be >= 0 and distinct")
    if args.warmup_search_from < 0:
        raise ConfigError(f"--warmup-search-from {args.warmup_search_from}: must be >= 0")
    # the quasi-random settings only when given: otherwise SweepSpec's defaults
    quasi = {k: v for k, v in (("trials", args.trials),
                               ("lr_range", args.lr_range and _floats(args.lr_range, "--lr-range")))
             if v is not None}
    return SweepSpec(base=cfg.to_dict(), batches=parse_batches(args.batch), optimizers=opts,
                     target_acc=args.target_acc, guesses={o: asdict(g) for o, g in guesses.items()},
                     lr_mults=_floats(args.lr_mults, "--lr-mults"), warmups=warmups,
                     warmup_search_from=args.warmup_search_from, budget_epochs=args.budget_epochs,
                     budget_steps=args.budget_steps, eval_examples=args.eval_examples, extend=args.extend,
                     horizons=_floats(args.horizons, "--horizons") if args.horizons else [],
                     tol=args.tol, search=args.search, **quasi,
                     horizon_range=_floats(args.horizon_range, "--horizon-range") if args.horizon_range else [])


def run(args) -> int:
    import datetime as dt

    spec = spec_from_args(args)
    if args.jobs < 0:
        raise ConfigError(f"--jobs {args.jobs}: must be >= 0")
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{dt.datetime.now():%Y%m%d-%H%M%S}"
    try:
        summary = run_sweep(spec, out, args.jobs, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nscalelab: interrupted; finished trials are kept in {out}/trials; rerun the same command "
              f"to resume", file=sys.stderr)
        return 130
    print(format_table(summary))
    print(f"sweep directory: {out}  (scalelab report {out} writes report.html)")
    return 0

