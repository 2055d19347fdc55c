"""Multi-layer perceptron, and the weight initialisation shared by every model in :mod:`scalelab.models`.

Initialisation follows He et al. 2015 ("Delving deep into rectifiers", arXiv 1502.01852): Kaiming-normal
weights for ReLU networks, fan-out for convolutions as in the ResNet reference implementations and fan-in for
linear layers; zero biases; normalisation layers start as the identity (gamma 1, beta 0).
"""

from __future__ import annotations

from torch import Tensor, nn

from scalelab.recipe.norm import BatchNorm, make_norm


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out) and linears (fan_in), zero biases, norm gamma 1 and beta 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, (BatchNorm, nn.modules.batchnorm._BatchNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            continue
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MLP(nn.Module):
    """Flatten, ``depth`` hidden layers Linear -> norm -> ReLU of ``width`` units, then a linear classifier.

    Args:
        in_features: number of input values per sample (the product of the input shape).
        num_classes: output logits.
        width: hidden units per layer.
        depth: hidden layers (0 gives a linear model).
        norm: ``"bn"``, ``"ghost"`` or ``"none"`` (see :func:`scalelab.recipe.norm.make_norm`).
        ghost_batch: virtual batch size for ``norm="ghost"``.
    """

    def __init__(self, in_features: int, num_classes: int, width: int = 64, depth: int = 3, norm: str = "bn",
                 ghost_batch: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        n = in_features
        for _ in range(depth):
            # A bias just before BN is cancelled by the mean subtraction: only keep it without normalisation.
            layers += [nn.Linear(n, width, bias=norm == "none"), make_norm(norm, width, ghost_batch),
                       nn.ReLU(inplace=True)]
            n = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(n, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
