"""scalelab: deep learning at supercomputer scale, executable on one CPU or many GPUs."""

__version__ = "0.1.0"
