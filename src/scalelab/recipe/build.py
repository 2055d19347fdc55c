"""Build the optimizer of a recipe from its config: a small registry from name to constructor."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from scalelab.config import RecipeConfig
from scalelab.errors import ConfigError, unknown_name
from scalelab.recipe.adamw import AdamW
from scalelab.recipe.kfac import kfac_optimizer, step_damping
from scalelab.recipe.lamb import LAMB
from scalelab.recipe.lars import LARS
from scalelab.recipe.neumann import Neumann
from scalelab.recipe.param_groups import param_groups
from scalelab.recipe.rmsprop_warmup import RMSpropWarmup
from scalelab.recipe.schedule import peak_lr
from scalelab.recipe.sgd import SGD

# name -> (param groups, cfg, initial lr, steps per epoch) -> optimizer
OPTIMIZERS: dict[str, Callable[[list, RecipeConfig, float, int], torch.optim.Optimizer]] = {
    "sgd": lambda groups, c, lr, spe: SGD(groups, lr=lr, momentum=c.momentum, nesterov=c.nesterov,
                                          weight_decay=c.weight_decay),
    "lars": lambda groups, c, lr, spe: LARS(groups, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                            trust_coef=c.trust_coef, eps=c.trust_eps),
    "lamb": lambda groups, c, lr, spe: LAMB(groups, lr=lr, betas=tuple(c.betas), eps=c.eps,
                                            weight_decay=c.weight_decay),
    "adamw": lambda groups, c, lr, spe: AdamW(groups, lr=lr, betas=tuple(c.betas), eps=c.eps,
                                              weight_decay=c.weight_decay),
    "rmsprop_warmup": lambda groups, c, lr, spe: RMSpropWarmup(
        groups, lr=lr, momentum=c.momentum, rms_decay=c.rms_decay, eps=c.eps, rms_lr_ratio=c.rms_lr_ratio,
        center_epochs=c.rms_center_epochs, period_epochs=c.rms_period_epochs, steps_per_epoch=spe,
        weight_decay=c.weight_decay),
    # K-FAC + momentum SGD: build_optimizer attaches the K-FAC preconditioner to this SGD
    "kfac": lambda groups, c, lr, spe: SGD(groups, lr=lr, momentum=c.momentum, nesterov=c.nesterov,
                                           weight_decay=c.weight_decay),
    "neumann": lambda groups, c, lr, spe: Neumann(
        groups, lr=lr, alpha=c.neumann_alpha, beta=c.neumann_beta * sum(p.numel() for g in groups
                                                                         for p in g["params"]),
        gamma=c.neumann_gamma, mu_max=c.neumann_mu_max, mu_steps=spe,
        burnin_steps=round(c.neumann_burnin_epochs * spe),
        reset_steps=max(1, round(c.neumann_reset_epochs * spe)),
        weight_decay=c.weight_decay),
}


def build_optimizer(cfg: RecipeConfig, model: nn.Module, steps_per_epoch: int,
                    global_batch: int | None = None) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``param_groups(model, cfg.weight_decay, cfg.exclude_bn_bias)``.

    The initial LR of every group is :func:`~scalelab.recipe.peak_lr` at ``global_batch`` (default
    ``cfg.base_batch``, i.e. ``cfg.base_lr``); the trainer overwrites it from the schedule before each step.
    ``steps_per_epoch`` is used by ``rmsprop_warmup``, ``neumann`` and the K-FAC damping schedule to turn
    epochs into steps. With ``cfg.optimizer == "kfac"`` or ``cfg.precondition == "kfac"`` the optimizer gets a
    K-FAC preconditioner of ``model``'s layers (:func:`~scalelab.recipe.kfac.kfac_optimizer`).

    Raises:
        ConfigError: on an unknown optimizer name.

    Example:
        >>> from torch import nn
        >>> from scalelab.config import RecipeConfig
        >>> opt = build_optimizer(RecipeConfig(optimizer="lars"), nn.Linear(4, 2), steps_per_epoch=10)
        >>> type(opt).__name__, [g["trust"] for g in opt.param_groups]
        ('LARS', [True, False])
    """
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(unknown_name("recipe.optimizer", cfg.optimizer, OPTIMIZERS))
    lr = peak_lr(cfg, cfg.base_batch if global_batch is None else global_batch)
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bn_bias)
    opt = OPTIMIZERS[cfg.optimizer](groups, cfg, lr, steps_per_epoch)
    if cfg.optimizer == "kfac" or cfg.precondition == "kfac":
        milestones = [round(e * steps_per_epoch) for e in cfg.kfac_damping_decay_epochs]
        damping = step_damping(cfg.kfac_damping, milestones, cfg.kfac_damping_decay)
        opt = kfac_optimizer(opt, model, damping=damping, factor_decay=cfg.kfac_factor_decay,
                             factor_every=cfg.kfac_factor_every, inverse_every=cfg.kfac_inverse_every,
                             kl_clip=cfg.kfac_kl_clip, method=cfg.kfac_method, log=print)
    return opt


def eval_weights(opt: torch.optim.Optimizer):
    """A context in which the model holds the weights to evaluate: ``opt.eval_weights()`` if the optimizer has
    one (Neumann: ``w - μ m``), else nothing changes."""
    return opt.eval_weights() if hasattr(opt, "eval_weights") else nullcontext()
