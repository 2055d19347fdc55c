"""Model registry: ``MODELS`` maps a name to a builder
``(ModelConfig, input_shape, num_classes) -> nn.Module``.

Builders check that the dataset's per-sample ``input_shape`` suits the model (e.g. ``cnn1d`` needs (C, L)) and
raise :class:`~scalelab.errors.ConfigError` with both shapes otherwise, before any weights are allocated.

Example:
    >>> from scalelab.config import ModelConfig
    >>> model = build_model(ModelConfig(name="resnet20", width=16), (3, 32, 32), 10)
    >>> round(count_parameters(model) / 1e6, 2)
    0.27
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from scalelab.config import ModelConfig
from scalelab.errors import ConfigError, unknown_name
from scalelab.models.cnn import CNN1d, CNN2d
from scalelab.models.mlp import MLP
from scalelab.models.resnet import BasicBlock, Bottleneck, ResNet

Builder = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]


def _expect(cfg: ModelConfig, input_shape: tuple[int, ...], rank: int, layout: str) -> tuple[int, ...]:
    if len(input_shape) != rank:
        raise ConfigError(f"model {cfg.name} needs inputs of shape {layout}; "
                          f"dataset gives {tuple(input_shape)}")
    return input_shape


# (width, depth) each model uses when the config leaves them at 0. cnn1d's 32 x 4 reaches 99% on MNIST-1D
# in about ten seconds on two cores; the ResNets' widths are their papers' (16 for CIFAR, 64 for ImageNet).
DEFAULT_DIMS: dict[str, tuple[int, int]] = {
    "mlp": (256, 2), "cnn1d": (32, 4), "cnn2d": (32, 4),
    "resnet20": (16, 0), "resnet56": (16, 0), "resnet18": (64, 0), "resnet50": (64, 0),
}


def dims(cfg: ModelConfig) -> tuple[int, int]:
    """The (width, depth) of ``cfg``, with 0 replaced by the model's default."""
    width, depth = DEFAULT_DIMS[cfg.name]
    return cfg.width or width, cfg.depth or depth


def _mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    width, depth = dims(cfg)
    return MLP(math.prod(input_shape), num_classes, width, depth, cfg.norm, cfg.ghost_batch)


def _cnn1d(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, length = _expect(cfg, input_shape, 2, "(C, L)")
    width, depth = dims(cfg)
    return CNN1d(c, length, num_classes, width, depth, cfg.norm, cfg.ghost_batch)


def _cnn2d(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, w = _expect(cfg, input_shape, 3, "(C, H, W)")
    width, depth = dims(cfg)
    return CNN2d(c, h, w, num_classes, width, depth, cfg.norm, cfg.ghost_batch)


def _resnet(block: type[BasicBlock] | type[Bottleneck], layers: list[int], stem: str) -> Builder:
    def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        c, _, _ = _expect(cfg, input_shape, 3, "(C, H, W)")
        # model.width is the first stage's channels: 16/16 = 1x for the CIFAR nets, 64/64 = 1x for ImageNet's.
        return ResNet(block, layers, c, num_classes, base_channels=dims(cfg)[0], stem=stem, norm=cfg.norm,
                      ghost_batch=cfg.ghost_batch, zero_init_residual=cfg.zero_init_residual)
    return build


MODELS: dict[str, Builder] = {
    "mlp": _mlp,
    "cnn1d": _cnn1d,
    "cnn2d": _cnn2d,
    "resnet20": _resnet(BasicBlock, [3, 3, 3], "cifar"),
    "resnet56": _resnet(BasicBlock, [9, 9, 9], "cifar"),
    "resnet18": _resnet(BasicBlock, [2, 2, 2, 2], "imagenet"),
    "resnet50": _resnet(Bottleneck, [3, 4, 6, 3], "imagenet"),
}


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model ``cfg.name`` for samples of shape ``input_shape`` (without the batch dimension).

    Raises:
        ConfigError: for an unknown model name or an input shape the model cannot take.
    """
    if cfg.name not in MODELS:
        raise ConfigError(unknown_name("model", cfg.name, MODELS))
    input_shape = tuple(int(s) for s in input_shape)
    if not input_shape or min(input_shape) < 1:
        raise ConfigError(f"model {cfg.name}: invalid input shape {input_shape}")
    if num_classes < 1:
        raise ConfigError(f"model {cfg.name}: num_classes must be >= 1, got {num_classes}")
    return MODELS[cfg.name](cfg, input_shape, num_classes)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values in ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
