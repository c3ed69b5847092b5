"""``prepare_dataset``: whatever ``--data`` names, a folder of preprocessed volumes."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from gvsl_fast.data import nifti
from gvsl_fast.data.demo import demo_cohort
from gvsl_fast.data.preprocess import Settings, preprocess


def prepare_dataset(data: str | Path | None, cache_dir: Path, *,
                    spacing: Sequence[float] = (1.0, 1.0, 1.0), intensity: str = "mr",
                    seed: int = 0, progress: bool = True) -> Path:
    """The folder of preprocessed ``.npy`` volumes (+ sidecars, manifest) to train on.

    Args:
        data: ``None`` for the embedded MNI152 cohort (built once under ``cache_dir``); a folder
            with a ``manifest.json`` of preprocessed volumes (used as is); or a folder of
            ``.nii``/``.nii.gz`` files (preprocessed into ``cache_dir``, skipping done files).
        cache_dir: where derived datasets are kept.
        spacing: target voxel size (mm) for NIfTI input and the default cohort.
        intensity: ``"mr"`` or ``"ct"`` normalization for NIfTI input.
        seed: seed of the default cohort.
        progress: show the preprocessing progress bar.

    Raises:
        FileNotFoundError: ``data`` does not exist, or holds no preprocessed dataset and no
            NIfTI image.
        NotADirectoryError: ``data`` is not a folder.
        ValueError: an existing manifest is damaged; fewer than 2 NIfTI files in ``data`` were
            usable (training pairs different images).

    Warns:
        RuntimeWarning: naming each NIfTI file of ``data`` that could not be used (the others
            are trained on); a preprocessed ``data`` made with another spacing or intensity
            than those asked for (it is used as it is).
    """
    spacing = tuple(float(s) for s in spacing)
    if data is None:
        return demo_cohort(Path(cache_dir), spacing=spacing, seed=seed)
    folder = Path(data)
    nifti.require_folder(folder, "data folder")
    if (folder / nifti.MANIFEST).is_file():
        _warn_if_settings_differ(folder, nifti.read_manifest(folder), spacing, intensity)
        return folder
    if not nifti.find_nifti(folder):
        raise FileNotFoundError(f"no images in {folder}: expected .nii/.nii.gz files or a "
                                f"preprocessed folder with {nifti.MANIFEST}")
    settings = Settings(spacing, intensity)
    key = hashlib.sha1(f"{folder.resolve()}|{settings.as_dict()}".encode()).hexdigest()[:12]
    out = Path(cache_dir) / f"{folder.name}-{key}"
    summary = preprocess(folder, out, settings, workers=min(4, os.cpu_count() or 1),
                         progress=progress)
    if len(summary.entries) < 2:  # name the user's folder: the loader would name the cache's
        found = "only 1 usable image" if summary.entries else "no usable image"
        raise ValueError(f"{found} in {folder}, need at least 2 to pair different images"
                         + "".join(f"; {msg}" for msg in summary.failed))
    if summary.failed:  # train on the rest, but never without saying which files are left out
        warnings.warn(f"{len(summary.failed)} of {len(summary.failed) + len(summary.entries)} "
                      f"NIfTI files in {folder} are left out: " + "; ".join(summary.failed),
                      RuntimeWarning, stacklevel=2)
    return out


def _warn_if_settings_differ(folder: Path, manifest: dict, spacing: tuple[float, ...],
                             intensity: str) -> None:
    """A preprocessed folder is used as it is: say so when it was made with other settings."""
    have = {"spacing": manifest.get("spacing", list(spacing)),
            "intensity": manifest.get("intensity", intensity)}  # hand-made: nothing to compare
    if have["spacing"] == list(spacing) and have["intensity"] == intensity:
        return
    warnings.warn(f"{folder} was preprocessed with spacing {have['spacing']} and intensity "
                  f"{have['intensity']!r}; the requested spacing {list(spacing)} and intensity "
                  f"{intensity!r} are not applied (preprocess the NIfTI files again to use them)",
                  RuntimeWarning, stacklevel=3)
