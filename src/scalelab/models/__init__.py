"""Models: an MLP, small 1-D/2-D CNNs and ResNets, built by name from a :class:`~scalelab.config.ModelConfig`.

Example:
    >>> from scalelab.config import ModelConfig
    >>> from scalelab.models import build_model
    >>> model = build_model(ModelConfig(name="cnn1d"), (1, 40), 10)
"""

from scalelab.models.cnn import CNN1d, CNN2d
from scalelab.models.mlp import MLP, init_weights
from scalelab.models.registry import MODELS, build_model, count_parameters
from scalelab.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["MODELS", "build_model", "count_parameters", "init_weights", "MLP", "CNN1d", "CNN2d", "ResNet",
           "BasicBlock", "Bottleneck"]
