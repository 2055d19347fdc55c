"""AdamW: Adam with decoupled weight decay, written from the shared Adam-moment parts."""

from __future__ import annotations

import torch

from scalelab.recipe.parts import (adam_direction, decay_weights_, ema_, ema_sq_, ensure_state,
                                   params_with_grads, run_closure)


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019): Adam with weight decay decoupled from the gradient.

    Per parameter tensor, at the 1-based step ``t``::

        w <- (1 - lr * wd) * w
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g**2
        w <- w - lr * m_hat / (sqrt(v_hat) + eps),   m_hat = m / (1 - b1**t),  v_hat = v / (1 - b2**t)

    This is the update of ``torch.optim.AdamW`` (without amsgrad), and gives the same iterates up to rounding.
    It is :class:`~scalelab.recipe.LAMB` without the trust ratio and with the decay outside the Adam
    direction. A ``trust`` key in a group is accepted and has no effect; ``weight_decay`` is honoured per
    group.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate.
        betas: ``(b1, b2)``.
        eps: added to ``sqrt(v_hat)``.
        weight_decay: decoupled decay rate ``wd`` (multiplied by ``lr``, as in PyTorch).

    Example:
        >>> import torch
        >>> from scalelab.recipe import AdamW
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = AdamW([w], lr=0.1, weight_decay=0.0)
        >>> w.grad = torch.tensor([0.5])             # first step: m_hat / sqrt(v_hat) = 1
        >>> _ = opt.step()
        >>> w.detach()
        tensor([0.9000])

    References:
        Loshchilov, Hutter. "Decoupled Weight Decay Regularization", ICLR 2019, arXiv 1711.05101.
        Kingma, Ba. "Adam: A Method for Stochastic Optimization", 2014, arXiv 1412.6980.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        if lr < 0.0 or eps <= 0.0 or weight_decay < 0.0:
            raise ValueError(f"need lr >= 0, eps > 0, weight_decay >= 0; got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's loss if one is given."""
        loss = run_closure(closure)
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p, g in params_with_grads(group, "AdamW"):
                state = ensure_state(self.state[p], p, "exp_avg", "exp_avg_sq")
                state["step"] = state.get("step", 0) + 1
                decay_weights_(p, lr, group["weight_decay"])
                ema_(state["exp_avg"], g, b1)
                ema_sq_(state["exp_avg_sq"], g, b2)
                r = adam_direction(state["exp_avg"], state["exp_avg_sq"], state["step"], b1, b2, group["eps"])
                p.sub_(r, alpha=lr)
        return loss
