"""gvsl-fast: fast GVSL pre-training and drop-in 3D registration kernels."""

__version__ = "0.1.0"
