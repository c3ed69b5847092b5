import os

import torch

# Triton kernels run under the interpreter on CPU tensors where no GPU exists (set before any
# kernel module is imported); on a GPU machine they compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
