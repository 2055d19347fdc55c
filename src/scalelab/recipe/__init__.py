"""Large-batch training recipes: optimizers, LR scaling rules and schedules, parameter groups.

The optimizers are ``torch.optim.Optimizer`` subclasses written from the small functional parts in
:mod:`scalelab.recipe.parts` (trust ratio, momentum with correction, Adam moments, weight decay), so LARS and
LAMB share their trust ratio and SGD and LARS their momentum correction.

Example:
    >>> from torch import nn
    >>> from scalelab.config import RecipeConfig
    >>> from scalelab.recipe import build_optimizer, build_schedule
    >>> cfg = RecipeConfig(optimizer="sgd", base_lr=0.1, warmup_epochs=1, schedule="cosine")
    >>> opt = build_optimizer(cfg, nn.Linear(4, 2), steps_per_epoch=10)
    >>> sched = build_schedule(cfg, global_batch=1024, steps_per_epoch=10, total_steps=100)
    >>> for step in range(3):
    ...     for g in opt.param_groups:
    ...         g["lr"] = sched(step)
    ...     # loss.backward(); opt.step(); opt.zero_grad()
    >>> round(sched(10), 6)
    0.4
"""

from scalelab.recipe.adamw import AdamW
from scalelab.recipe.build import OPTIMIZERS, build_optimizer, eval_weights
from scalelab.recipe.kfac import KFAC, kfac_optimizer
from scalelab.recipe.lamb import LAMB
from scalelab.recipe.lars import LARS
from scalelab.recipe.neumann import Neumann
from scalelab.recipe.param_groups import param_groups
from scalelab.recipe.rmsprop_warmup import RMSpropWarmup, sgd_weight
from scalelab.recipe.schedule import SCALING_RULES, LRSchedule, build_schedule, peak_lr
from scalelab.recipe.sgd import SGD

__all__ = [
    "LAMB",
    "LARS",
    "OPTIMIZERS",
    "SCALING_RULES",
    "SGD",
    "AdamW",
    "KFAC",
    "Neumann",
    "LRSchedule",
    "RMSpropWarmup",
    "build_optimizer",
    "build_schedule",
    "eval_weights",
    "kfac_optimizer",
    "param_groups",
    "peak_lr",
    "sgd_weight",
]
