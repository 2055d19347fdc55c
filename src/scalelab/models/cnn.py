"""Small convolutional networks: ``cnn1d`` for 1-D signals such as MNIST-1D, ``cnn2d`` for small images.

MNIST-1D (Greydanus 2020, arXiv 2011.14439) places its templates at fixed positions, so the class depends on
*where* a pattern is. ``CNN1d`` therefore ends with flatten -> linear rather than global average pooling,
which would throw the position away.
"""

from __future__ import annotations

from torch import Tensor, nn

from scalelab.errors import ConfigError
from scalelab.models.mlp import init_weights
from scalelab.recipe.norm import make_norm


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling along one dimension."""
    return (size + 2 * padding - kernel) // stride + 1


class CNN1d(nn.Module):
    """``depth`` blocks Conv1d -> norm -> ReLU of ``width`` channels, then flatten -> Linear.

    Blocks number ``stride_every``, ``2 * stride_every``, ... (1-based) use stride ``stride``, so with the
    defaults the length halves every second block. Convolutions use "same" padding (kernel // 2).

    Args:
        in_channels: input channels C of (N, C, L) inputs.
        length: input length L.
        num_classes: output logits.
        width: channels of every block.
        depth: number of conv blocks.
        norm: ``"bn"``, ``"ghost"`` or ``"none"``.
        ghost_batch: virtual batch size for ``norm="ghost"``.
        kernel_size: convolution kernel size (odd).
        stride: stride of the strided blocks.
        stride_every: apply ``stride`` on every ``stride_every``-th block; 0 = never.
    """

    def __init__(self, in_channels: int, length: int, num_classes: int, width: int = 64, depth: int = 3,
                 norm: str = "bn", ghost_batch: int = 32, kernel_size: int = 5, stride: int = 2,
                 stride_every: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, n = in_channels, length
        for i in range(1, depth + 1):
            s = stride if stride_every and i % stride_every == 0 else 1
            pad = kernel_size // 2
            layers += [nn.Conv1d(c, width, kernel_size, stride=s, padding=pad, bias=norm == "none"),
                       make_norm(norm, width, ghost_batch), nn.ReLU(inplace=True)]
            c, n = width, conv_out_size(n, kernel_size, s, pad)
            if n < 1:
                raise ConfigError(f"model cnn1d: inputs of length {length} shrink to nothing after {i} "
                                  f"blocks (kernel {kernel_size}, stride {stride} every {stride_every})")
        self.features = nn.Sequential(*layers)
        self.flat_features = c * n
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(self.flat_features, num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CNN2d(nn.Module):
    """``depth`` blocks Conv2d 3x3 -> norm -> ReLU, max-pool 2 after every second block, then GAP -> Linear.

    The channel count starts at ``width`` and doubles after each pool (the VGG pattern, Simonyan & Zisserman
    2014, arXiv 1409.1556). A pool is only inserted while both spatial sizes are >= 2, so tiny inputs work,
    and not after the final block: global average pooling follows there, and a max-pool right before it would
    only change the read-out, not add capacity.

    Args:
        in_channels: input channels C of (N, C, H, W) inputs.
        height, width_px: input spatial size.
        num_classes: output logits.
        width: channels of the first blocks.
        depth: number of conv blocks.
        norm: ``"bn"``, ``"ghost"`` or ``"none"``.
        ghost_batch: virtual batch size for ``norm="ghost"``.
        pool_every: pool after every ``pool_every``-th block.
    """

    def __init__(self, in_channels: int, height: int, width_px: int, num_classes: int, width: int = 64,
                 depth: int = 3, norm: str = "bn", ghost_batch: int = 32, pool_every: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c, h, w = in_channels, width, height, width_px
        for i in range(1, depth + 1):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=norm == "none"), make_norm(norm, c, ghost_batch),
                       nn.ReLU(inplace=True)]
            c_in = c
            if i < depth and i % pool_every == 0 and min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w, c = h // 2, w // 2, c * 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
