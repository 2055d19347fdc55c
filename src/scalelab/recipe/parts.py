"""Functional building blocks the scalelab optimizers are written with.

Each optimizer in :mod:`scalelab.recipe` is a ``torch.optim.Optimizer`` whose ``step`` is a short composition
of the functions below, in the spirit of optax's ``chain``: LARS is decayed weights + a trust ratio + momentum
with correction, LAMB is Adam moments + decayed weights + the same trust ratio, AdamW is Adam moments +
decoupled decay. Sharing the parts keeps the optimizers from drifting apart and makes each one testable
against its paper.

Conventions: functions ending in ``_`` update their first argument in place and return it; the others return a
new tensor. Everything stays on the parameter's device and dtype, and nothing calls ``.item()``, so a step
never waits for the device (the trust-ratio branches are ``torch.where``, not Python ``if``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "add_decayed_weights",
    "adam_direction",
    "decay_weights_",
    "ema_",
    "ema_sq_",
    "ensure_state",
    "lr_ratio",
    "momentum_",
    "params_with_grads",
    "run_closure",
    "trust_ratio",
]


# ---- weight decay ------------------------------------------------------------------------------------------

def add_decayed_weights(update: Tensor, param: Tensor, weight_decay: float) -> Tensor:
    """``update + weight_decay * param``: L2 ("coupled") decay added to a gradient or an update direction.

    SGD and LARS add it to the gradient; LAMB adds it to the Adam direction before the trust ratio. Returns
    ``update`` itself, not a copy, when ``weight_decay`` is 0, so callers must not modify the result in place.
    """
    return update.add(param, alpha=weight_decay) if weight_decay else update


def decay_weights_(param: Tensor, lr: float, weight_decay: float) -> Tensor:
    """Decoupled decay ``w <- (1 - lr * weight_decay) * w``, in place (Loshchilov & Hutter, 1711.05101)."""
    if weight_decay:
        param.mul_(1.0 - lr * weight_decay)
    return param


# ---- trust ratio (LARS, LAMB) ------------------------------------------------------------------------------

def trust_ratio(param_norm: Tensor, update_norm: Tensor, coef: float = 1.0,
                denominator: Tensor | None = None) -> Tensor:
    """Layer-wise trust ratio ``coef * ||w|| / denominator``; 1 where ``||w||`` or ``||update||`` is zero.

    Args:
        param_norm: ``||w||`` of one parameter tensor (a 0-d tensor).
        update_norm: ``||g||`` (LARS) or ``||u||`` (LAMB) of the same tensor; only its zero test is used when
            ``denominator`` is given.
        coef: trust coefficient: LARS's eta (0.001 in the paper), 1 for LAMB.
        denominator: defaults to ``update_norm``; LARS passes ``||g|| + wd * ||w|| + eps``.

    Returns:
        A 0-d tensor. A tensor that is all zeros (e.g. a zero-initialised layer), or that gets a zero gradient
        or update, falls back to ratio 1 instead of freezing or dividing by zero, as in tfa, optax and
        BERT-style LAMB.
    """
    denominator = update_norm if denominator is None else denominator
    ok = (param_norm > 0) & (update_norm > 0)
    # Both branches are evaluated; the discarded one may be inf/nan, which ``where`` drops (no autograd here).
    return torch.where(ok, coef * param_norm / denominator, torch.ones_like(param_norm))


# ---- momentum with Goyal's correction (SGD, LARS) ----------------------------------------------------------

def lr_ratio(lr: float, prev_lr: float | None, correction: bool = True) -> float:
    """Goyal et al.'s momentum correction factor ``lr_t / lr_{t-1}`` (arXiv 1706.02677, section 2.1).

    Returns 1 when the correction is off, on the first step (``prev_lr`` is None) and after a step at LR 0
    (the velocity is then already 0, so any factor gives the same result).
    """
    if not correction or not prev_lr:
        return 1.0
    return lr / prev_lr


def momentum_(velocity: Tensor, step: Tensor, momentum: float, ratio: float = 1.0) -> Tensor:
    """Heavy-ball velocity with the LR inside: ``v <- momentum * ratio * v + step``, in place.

    ``step`` already includes the learning rate (``lr * (g + wd * w)`` for SGD, ``lr * local * (...)`` for
    LARS), and ``ratio`` is :func:`lr_ratio`, which keeps ``v = lr * u`` for the reference form
    ``u <- m u + g`` under any LR schedule.
    """
    return velocity.mul_(momentum * ratio).add_(step)


# ---- Adam moments (LAMB, AdamW) ----------------------------------------------------------------------------

def ema_(avg: Tensor, x: Tensor, beta: float) -> Tensor:
    """Exponential moving average ``avg <- beta * avg + (1 - beta) * x``, in place (Adam's first moment)."""
    return avg.mul_(beta).add_(x, alpha=1.0 - beta)


def ema_sq_(avg: Tensor, x: Tensor, beta: float) -> Tensor:
    """``avg <- beta * avg + (1 - beta) * x**2``, in place (Adam's second moment, RMSprop's ``s``)."""
    return avg.mul_(beta).addcmul_(x, x, value=1.0 - beta)


def adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float, beta2: float, eps: float,
                   bias_correction: bool = True) -> Tensor:
    """Adam's update direction ``r = m_hat / (sqrt(v_hat) + eps)`` (Kingma & Ba, arXiv 1412.6980).

    ``step`` is the 1-based count of moment updates; with ``bias_correction``
    ``m_hat = m / (1 - beta1**step)`` and ``v_hat = v / (1 - beta2**step)``; otherwise the raw moments.
    """
    if bias_correction:
        bc1 = 1.0 - beta1 ** step
        bc2_sqrt = (1.0 - beta2 ** step) ** 0.5
        return (exp_avg / bc1).div_(exp_avg_sq.sqrt().div_(bc2_sqrt).add_(eps))
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


# ---- bookkeeping -------------------------------------------------------------------------------------------

def params_with_grads(group: dict[str, Any], name: str) -> Iterator[tuple[Tensor, Tensor]]:
    """``(param, grad)`` for the parameters of a group that have a gradient; ``None`` grads are skipped."""
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        yield p, p.grad


def ensure_state(state: dict[str, Any], param: Tensor, *names: str) -> dict[str, Any]:
    """Create zero buffers shaped like ``param`` (same dtype and device) for the missing ``names``."""
    for name in names:
        if name not in state:
            state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def run_closure(closure) -> Tensor | None:
    """The closure's loss, evaluated with gradients enabled (as ``Optimizer.step`` requires), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
