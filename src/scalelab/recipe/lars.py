"""LARS: layer-wise adaptive rate scaling for momentum SGD."""

from __future__ import annotations

import torch
from torch.linalg import vector_norm

from scalelab.recipe.parts import (add_decayed_weights, ensure_state, lr_ratio, momentum_, params_with_grads,
                                   run_closure, trust_ratio)


class LARS(torch.optim.Optimizer):
    """LARS (You, Gitman, Ginsburg 2017): momentum SGD with a local learning rate per parameter tensor.

    Per tensor (each weight and each bias separately), following the paper's eq. 6 and Algorithm 1::

        local = trust_coef * ||w|| / (||g|| + wd * ||w|| + eps)     # 1 if ||w|| = 0 or ||g|| = 0
        v <- m * (lr_t / lr_{t-1}) * v + lr_t * local * (g + wd * w)
        w <- w - v

    The LR ratio is Goyal et al.'s momentum correction, shared with :class:`~scalelab.recipe.SGD` (the paper
    has ``v <- m v + ...``; the two agree while the LR is constant). Groups with ``trust=False`` (biases and
    norm parameters from :func:`~scalelab.recipe.param_groups`) skip the ratio (``local = 1``), as the TF and
    optax implementations do; the paper itself is silent on them. The global LRs LARS needs are large (the
    paper uses up to 40 for ResNet-50), because ``local`` is about ``trust_coef`` times the weight-to-gradient
    norm ratio.

    Args:
        params: parameters or param-group dicts; groups may set ``lr``, ``weight_decay``, ``trust`` etc.
        lr: global learning rate ``lr_t`` (the paper's gamma_t).
        momentum: ``m``.
        weight_decay: ``wd`` (the paper's beta), inside both the ratio and the update.
        trust_coef: the trust coefficient eta (0.001 in the paper for every batch size).
        eps: added to the ratio's denominator (0 in the paper).
        momentum_correction: scale the velocity by ``lr_t / lr_{t-1}`` when the LR changes.

    Example:
        >>> import torch
        >>> from scalelab.recipe import LARS
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        >>> opt = LARS([w], lr=2.0, weight_decay=0.0, trust_coef=0.1)
        >>> w.grad = torch.tensor([0.6, 0.8])       # ||w|| = 5, ||g|| = 1, local = 0.1 * 5 / 1 = 0.5
        >>> _ = opt.step()
        >>> w.detach()
        tensor([2.4000, 3.2000])

    References:
        You, Gitman, Ginsburg. "Large Batch Training of Convolutional Networks", 2017, arXiv 1708.03888.
    """

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 5e-4,
                 trust_coef: float = 0.001, eps: float = 0.0, momentum_correction: bool = True):
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if weight_decay < 0.0 or trust_coef <= 0.0 or eps < 0.0:
            raise ValueError(f"need weight_decay >= 0, trust_coef > 0, eps >= 0; got {weight_decay}, "
                             f"{trust_coef}, {eps}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef, eps=eps,
                        momentum_correction=momentum_correction, trust=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's loss if one is given."""
        loss = run_closure(closure)
        for group in self.param_groups:
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p, g in params_with_grads(group, "LARS"):
                step = add_decayed_weights(g, p, wd) * lr
                if group["trust"]:
                    w_norm, g_norm = vector_norm(p), vector_norm(g)
                    step.mul_(trust_ratio(w_norm, g_norm, group["trust_coef"],
                                          denominator=g_norm + wd * w_norm + group["eps"]))
                state = ensure_state(self.state[p], p, "velocity")
                ratio = lr_ratio(lr, state.get("prev_lr"), group["momentum_correction"])
                p.sub_(momentum_(state["velocity"], step, m, ratio))
                state["prev_lr"] = lr
        return loss
