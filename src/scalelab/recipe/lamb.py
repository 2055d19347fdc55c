"""LAMB: layer-wise adaptive moments for large-batch training."""

from __future__ import annotations

import torch
from torch.linalg import vector_norm

from scalelab.recipe.parts import (adam_direction, add_decayed_weights, ema_, ema_sq_, ensure_state,
                                   params_with_grads, run_closure, trust_ratio)


class LAMB(torch.optim.Optimizer):
    """LAMB (You et al. 2019, Algorithm 2): Adam's direction, rescaled per tensor by a trust ratio.

    Per parameter tensor, at the 1-based step ``t``::

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g**2
        m_hat = m / (1 - b1**t);  v_hat = v / (1 - b2**t)        # only with bias_correction
        r = m_hat / (sqrt(v_hat) + eps);   u = r + wd * w
        w <- w - lr * (phi(||w||) / ||u||) * u                   # ratio 1 if ||w|| = 0 or ||u|| = 0

    Scaling function: ``phi`` is the identity, as in the tensorflow/addons reference code the paper names; the
    paper's analysis clamps ``||w||`` to ``[gamma_l, gamma_u]`` but gives no values. Groups with
    ``trust=False`` (biases and norm parameters from :func:`~scalelab.recipe.param_groups`) use ratio 1, i.e.
    an AdamW-style step. The trust ratio is the same function :class:`~scalelab.recipe.LARS` uses (with
    coefficient 1).

    Args:
        params: parameters or param-group dicts; groups may set ``lr``, ``weight_decay``, ``trust`` etc.
        lr: learning rate ``lr`` (eta_t).
        betas: ``(b1, b2)``.
        eps: added to ``sqrt(v_hat)``.
        weight_decay: ``wd`` (lambda), added to the Adam direction inside the normed update.
        bias_correction: divide the moments by ``1 - b**t`` (tfa; BERT-style LAMB omits it).

    Example:
        >>> import torch
        >>> from scalelab.recipe import LAMB
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        >>> opt = LAMB([w], lr=0.1, weight_decay=0.0)
        >>> w.grad = torch.tensor([1.0, 1.0])        # r = (1, 1), ||u|| = sqrt(2), ratio = 5 / sqrt(2)
        >>> _ = opt.step()
        >>> w.detach()
        tensor([2.6464, 3.6464])

    References:
        You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer, Hsieh. "Large Batch Optimization for
        Deep Learning: Training BERT in 76 minutes", 2019, arXiv 1904.00962.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, bias_correction: bool = True):
        if lr < 0.0 or eps <= 0.0 or weight_decay < 0.0:
            raise ValueError(f"need lr >= 0, eps > 0, weight_decay >= 0; got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, trust=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's loss if one is given."""
        loss = run_closure(closure)
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p, g in params_with_grads(group, "LAMB"):
                state = ensure_state(self.state[p], p, "exp_avg", "exp_avg_sq")
                state["step"] = state.get("step", 0) + 1
                ema_(state["exp_avg"], g, b1)
                ema_sq_(state["exp_avg_sq"], g, b2)
                r = adam_direction(state["exp_avg"], state["exp_avg_sq"], state["step"], b1, b2, group["eps"],
                                   group["bias_correction"])
                u = add_decayed_weights(r, p, group["weight_decay"])
                if group["trust"]:
                    u = u * trust_ratio(vector_norm(p), vector_norm(u))
                p.sub_(u, alpha=lr)
        return loss
