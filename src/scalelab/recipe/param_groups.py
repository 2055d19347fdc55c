"""Split a model's parameters into decayed/trust-ratio and excluded (bias, norm) groups."""

from __future__ import annotations

from typing import Any

from torch import nn


def param_groups(model: nn.Module, weight_decay: float, exclude_bn_bias: bool = True) -> list[dict[str, Any]]:
    """Param groups that give biases and normalisation parameters no weight decay and no trust ratio.

    A parameter with ``ndim <= 1`` (a bias, a BatchNorm/LayerNorm gamma or beta) goes to a group with
    ``weight_decay=0.0, trust=False`` when ``exclude_bn_bias``; all others (weight matrices and conv kernels)
    to a group with ``weight_decay=weight_decay, trust=True``. Empty groups are dropped, so the result has one
    or two groups. Every scalelab optimizer reads ``weight_decay`` per group; LARS and LAMB also read
    ``trust`` (the others accept and ignore it).

    Goyal et al. (arXiv 1706.02677) apply no weight decay to BN gamma and beta; excluding biases and norm
    parameters from the LARS/LAMB adaptation follows the TF LARS and optax implementations (You et al. are
    silent on it).

    Args:
        model: the module whose ``named_parameters()`` are split (shared parameters appear once).
        weight_decay: the decay of the weight group.
        exclude_bn_bias: if False, one group holds everything, with decay and trust ratio.

    Returns:
        Dicts with keys ``params``, ``weight_decay`` and ``trust``, for any ``torch.optim.Optimizer``.

    Example:
        >>> from torch import nn
        >>> groups = param_groups(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), 5e-4)
        >>> [(len(g["params"]), g["weight_decay"], g["trust"]) for g in groups]
        [(1, 0.0005, True), (3, 0.0, False)]
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if exclude_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "trust": True},
              {"params": no_decay, "weight_decay": 0.0, "trust": False}]
    return [g for g in groups if g["params"]]
