"""GVSL model components (DESIGN §4)."""

from gvsl_fast.affine import affine_matrix
from gvsl_fast.models.gvsl import GVSL, GVSLOutput
from gvsl_fast.models.heads import AffineHead, DeformableHead, RestorationHead
from gvsl_fast.models.unet import UNet3D

__all__ = ["GVSL", "GVSLOutput", "AffineHead", "DeformableHead", "RestorationHead",
           "UNet3D", "affine_matrix"]
