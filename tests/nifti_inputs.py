"""Real NIfTI inputs for the data tests: nibabel's anatomical.nii and the MNI152 templates from the
nilearn wheel, plus broken files, converted by the real ``preprocess`` command."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from gvsl_fast.data import demo


def anatomical() -> Path:
    """nibabel's tests/data/anatomical.nii: a real T1, 33x41x25 at 2 mm."""
    spec = importlib.util.find_spec("nibabel")
    return Path(spec.origin).parent / "tests" / "data" / "anatomical.nii"


def nifti_folder(root: Path, broken: bool = True) -> Path:
    """A folder of NIfTI files: anatomical.nii, the MNI152 T1 and GM (in a subfolder), and with
    ``broken`` a corrupt .nii.gz, a 2-D image and a 4-D image."""
    folder = root / "nifti"
    (folder / "mni").mkdir(parents=True)
    shutil.copy(anatomical(), folder / "anatomical.nii")
    paths = demo.template_paths()
    shutil.copy(paths["t1"], folder / "mni" / "t1.nii.gz")
    shutil.copy(paths["gm"], folder / "mni" / "gm.nii.gz")
    if broken:
        (folder / "corrupt.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip stream" * 10)
        eye = np.eye(4)
        nib.save(nib.Nifti1Image(np.ones((12, 14), np.float32), eye), folder / "flat.nii")
        nib.save(nib.Nifti1Image(np.ones((6, 7, 8, 3), np.float32), eye), folder / "time.nii.gz")
    return folder


GOOD = ("anatomical.npy", "mni/t1.npy", "mni/gm.npy")
BAD = ("corrupt.nii.gz", "flat.nii", "time.nii.gz")
