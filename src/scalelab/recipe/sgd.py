"""Momentum SGD in Goyal et al.'s velocity form, with their momentum correction."""

from __future__ import annotations

import torch

from scalelab.recipe.parts import (add_decayed_weights, ensure_state, lr_ratio, momentum_, params_with_grads,
                                    run_closure)


class SGD(torch.optim.Optimizer):
    """Momentum SGD with the learning rate inside the velocity and Goyal et al.'s momentum correction.

    Per parameter tensor, with ``d = g + wd * w``::

        v <- m * (lr_t / lr_{t-1}) * v + lr_t * d        # the LR ratio is the momentum correction
        w <- w - v                                       # heavy ball
        w <- w - (m * v + lr_t * d)                      # Nesterov, with the new v

    With ``momentum_correction=True`` the velocity stays ``v = lr_t * u`` for the reference form
    ``u <- m u + d, w <- w - lr_t u`` used by ``torch.optim.SGD``, so both give the same iterates under any
    LR schedule (up to rounding), including the Nesterov variant. With it off (ratio 1), a change of the LR
    only reaches the velocity gradually, which is what Goyal et al. warn about for large jumps in the LR.
    The LR of the previous step is kept per parameter in the optimizer state, so resuming is exact.

    A group with ``grad_momentum=False`` takes gradients whose momentum was already applied elsewhere (Deep
    Gradient Compression's momentum correction in the comm hook, Lin et al. 2018, arXiv 1712.01887): the
    gradient is applied as it is, ``w <- w - lr_t * g``, and the momentum (with the correction and the Nesterov
    form above) runs on the weight-decay term ``wd * w`` alone, in its own buffer, as the DGC reference code
    does. Momentum being linear, the sum equals the update above for ``d = g + wd * w`` when ``g`` is the
    gradient's momentum (or Nesterov) direction.

    Args:
        params: parameters or param-group dicts; groups may set ``lr``, ``momentum``, ``weight_decay``... A
            ``trust`` key (from :func:`~scalelab.recipe.param_groups`) is accepted and has no effect here.
        lr: learning rate ``lr_t`` (set ``group["lr"]`` before each step, or use a torch LR scheduler).
        momentum: ``m``; 0 gives plain SGD.
        nesterov: use the Nesterov update above (needs ``momentum > 0``).
        weight_decay: L2 decay added to the gradient.
        grad_momentum: False: momentum on the weight decay only (see above); usually set per group.
        momentum_correction: scale the velocity by ``lr_t / lr_{t-1}`` when the LR changes.

    Example:
        >>> import torch
        >>> from scalelab.recipe import SGD
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.tensor([0.5, 1.0])
        >>> _ = opt.step()
        >>> w.detach()
        tensor([ 0.9500, -2.1000])

    References:
        Goyal, Dollar, Girshick, Noordhuis, Wesolowski, Kyrola, Tulloch, Jia, He. "Accurate, Large Minibatch
        SGD: Training ImageNet in 1 Hour", 2017, arXiv 1706.02677 (section 2.1, momentum correction).
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0, momentum_correction: bool = True, grad_momentum: bool = True):
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and momentum <= 0.0:
            raise ValueError("nesterov needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        momentum_correction=momentum_correction, grad_momentum=grad_momentum)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's loss if one is given."""
        loss = run_closure(closure)
        for group in self.param_groups:
            lr, m = group["lr"], group["momentum"]
            for p, g in params_with_grads(group, "SGD"):
                if not group.get("grad_momentum", True):  # DGC: g carries its momentum
                    self._decay_momentum_step(p, g, group, lr, m)
                    continue
                d = add_decayed_weights(g, p, group["weight_decay"])
                if m == 0.0:
                    p.add_(d, alpha=-lr)
                    continue
                state = ensure_state(self.state[p], p, "velocity")
                ratio = lr_ratio(lr, state.get("prev_lr"), group["momentum_correction"])
                v = momentum_(state["velocity"], d * lr, m, ratio)
                state["prev_lr"] = lr
                if group["nesterov"]:
                    p.sub_(v * m).sub_(d, alpha=lr)
                else:
                    p.sub_(v)
        return loss

    def _decay_momentum_step(self, p, g, group, lr: float, m: float) -> None:
        """``grad_momentum=False``: ``w <- w - lr g``, and the decay ``wd * w`` through the velocity (in place, no
        full-size temporary: this runs on every step of DGC, whose step is a few passes over the weights)."""
        wd = group["weight_decay"]
        if not wd or m == 0.0:
            p.mul_(1.0 - lr * wd).sub_(g, alpha=lr)
            return
        state = ensure_state(self.state[p], p, "velocity")
        ratio = lr_ratio(lr, state.get("prev_lr"), group["momentum_correction"])
        v = state["velocity"].mul_(m * ratio).add_(p, alpha=lr * wd)  # v <- m ratio v + lr wd w
        state["prev_lr"] = lr
        if group["nesterov"]:
            p.mul_(1.0 - lr * wd).sub_(g, alpha=lr).sub_(v, alpha=m)  # w - lr (g + wd w) - m v
        else:
            p.sub_(g, alpha=lr).sub_(v)
