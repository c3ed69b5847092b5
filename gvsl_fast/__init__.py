"""gvsl-fast: fast GVSL pre-training and drop-in 3D registration kernels."""

import torch  # noqa: F401  (loads libtorch, which gvsl_fast._C links against)

__version__ = "0.1.0"
