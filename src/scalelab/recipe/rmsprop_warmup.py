"""Akiba et al.'s RMSprop warm-up: a blend that moves from RMSprop to momentum SGD over the first epochs."""

from __future__ import annotations

import math

import torch

from scalelab.recipe.parts import (add_decayed_weights, ema_sq_, ensure_state, params_with_grads,
                                   run_closure)


def sgd_weight(epoch: float, center_epochs: float = 10.0, period_epochs: float = 5.0) -> float:
    """Weight ``a_sgd(e)`` of the SGD term in Akiba et al.'s blend (0.5 at ``center_epochs``, 1 at the end).

    With ``bc = center_epochs`` and ``bp = period_epochs``: ``0.5 * exp(2 (e - bc) / bp)`` for ``e < bc``;
    ``0.5 + (e - bc) / bp`` for ``e < bc + bp / 2``; 1 afterwards. The linear slope is ``1 / bp``, not the
    ``2 / bp`` of the transcription in ALGORITHMS.md: ``1 / bp`` matches the exponential's value and slope at
    ``bc`` and reaches exactly 1 at ``bc + bp / 2``, whereas ``2 / bp`` overshoots 1 and jumps back at the
    switch. The result is clamped to 1 for rounding safety.
    """
    bc, bp = center_epochs, period_epochs
    if epoch < bc:
        return 0.5 * math.exp(2.0 * (epoch - bc) / bp)
    if epoch < bc + bp / 2.0:
        return min(1.0, 0.5 + (epoch - bc) / bp)
    return 1.0


class RMSpropWarmup(torch.optim.Optimizer):
    """RMSprop warm-up (Akiba, Suzuki, Fukuda 2017): RMSprop early in training, momentum SGD later.

    Per parameter tensor, with ``g`` the gradient plus ``weight_decay * w`` and ``e`` the epoch
    (steps taken so far / ``steps_per_epoch``, so ``e = 0`` at the first step)::

        s <- mu2 * s + (1 - mu2) * g**2
        d <- mu1 * d - (a_sgd(e) + a_rms(e) / (sqrt(s) + eps)) * g
        w <- w + lr * d
        a_sgd(e) = see :func:`sgd_weight`,   a_rms(e) = (1 - a_sgd(e)) * rms_lr_ratio

    ``rms_lr_ratio`` is ``eta_RMS / eta_SGD`` (3e-4 / 0.01 in the Chainer reimplementation). The step count is
    kept per parameter in the optimizer state (like ``torch.optim.Adam``), so a resumed run continues the
    blend exactly; a parameter that skips steps (no gradient) lags behind in ``e``. The ``lr`` multiplies the
    whole velocity, so LR changes need no momentum correction. A ``trust`` key in a group has no effect.

    The algorithm is known from a transcription and a reimplementation, not the paper text (see
    ALGORITHMS.md section 4); the ``a_sgd`` slope of ``1 / period_epochs`` is this library's choice
    (continuous with the exponential piece), not the transcription's ``2 / period_epochs``.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate ``eta``, multiplying the velocity.
        momentum: ``mu1``.
        rms_decay: ``mu2``, the decay of the squared-gradient average ``s``.
        eps: added to ``sqrt(s)``.
        rms_lr_ratio: ``eta_RMS / eta_SGD``.
        center_epochs: ``beta_c``, the epoch where both terms weigh 0.5 (10 in the paper).
        period_epochs: ``beta_p``, the length scale of the transition (5 in the paper).
        steps_per_epoch: optimizer steps per epoch, to turn the step count into ``e``.
        weight_decay: L2 decay added to the gradient.

    Example:
        >>> import torch
        >>> from scalelab.recipe import RMSpropWarmup
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = RMSpropWarmup([w], lr=0.1, center_epochs=0.0, period_epochs=1.0, steps_per_epoch=1)
        >>> for _ in range(2):        # a_sgd(0) = 0.5: w = 1 - 0.1 * 1.15; a_sgd(1) = 1: w -= 0.1 * 3.035
        ...     w.grad = torch.tensor([2.0])
        ...     _ = opt.step()
        >>> round(w.item(), 4)
        0.5815

    References:
        Akiba, Suzuki, Fukuda. "Extremely Large Minibatch SGD: Training ResNet-50 on ImageNet in 15 Minutes",
        2017, arXiv 1711.04325.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, rms_decay: float = 0.99,
                 eps: float = 1e-8, rms_lr_ratio: float = 0.03, center_epochs: float = 10.0,
                 period_epochs: float = 5.0, steps_per_epoch: int = 1, weight_decay: float = 0.0):
        if lr < 0.0 or eps <= 0.0 or weight_decay < 0.0 or rms_lr_ratio < 0.0:
            raise ValueError(f"need lr >= 0, eps > 0, weight_decay >= 0, rms_lr_ratio >= 0; got {lr}, {eps}, "
                             f"{weight_decay}, {rms_lr_ratio}")
        if not (0.0 <= momentum <= 1.0 and 0.0 <= rms_decay <= 1.0):
            raise ValueError(f"momentum and rms_decay must be in [0, 1], got {momentum}, {rms_decay}")
        if period_epochs <= 0.0 or center_epochs < 0.0 or steps_per_epoch < 1:
            raise ValueError(f"need period_epochs > 0, center_epochs >= 0, steps_per_epoch >= 1; got "
                             f"{period_epochs}, {center_epochs}, {steps_per_epoch}")
        defaults = dict(lr=lr, momentum=momentum, rms_decay=rms_decay, eps=eps, rms_lr_ratio=rms_lr_ratio,
                        center_epochs=center_epochs, period_epochs=period_epochs,
                        steps_per_epoch=steps_per_epoch, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's loss if one is given."""
        loss = run_closure(closure)
        for group in self.param_groups:
            for p, g in params_with_grads(group, "RMSpropWarmup"):
                state = ensure_state(self.state[p], p, "square_avg", "velocity")
                epoch = state.get("step", 0) / group["steps_per_epoch"]
                state["step"] = state.get("step", 0) + 1
                a_sgd = sgd_weight(epoch, group["center_epochs"], group["period_epochs"])
                a_rms = (1.0 - a_sgd) * group["rms_lr_ratio"]
                g = add_decayed_weights(g, p, group["weight_decay"])
                s = ema_sq_(state["square_avg"], g, group["rms_decay"])
                # per-element step size a_sgd + a_rms / (sqrt(s) + eps)
                scale = s.sqrt().add_(group["eps"]).reciprocal_().mul_(a_rms).add_(a_sgd)
                d = state["velocity"].mul_(group["momentum"]).addcmul_(scale, g, value=-1.0)
                p.add_(d, alpha=group["lr"])
        return loss
