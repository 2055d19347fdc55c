"""A teacher-network task of any size for tests and quick experiments: no files, generated in milliseconds."""

from __future__ import annotations

import torch

from scalelab.config import DataConfig
from scalelab.data.dataset import Dataset

DEFAULT_TRAIN = 10000
DEFAULT_TEST = 2000
TEACHER_HIDDEN = 64


def load_synthetic(cfg: DataConfig) -> Dataset:
    """Gaussian inputs labelled by a fixed random 2-layer MLP teacher.

    x ~ N(0, I) with ``cfg.input_dim`` features; the label is the argmax of ``tanh(x W1) W2`` over
    ``cfg.num_classes`` outputs. The teacher, the training inputs and the test inputs each come from their own
    generator seeded from ``cfg.seed``, so changing ``n_train`` leaves the teacher and the test set unchanged.

    Returns:
        A :class:`Dataset` of shape (N, input_dim).
    """
    n_train = cfg.n_train or DEFAULT_TRAIN
    n_test = cfg.n_test or DEFAULT_TEST
    d, k = cfg.input_dim, cfg.num_classes

    def gen(stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(cfg.seed * 3 + stream)

    g = gen(0)
    w1 = torch.randn(d, TEACHER_HIDDEN, generator=g) / d ** 0.5
    w2 = torch.randn(TEACHER_HIDDEN, k, generator=g)
    w2 = w2 / w2.norm(dim=0, keepdim=True)  # equal-norm columns: every class logit has the same spread

    def label(x: torch.Tensor) -> torch.Tensor:
        # tanh (odd, no biases) makes every class logit zero-mean and the equal-norm columns give them equal
        # spread, so classes come out roughly balanced; a ReLU teacher would give each class a fixed offset
        # and a few classes would dominate.
        return (torch.tanh(x @ w1) @ w2).argmax(dim=1)

    x_train = torch.randn(n_train, d, generator=gen(1))
    x_test = torch.randn(n_test, d, generator=gen(2))
    return Dataset("synthetic", x_train, label(x_train), x_test, label(x_test), k)
