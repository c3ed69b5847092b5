"""Drop-in registration ops (DESIGN §2-3): every op takes ``backend=`` in
("auto", "cuda", "triton", "cpu", "reference") and matches ``gvsl_fast.ops.reference``."""

from gvsl_fast.ops import reference
from gvsl_fast.ops.compose import affine_flow_warp, compose
from gvsl_fast.ops.reference import smooth_loss

__all__ = ["affine_flow_warp", "compose", "reference", "smooth_loss"]
