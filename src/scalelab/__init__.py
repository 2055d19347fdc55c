"""scalelab: deep learning at supercomputer scale, executable on one CPU or many GPUs.

The Python API that the ``scalelab`` command line is a thin layer over:

    >>> from scalelab import load_config, train
    >>> cfg = load_config(None, ["train.batch_size=512"])
    >>> cfg.train.batch_size
    512
"""

from scalelab.config import Config, load_config, save_config
from scalelab.errors import ScalelabError

__version__ = "0.1.0"
__all__ = ["Config", "ScalelabError", "load_config", "save_config", "train", "__version__"]


def __getattr__(name):
    # ``train`` pulls in torch and the model zoo; import it on first use so that ``import scalelab`` stays light.
    if name == "train":
        from scalelab.train import train

        return train
    raise AttributeError(f"module 'scalelab' has no attribute {name!r}")
