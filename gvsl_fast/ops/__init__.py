"""Drop-in registration ops (DESIGN §2-3): every kernel op takes ``backend=`` in
("auto", "cuda", "triton", "cpu", "reference") and matches ``gvsl_fast.ops.reference``
(``smooth_loss``, plain PyTorch, is the reference's own)."""

from gvsl_fast.ops import reference
from gvsl_fast.ops.affine_warp import affine_warp
from gvsl_fast.ops.compose import affine_flow_warp, compose
from gvsl_fast.ops.lncc import NCC, LocalNormalizedCrossCorrelationLoss, lncc
from gvsl_fast.ops.reference import smooth_loss
from gvsl_fast.ops.warp import SpatialTransformer, Warp, grid_sample, warp

__all__ = [
    "NCC",
    "LocalNormalizedCrossCorrelationLoss",
    "SpatialTransformer",
    "Warp",
    "affine_flow_warp",
    "affine_warp",
    "compose",
    "grid_sample",
    "lncc",
    "reference",
    "smooth_loss",
    "warp",
]
