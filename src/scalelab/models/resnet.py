"""Residual networks (He, Zhang, Ren & Sun 2016, "Deep Residual Learning for Image Recognition",
arXiv 1512.03385).

Two families, written from the paper:

* CIFAR style (Section 4.2): a 3x3 stem and three stages of 2n basic-block layers with 16/32/64 channels,
  depth 6n + 2: ``resnet20`` (n = 3, ~0.27M parameters) and ``resnet56`` (n = 9, ~0.85M). Where the shape
  changes we use the projection shortcut (option B: 1x1 conv + norm) rather than the paper's zero-padding
  option A, which adds ~2.8k parameters.
* ImageNet style (Table 1): a 7x7 stride-2 stem and 3x3 stride-2 max-pool, then four stages with
  64/128/256/512 channels: ``resnet18`` (basic blocks [2, 2, 2, 2], ~11.7M parameters with 1000 classes)
  and ``resnet50`` (bottleneck blocks [3, 4, 6, 3], expansion 4, ~25.6M). The bottleneck strides on its 3x3
  convolution (the common "v1.5" variant) rather than on the first 1x1, which discards three quarters of its
  input. Small inputs such as 32x32 still work: the stem brings them to 8x8 and the last stage to 1x1 before
  global pooling.

The channel counts scale with ``model.width`` (its value is the first stage's channels: 16 for the CIFAR nets,
64 for the ImageNet nets). ``zero_init_residual`` zero-initialises the gamma of the last norm layer of each
residual block, so every block starts as the identity (Goyal et al. 2017, arXiv 1706.02677, Section 5.1),
which eases optimisation at the start of large-batch training.
"""

from __future__ import annotations

from torch import Tensor, nn

from scalelab.models.mlp import init_weights
from scalelab.recipe.norm import BatchNorm, make_norm


def _conv(c_in: int, c_out: int, kernel: int, stride: int, norm: str) -> nn.Conv2d:
    # No bias when a norm layer follows: its mean subtraction cancels the bias.
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=norm == "none")


def _shortcut(c_in: int, c_out: int, stride: int, norm: str, ghost_batch: int) -> nn.Module:
    """Identity, or the option-B projection (1x1 conv + norm) when the block changes the shape."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(_conv(c_in, c_out, 1, stride, norm), make_norm(norm, c_out, ghost_batch))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut: relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, norm: str = "bn",
                 ghost_batch: int = 32) -> None:
        super().__init__()
        self.conv1 = _conv(c_in, planes, 3, stride, norm)
        self.norm1 = make_norm(norm, planes, ghost_batch)
        self.conv2 = _conv(planes, planes, 3, 1, norm)
        self.norm2 = make_norm(norm, planes, ghost_batch)
        self.shortcut = _shortcut(c_in, planes, stride, norm, ghost_batch)
        self.relu = nn.ReLU(inplace=True)

    @property
    def last_norm(self) -> nn.Module:
        """The norm layer right before the addition (zeroed by ``zero_init_residual``)."""
        return self.norm2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand by 4, with a shortcut (He et al. 2016, Fig. 5 right)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, norm: str = "bn",
                 ghost_batch: int = 32) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = _conv(c_in, planes, 1, 1, norm)
        self.norm1 = make_norm(norm, planes, ghost_batch)
        self.conv2 = _conv(planes, planes, 3, stride, norm)
        self.norm2 = make_norm(norm, planes, ghost_batch)
        self.conv3 = _conv(planes, c_out, 1, 1, norm)
        self.norm3 = make_norm(norm, c_out, ghost_batch)
        self.shortcut = _shortcut(c_in, c_out, stride, norm, ghost_batch)
        self.relu = nn.ReLU(inplace=True)

    @property
    def last_norm(self) -> nn.Module:
        """The norm layer right before the addition (zeroed by ``zero_init_residual``)."""
        return self.norm3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A stem, stages of residual blocks (channels doubling, stride 2 per new stage), GAP and a linear head.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. [3, 3, 3] (resnet20) or [3, 4, 6, 3] (resnet50).
        in_channels: input image channels.
        num_classes: output logits.
        base_channels: channels (``planes``) of the first stage.
        stem: ``"cifar"`` (3x3 conv) or ``"imagenet"`` (7x7 stride-2 conv + 3x3 stride-2 max-pool).
        norm: ``"bn"``, ``"ghost"`` or ``"none"``.
        ghost_batch: virtual batch size for ``norm="ghost"``.
        zero_init_residual: zero the gamma of each block's last norm layer when it is a BatchNorm.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], in_channels: int,
                 num_classes: int, base_channels: int = 64, stem: str = "imagenet", norm: str = "bn",
                 ghost_batch: int = 32, zero_init_residual: bool = True) -> None:
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(_conv(in_channels, base_channels, 3, 1, norm),
                                      make_norm(norm, base_channels, ghost_batch), nn.ReLU(inplace=True))
        elif stem == "imagenet":
            self.stem = nn.Sequential(_conv(in_channels, base_channels, 7, 2, norm),
                                      make_norm(norm, base_channels, ghost_batch), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            raise ValueError(f"unknown stem {stem!r}; known: cifar, imagenet")
        stages: list[nn.Module] = []
        c_in = base_channels
        for i, n_blocks in enumerate(layers):
            planes = base_channels * 2**i
            blocks = []
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(c_in, planes, stride, norm, ghost_batch))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and isinstance(m.last_norm, BatchNorm):
                    nn.init.zeros_(m.last_norm.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))
