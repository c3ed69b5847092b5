"""Data pipeline: NIfTI preprocessing, the embedded default cohort, pair loaders (DALI with a
torch fallback) and batched on-device transforms."""

from gvsl_fast.data.dataset import prepare_dataset
from gvsl_fast.data.demo import demo_cohort
from gvsl_fast.data.loader import PairLoader, PairSampler, make_loader
from gvsl_fast.data.transforms import AppearanceTransform, SpatialTransform

__all__ = [
    "AppearanceTransform",
    "PairLoader",
    "PairSampler",
    "SpatialTransform",
    "demo_cohort",
    "make_loader",
    "prepare_dataset",
]
