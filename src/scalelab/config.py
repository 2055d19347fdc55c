"""Typed run configuration: dataclasses, TOML loading, ``--set`` overrides and validation.

A run is a :class:`Config`: one dataclass per concern (data, model, recipe, train, parallel). Every field has a
type, a default and, where it matters, the allowed range or choices in its metadata. ``load_config`` builds a
``Config`` from a TOML file and ``section.key=value`` overrides, and validates everything before any work is
done; a problem raises :class:`~scalelab.errors.ConfigError` with one line naming the key and what is allowed.

Example:
    >>> from scalelab.config import load_config
    >>> cfg = load_config(None, ["train.batch_size=512", "recipe.optimizer=lars"])
    >>> cfg.train.batch_size, cfg.recipe.optimizer
    (512, 'lars')
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from scalelab.errors import ConfigError


def _f(default, *, choices=None, lo=None, hi=None, lo_open=False, doc=""):
    """A dataclass field with validation metadata: allowed choices, or a numeric range [lo, hi]."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = _f("mnist1d", doc="dataset name (see scalelab.data.DATASETS)")
    n_train: int = _f(0, lo=0, doc="training samples; 0 = the dataset's default")
    n_test: int = _f(0, lo=0, doc="test samples; 0 = the dataset's default")
    root: str = _f("", doc="directory of MNIST/Fashion-MNIST/CIFAR-10 files, or the .npz file for 'npz'")
    cache_dir: str = _f("", doc="cache for generated data; '' = $SCALELAB_CACHE or ~/.cache/scalelab")
    seed: int = _f(42, lo=0, doc="seed of generated datasets (mnist1d, synthetic)")
    download: bool = _f(True, doc="download MNIST/CIFAR-10 when missing and the network allows")
    input_dim: int = _f(32, lo=1, doc="synthetic: input features")
    num_classes: int = _f(10, lo=2, doc="synthetic: classes")


@dataclass
class ModelConfig:
    name: str = _f("cnn1d", doc="model name (see scalelab.models.MODELS)")
    width: int = _f(0, lo=0, doc="hidden units (mlp) or first-stage channels; 0 = the model's default")
    depth: int = _f(0, lo=0, doc="hidden layers (mlp) or conv blocks (cnn1d, cnn2d); 0 = the model's default")
    norm: str = _f("bn", choices=("bn", "ghost", "none"), doc="normalisation layers")
    ghost_batch: int = _f(32, lo=1, doc="virtual batch size of ghost BN")
    zero_init_residual: bool = _f(True, doc="zero-init the last BN gamma of each residual block (Goyal)")


@dataclass
class RecipeConfig:
    optimizer: str = _f("sgd", choices=("sgd", "lars", "lamb", "rmsprop_warmup", "adamw", "kfac", "neumann"))
    base_lr: float = _f(0.2, lo=0.0, lo_open=True, doc="learning rate at base_batch")
    base_batch: int = _f(256, lo=1, doc="reference batch of base_lr for the scaling rule")
    scaling: str = _f("linear", choices=("none", "linear", "sqrt"), doc="LR scaling rule")
    warmup_epochs: float = _f(1.0, lo=0.0, doc="gradual warmup length")
    warmup_divisor: float = _f(0.0, lo=0.0, doc="warm up from lr/divisor; 0 = Goyal's k = max(1, B/base_batch)")
    schedule: str = _f("cosine", choices=("constant", "step", "cosine", "poly"), doc="decay after warmup")
    milestones: list[float] = _f([], doc="step schedule: epochs where the LR is multiplied by gamma")
    gamma: float = _f(0.1, lo=0.0, lo_open=True, hi=1.0)
    poly_power: float = _f(2.0, lo=0.0, lo_open=True)
    final_lr_frac: float = _f(0.0, lo=0.0, hi=1.0, doc="cosine/poly end LR as a fraction of the peak")
    momentum: float = _f(0.9, lo=0.0, hi=1.0)
    nesterov: bool = _f(True)
    weight_decay: float = _f(5e-4, lo=0.0)
    exclude_bn_bias: bool = _f(True, doc="no weight decay or trust ratio on biases and norm parameters")
    label_smoothing: float = _f(0.0, lo=0.0, hi=1.0)
    trust_coef: float = _f(0.001, lo=0.0, lo_open=True, doc="LARS trust coefficient eta")
    trust_eps: float = _f(0.0, lo=0.0, doc="LARS epsilon in the trust-ratio denominator")
    betas: list[float] = _f([0.9, 0.999], doc="LAMB/AdamW (beta1, beta2)")
    eps: float = _f(1e-6, lo=0.0, lo_open=True, doc="LAMB/AdamW/RMSprop epsilon")
    rms_decay: float = _f(0.99, lo=0.0, hi=1.0, doc="rmsprop_warmup: squared-gradient decay mu2")
    rms_lr_ratio: float = _f(0.03, lo=0.0, doc="rmsprop_warmup: eta_RMS / eta_SGD")
    rms_center_epochs: float = _f(10.0, lo=0.0, doc="rmsprop_warmup: beta_c")
    rms_period_epochs: float = _f(5.0, lo=0.0, lo_open=True, doc="rmsprop_warmup: beta_p")
    grad_clip: float = _f(0.0, lo=0.0, doc="clip the global gradient norm; 0 = off")
    batch_milestones: list[float] = _f([], doc="epochs where the global batch grows by batch_growth (Smith et al. "
                                               "2017: increase the batch instead of decaying the LR)")
    batch_growth: float = _f(5.0, lo=1.0, doc="factor of the global batch at each of batch_milestones")
    # second-order: K-FAC (recipe.optimizer=kfac is K-FAC + momentum SGD) and the Neumann optimizer
    precondition: str = _f("none", choices=("none", "kfac"), doc="K-FAC preconditioning for any optimizer")
    kfac_damping: float = _f(1e-3, lo=0.0, doc="K-FAC Tikhonov damping lambda")
    kfac_damping_decay_epochs: list[float] = _f([], doc="K-FAC: epochs where the damping is multiplied by "
                                                        "kfac_damping_decay")
    kfac_damping_decay: float = _f(0.5, lo=0.0, lo_open=True, hi=1.0)
    kfac_factor_decay: float = _f(0.95, lo=0.0, hi=0.9999, doc="K-FAC running average of the factors")
    kfac_factor_every: int = _f(10, lo=1, doc="K-FAC: update the factors every N steps")
    kfac_inverse_every: int = _f(10, lo=1, doc="K-FAC: recompute eigendecompositions/inverses every N steps")
    kfac_kl_clip: float = _f(1e-3, lo=0.0, doc="K-FAC KL clipping kappa; 0 = off")
    kfac_method: str = _f("inverse", choices=("eigen", "inverse"), doc="damped inverses (factored Tikhonov) "
                                                                       "or eigendecomposition")
    neumann_alpha: float = _f(1e-7, lo=0.0, doc="Neumann cubic regulariser alpha")
    neumann_beta: float = _f(1e-5, lo=0.0, doc="Neumann repulsive regulariser, per parameter (x their count)")
    neumann_gamma: float = _f(0.99, lo=0.0, hi=0.9999, doc="Neumann moving average of the weights")
    neumann_mu_max: float = _f(0.9, lo=0.0, hi=0.9999, doc="Neumann peak momentum")
    neumann_burnin_epochs: float = _f(5.0, lo=0.0, doc="Neumann: plain SGD for this many epochs first")
    neumann_reset_epochs: float = _f(10.0, lo=0.0, lo_open=True, doc="Neumann: first period K between "
                                                                       "momentum resets (doubles after each)")


@dataclass
class TrainConfig:
    name: str = _f("", doc="run name; '' = derived from dataset, model, optimizer and batch")
    batch_size: int = _f(256, lo=1, doc="global batch B over all workers")
    micro_batch: int = _f(0, lo=0, doc="largest share of the batch one worker puts through one forward/backward; "
                                       "larger shares accumulate gradients; 0 = no limit")
    epochs: float = _f(10.0, lo=0.0, lo_open=True)
    max_steps: int = _f(0, lo=0, doc="stop after this many steps; 0 = from epochs")
    schedule_steps: int = _f(0, lo=0, doc="the LR schedule's length in steps; 0 = the run's (max_steps, else "
                                          "epochs). With max_steps below it, a run stops part-way through its "
                                          "schedule, on the same trajectory as the full run")
    target_acc: float = _f(0.0, lo=0.0, hi=1.0, doc="stop at this test accuracy; 0 = train to the end")
    eval_every: int = _f(0, lo=0, doc="evaluate every N steps; 0 = every epoch")
    log_every: int = _f(20, lo=1, doc="log training metrics every N steps")
    checkpoint_every: int = _f(0, lo=0, doc="checkpoint every N steps; 0 = every epoch")
    keep_checkpoints: int = _f(3, lo=1)
    seed: int = _f(0, lo=0)
    on_nan: str = _f("stop", choices=("stop", "skip"), doc="on a NaN/inf loss: stop the run or skip the step")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    threads: int = _f(0, lo=0, doc="torch threads; 0 = all cores (with --nproc N: each worker's share)")
    dtype: str = _f("float32", choices=("float32", "float64"), doc="parameter and data dtype")
    eval_batch: int = _f(4096, lo=1)
    progress: bool = _f(True, doc="live progress bar")
    noise_every: int = _f(0, lo=0, doc="log the gradient noise scale every N steps (McCandlish 2018); 0 = off")
    noise_method: str = _f("auto", choices=("auto", "workers", "shards"),
                           doc="noise scale from: workers = each worker's gradient and the all-reduced one "
                               "of the training step (free; >= 2 workers); shards = a fresh batch in shards "
                               "(extra passes); auto = workers where possible")
    noise_shards: int = _f(8, lo=2, doc="noise scale, shards method: shards of the batch that give the "
                                        "small-batch gradients")


@dataclass
class ParallelConfig:
    emulate_workers: int = _f(1, lo=1, doc="emulate K data-parallel workers in one process (BN per worker)")
    bn_group: int = _f(1, lo=0, doc="BN statistics over groups of this many workers (cross-replica BN); "
                                    "1 = per worker, 0 = all workers")
    backend: str = _f("auto", choices=("auto", "gloo", "nccl"), doc="auto: nccl on CUDA, gloo on CPU")
    timeout_s: float = _f(300.0, lo=1.0, doc="a collective waiting longer than this reports a hung worker")
    backup_workers: int = _f(0, lo=0, doc="of the N workers, average the first N - b gradients of each step and "
                                          "drop the b late ones (Chen et al. 2016)")
    resize: str = _f("keep_global", choices=("keep_global", "keep_worker"),
                     doc="when a restart changes the number of workers: keep the global batch (shares and "
                         "gradient accumulation change) or keep each worker's share (the LR rule re-applies)")
    mode: str = _f("sync", choices=("sync", "async", "ssp", "hybrid", "localsgd"),
                   doc="sync: all-reduce every step; async/ssp/hybrid: parameter server; localsgd: periodic "
                       "model averaging (see docs/async.md)")
    servers: int = _f(1, lo=1, doc="async/ssp/hybrid: parameter-server ranks (the first ones), parameters "
                                   "sharded over them")
    staleness_bound: int = _f(2, lo=0, doc="ssp: no worker runs more than s clocks ahead of the slowest")
    staleness_lr: bool = _f(False, doc="async/ssp/hybrid: divide the LR of each gradient by its staleness "
                                       "(Zhang et al. 2016)")
    group_size: int = _f(2, lo=1, doc="hybrid: workers per synchronous group (all-reduce inside, async across)")
    local_period: int = _f(4, lo=1, doc="localsgd: average the models every H local steps")
    local_start_step: int = _f(0, lo=0, doc="localsgd: synchronous SGD before this step, local SGD after "
                                            "(post-local SGD); 0 = local from the start")
    rejoin: int = _f(3, lo=0, doc="async/ssp/hybrid: times a dead worker is restarted to rejoin the job "
                                  "(hybrid: with its group)")


@dataclass
class StragglersConfig:
    dist: str = _f("none", choices=("none", "fixed", "exp", "pareto"), doc="per-step delay of workers")
    rank: int = _f(-1, lo=-1, doc="fixed: the slow rank")
    delay_s: float = _f(0.05, lo=0.0, doc="fixed: the delay; exp: its mean; pareto: its scale (minimum)")
    prob: float = _f(1.0, lo=0.0, hi=1.0, doc="exp/pareto: probability that a worker is delayed at a step")
    shape: float = _f(1.5, lo=0.0, lo_open=True, doc="pareto: tail index (smaller = heavier tail)")
    seed: int = _f(0, lo=0)


@dataclass
class FaultsConfig:
    kill_rank: int = _f(-1, lo=-1, doc="for tests and demos: SIGKILL this rank at kill_step (first attempt only)")
    kill_step: int = _f(0, lo=0)
    hang_rank: int = _f(-1, lo=-1, doc="for tests and demos: this rank stops responding at hang_step")
    hang_step: int = _f(0, lo=0)


@dataclass
class CompressConfig:
    method: str = _f("none", choices=("none", "dgc", "topk", "randomk", "signsgd", "efsign", "qsgd", "terngrad",
                                      "powersgd", "fp16", "bf16"),
                     doc="gradient compression as a DDP comm hook (see scalelab.compress); none = plain all-reduce")
    density: float = _f(0.001, lo=0.0, lo_open=True, hi=1.0, doc="dgc/topk/randomk: fraction of entries sent")
    warmup_steps: int = _f(0, lo=0, doc="plain all-reduce for the first N steps (powersgd: at least 2)")
    error_feedback: bool = _f(True, doc="topk/randomk: keep what was not sent and add it next step")
    dgc_warmup_epochs: float = _f(0.0, lo=0.0, doc="dgc: sparsity warm-up 75%, 93.75%, 98.4%, 99.6% over "
                                                   "these epochs, then 1 - density; 0 = off")
    dgc_clip: float = _f(0.0, lo=0.0, doc="dgc: local gradient clipping, each worker clips the norm of its whole "
                                          "gradient to dgc_clip / sqrt(N); 0 = off")
    dgc_min_entries: int = _f(0, lo=0, doc="dgc: each compressed tensor sends at least this many entries per "
                                           "step (all of a smaller one); 0 = density for every tensor (paper)")
    dgc_lr_weighted: bool = _f(False, doc="dgc: accumulate lr * velocity in v and divide the sent values by the "
                                          "current lr, so that a delayed entry is applied with the LR of the steps "
                                          "it came from (Stich et al. 2018); false = the paper (LR at sending)")
    dgc_sample: float = _f(0.01, lo=0.0, lo_open=True, hi=1.0, doc="dgc: fraction sampled to find the threshold")
    min_numel: int = _f(1024, lo=0, doc="tensors smaller than this (and 1-D ones) are all-reduced densely "
                                        "(all methods but powersgd, fp16, bf16)")
    qsgd_levels: int = _f(16, lo=1, hi=127, doc="qsgd: quantization levels s")
    powersgd_rank: int = _f(2, lo=1, doc="powersgd: rank r of the approximation")
    alpha_s: float = _f(5e-5, lo=0.0, doc="cost model: latency per message (s)")
    link_gbit: float = _f(1.0, lo=0.0, lo_open=True, doc="cost model: link bandwidth (Gbit/s)")
    log_every: int = _f(0, lo=0, doc="log compression stats (kind 'compress') every N steps; 0 = train.log_every")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stragglers: StragglersConfig = field(default_factory=StragglersConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def run_name(self) -> str:
        if self.train.name:
            return self.train.name
        return f"{self.data.name}-{self.model.name}-{self.recipe.optimizer}-b{self.train.batch_size}"


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "recipe": RecipeConfig, "train": TrainConfig,
            "parallel": ParallelConfig, "stragglers": StragglersConfig, "faults": FaultsConfig,
            "compress": CompressConfig}


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, "a list of numbers")


def _coerce(key: str, tp, value):
    """Check (and where lossless, convert) one value against its annotated type."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # from --set: "1,2,3" or "[1, 2, 3]"
            text = value.strip().strip("[]").strip()
            value = [v for v in (s.strip() for s in text.split(",")) if v] if text else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, item_tp, v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _check_range(key: str, meta: dict, value) -> None:
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(choices)}")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}: {v!r} is not a finite number")
        if lo is not None and (v < lo or (meta.get("lo_open") and v == lo)):
            bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
            rng = f"{bound} and <= {hi}" if hi is not None else bound
            raise ConfigError(f"{key}: {v!r} is out of range; allowed: {rng}")
        if hi is not None and v > hi:
            raise ConfigError(f"{key}: {v!r} is out of range; allowed: <= {hi}")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata) for f in dataclasses.fields(cls)}


def apply(cfg: Config, section: str, key: str, value, *, where: str = "") -> None:
    """Set ``section.key = value`` on ``cfg`` after checking the key, the type and the range."""
    full = f"{section}.{key}"
    if section not in SECTIONS:
        raise ConfigError(f"{where}unknown config section {section!r}; known: {', '.join(SECTIONS)}")
    fields = _field_types(SECTIONS[section])
    if key not in fields:
        raise ConfigError(f"{where}unknown config key {full!r}; keys of [{section}]: {', '.join(fields)}")
    tp, meta = fields[key]
    value = _coerce(f"{where}{full}", tp, value)
    _check_range(f"{where}{full}", meta, value)
    setattr(getattr(cfg, section), key, value)


def _validate_cross(cfg: Config) -> None:
    """Checks that involve more than one field."""
    t, p, r = cfg.train, cfg.parallel, cfg.recipe
    if t.batch_size % p.emulate_workers:
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by parallel.emulate_workers="
                          f"{p.emulate_workers}; each worker takes B/K samples")
    if cfg.model.norm == "ghost" and (t.batch_size // p.emulate_workers) % cfg.model.ghost_batch:
        raise ConfigError(f"model.ghost_batch: {cfg.model.ghost_batch} must divide the per-worker batch "
                          f"{t.batch_size // p.emulate_workers}")
    if p.bn_group > 1 and p.emulate_workers > 1 and p.emulate_workers % p.bn_group:
        raise ConfigError(f"parallel.bn_group: {p.bn_group} must divide parallel.emulate_workers="
                          f"{p.emulate_workers}")
    if p.bn_group != 1 and cfg.model.norm == "ghost":
        raise ConfigError("parallel.bn_group: cross-replica BN and ghost BN (model.norm=ghost) do not combine; "
                          "choose one")
    if p.mode != "sync" and p.backup_workers:
        raise ConfigError(f"parallel.backup_workers: backup workers are a form of sync training; with "
                          f"parallel.mode={p.mode} leave it at 0")
    if p.mode != "sync":
        unsupported = [k for k, on in (("train.micro_batch", t.micro_batch), ("recipe.batch_milestones",
                       r.batch_milestones), ("compress.method", cfg.compress.method != "none"),
                       ("recipe.precondition", r.precondition != "none" or r.optimizer == "kfac"),
                       ("train.noise_every", t.noise_every)) if on]
        if unsupported:
            raise ConfigError(f"{unsupported[0]}: built for parallel.mode=sync; parallel.mode={p.mode} does not "
                              f"support it (leave it at its default)")
    if p.mode != "sync" and p.emulate_workers > 1:
        raise ConfigError(f"parallel.emulate_workers: parallel.mode={p.mode} needs real workers (--nproc N); "
                          f"leave emulate_workers at 1")
    if len(r.betas) != 2 or not all(0.0 <= b < 1.0 for b in r.betas):
        raise ConfigError(f"recipe.betas: {r.betas!r}; allowed: two numbers in [0, 1)")
    if r.schedule == "step" and not r.milestones:
        raise ConfigError("recipe.milestones: the step schedule needs at least one epoch, e.g. [30, 60, 80]")
    if r.nesterov and r.momentum == 0 and r.optimizer in ("sgd", "kfac"):
        raise ConfigError("recipe.nesterov: Nesterov momentum needs recipe.momentum > 0; "
                          "set recipe.nesterov=false for plain SGD")
    if t.noise_every and t.noise_method != "workers" and t.batch_size % t.noise_shards:
        raise ConfigError(f"train.noise_shards: {t.noise_shards} must divide train.batch_size={t.batch_size}")
    cm = cfg.compress
    if cm.method == "powersgd" and cm.warmup_steps < 2:
        raise ConfigError("compress.warmup_steps: powersgd needs at least 2 plain all-reduce steps (torch's "
                          "error feedback and warm start), e.g. compress.warmup_steps=10")
    if cm.method == "dgc" and (r.optimizer != "sgd" or r.precondition != "none"):
        raise ConfigError(f"compress.method: dgc does the momentum itself (momentum correction) and needs "
                          f"recipe.optimizer=sgd without recipe.precondition, not {r.optimizer!r}"
                          + (f" with precondition={r.precondition!r}" if r.precondition != "none" else ""))
    if cm.method != "none" and p.backup_workers:
        raise ConfigError("compress.method: compression hooks need DDP; backup workers (parallel.backup_workers) "
                          "average gradients themselves; use one or the other")
    if sorted(r.milestones) != r.milestones:
        raise ConfigError(f"recipe.milestones: {r.milestones!r} must be increasing")
    if sorted(r.batch_milestones) != r.batch_milestones or any(m <= 0 for m in r.batch_milestones):
        raise ConfigError(f"recipe.batch_milestones: {r.batch_milestones!r} must be increasing epochs > 0")
    if p.emulate_workers > 1 and (t.micro_batch or r.batch_milestones):
        raise ConfigError("parallel.emulate_workers: emulation splits one forward pass into K workers; it does not "
                          "combine with train.micro_batch or recipe.batch_milestones")
    if sorted(r.kfac_damping_decay_epochs) != r.kfac_damping_decay_epochs:
        raise ConfigError(f"recipe.kfac_damping_decay_epochs: {r.kfac_damping_decay_epochs!r} must be increasing")
    if (r.optimizer == "kfac" or r.precondition == "kfac") and t.micro_batch:
        raise ConfigError("train.micro_batch: K-FAC's factors assume one forward/backward per step; it does not "
                          "combine with gradient accumulation (set train.micro_batch=0)")
    if (r.optimizer == "kfac" or r.precondition == "kfac") and p.backup_workers:
        raise ConfigError("parallel.backup_workers: K-FAC all-reduces its factors on every worker every step; "
                          "it does not combine with backup workers (set parallel.backup_workers=0)")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build and validate a :class:`Config` from an optional TOML file and ``section.key=value`` overrides.

    Raises:
        ConfigError: on an unreadable file, an unknown section or key, a wrong type or a value out of range.
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]; "
                                  f"known sections: {', '.join(SECTIONS)}")
            for key, value in table.items():
                apply(cfg, section, key, value, where=f"{path}: ")
    for item in overrides or []:
        lhs, eq, rhs = item.partition("=")
        section, dot, key = lhs.strip().partition(".")
        if not eq or not dot or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.batch_size=512")
        apply(cfg, section, key.strip(), rhs.strip())
    _validate_cross(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as TOML that :func:`load_config` reads back to an equal ``Config``."""
    Path(path).write_text(tomli_w.dumps(cfg.to_dict()))


def from_dict(d: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a validated ``Config`` from :meth:`Config.to_dict` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    for section, table in d.items():
        for key, value in table.items():
            apply(cfg, section, key, value)
    _validate_cross(cfg)
    return cfg


def diff(a: Config, b: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys ``section.key`` whose values differ between two configs, in declaration order."""
    out = []
    da, db = a.to_dict(), b.to_dict()
    for section in da:
        for key in da[section]:
            full = f"{section}.{key}"
            if full not in ignore and da[section][key] != db[section][key]:
                out.append(full)
    return out


def describe() -> str:
    """Every config key with its type, default and allowed values, for ``scalelab config``."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for name, (tp, meta) in _field_types(cls).items():
            default = getattr(cls(), name)
            allowed = ""
            if meta.get("choices"):
                allowed = f"  one of {', '.join(meta['choices'])}"
            doc = f"  # {meta['doc']}" if meta.get("doc") else ""
            lines.append(f"{name} = {default!r}{allowed}{doc}")
        lines.append("")
    return "\n".join(lines)

