"""NIfTI volumes to normalized arrays (DESIGN §4 end, supplementary E.1), and the on-disk format.

A preprocessed dataset is a folder of C-order ``.npy`` volumes ``(D, H, W)`` (canonical RAS voxel
axes, target spacing), one JSON sidecar per volume and a ``manifest.json`` listing them. Every
file is written atomically (temporary file, fsync, rename), so a killed run never leaves a
half-written array: a volume counts as done once its sidecar exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "gvsl-fast-npy/1"
INTENSITIES = ("ct", "mr")
DTYPES = ("float32", "float16")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
CT_RANGE = 2048.0


class VolumeError(ValueError):
    """A NIfTI file that cannot be used as a 3-D volume (unreadable, 2-D or 4-D)."""


def is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def require_folder(path: Path, what: str, missing_ok: bool = False) -> None:
    """Raise one line naming ``path`` (``what``: "input folder", ...) unless it is a folder
    (or, with ``missing_ok``, does not exist yet)."""
    if path.is_dir():
        return
    if path.exists():
        raise NotADirectoryError(f"{what} {path} is not a folder")
    if not missing_ok:
        raise FileNotFoundError(f"{what} {path} does not exist")


def find_nifti(folder: Path) -> list[Path]:
    """All ``.nii``/``.nii.gz`` files under ``folder`` (recursively), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if is_nifti(p))


def stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_canonical(path: Path):
    """``(data float32 (X, Y, Z), canonical affine, original affine, original shape)``.

    Raises:
        VolumeError: the file is unreadable, or not a 3-D volume (trailing singleton axes, as
            in ``(X, Y, Z, 1)``, are dropped; an axis of length 1 among the first three makes
            the image 2-D).
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) > 3:
            raise VolumeError(f"{path}: 4-D image of shape {tuple(img.shape)}, expected 3-D")
        if len(shape) < 3 or min(shape) <= 1:
            raise VolumeError(f"{path}: 2-D image of shape {tuple(img.shape)}, expected 3-D")
        img = nib.funcs.squeeze_image(img)
        canon = nib.as_closest_canonical(img)
        data = np.asarray(canon.dataobj, dtype=np.float32)
    except VolumeError:
        raise
    except Exception as exc:  # nibabel raises many types for damaged files
        raise VolumeError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    return data, canon.affine, img.affine, shape


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm) of an affine: the norms of its first three columns."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def resample(data: np.ndarray, affine: np.ndarray, spacing: Sequence[float]):
    """Trilinear resampling of ``data`` to voxels of ``spacing`` mm along its own axes.

    The field of view is kept: output voxel ``i`` (centre) sits at input index
    ``(i + 0.5) * s_out / s_in - 0.5`` (edges clamped). Returns ``(array, new affine)``.
    """
    zooms = voxel_sizes(affine)
    spacing = np.asarray(spacing, dtype=np.float64)
    out = data
    for axis in range(3):
        ratio = spacing[axis] / zooms[axis]
        n_out = max(1, int(round(data.shape[axis] / ratio)))
        if n_out == out.shape[axis] and abs(ratio - 1) < 1e-6:
            continue
        out = _resample_axis(out, axis, n_out, ratio)
    scale = np.diag(list(spacing / zooms) + [1.0])
    shift = np.eye(4)
    shift[:3, 3] = 0.5 * (spacing / zooms) - 0.5           # voxel-centre offset of the new grid
    return out, affine @ shift @ scale


def _resample_axis(x: np.ndarray, axis: int, n_out: int, ratio: float) -> np.ndarray:
    n_in = x.shape[axis]
    pos = np.clip((np.arange(n_out) + 0.5) * ratio - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = n_out
    w = w.reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - w) + np.take(x, hi, axis=axis) * w


def normalize(data: np.ndarray, intensity: str, hu_offset: float = 0.0) -> np.ndarray:
    """``ct``: ``clip(x + hu_offset, 0, 2048) / 2048``; ``mr``: min-max to [0, 1].

    ``hu_offset=1024`` maps Hounsfield units (air at -1024) onto the stored-value range.
    Non-finite voxels become 0 before normalizing; a constant image maps to zeros.
    """
    x = np.nan_to_num(data.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if intensity == "ct":
        return np.clip(x + np.float32(hu_offset), 0, CT_RANGE) / np.float32(CT_RANGE)
    if intensity == "mr":
        lo, hi = float(x.min()), float(x.max())
        if hi <= lo:
            return np.zeros_like(x)
        return (x - np.float32(lo)) / np.float32(hi - lo)
    raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}")


# ---- atomic writes -------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)                 # mkstemp's 0600 -> the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy(path: Path, array: np.ndarray) -> None:
    _atomic(Path(path), lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def save_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True).encode()
    _atomic(Path(path), lambda f: f.write(text))


def sidecar_path(npy: Path) -> Path:
    return npy.with_suffix(".json")


def write_volume(npy: Path, array: np.ndarray, meta: dict) -> dict:
    """Write ``array`` and its sidecar (the sidecar last: it marks the volume done)."""
    save_npy(npy, array)
    meta = dict(meta, shape=list(array.shape), dtype=str(array.dtype))
    save_json(sidecar_path(npy), meta)
    return meta


def write_manifest(folder: Path, entries: list[dict], **info) -> Path:
    """``manifest.json``: the dataset's settings and its volumes (paths relative to ``folder``)."""
    path = Path(folder) / MANIFEST
    save_json(path, dict(info, format=FORMAT, volumes=sorted(entries, key=lambda e: e["file"])))
    return path


def _is_volume_entry(entry: object) -> bool:
    """A manifest volume: ``{"file": name, "shape": [D, H, W], ...}``."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return False
    shape = entry.get("shape")
    return (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(n, int) and n > 0 for n in shape))


def read_manifest(folder: Path) -> dict:
    """The manifest of a preprocessed folder.

    Raises:
        FileNotFoundError: ``folder`` has no manifest.
        ValueError: the manifest is not of this format, lists no volumes, or a listed ``.npy``
            is missing, truncated or of another shape.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST} (not a preprocessed dataset)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path}: format {found!r}, expected {FORMAT!r}")
    if not manifest.get("volumes"):
        raise ValueError(f"{path}: lists no volumes")
    for entry in manifest["volumes"]:
        if not _is_volume_entry(entry):
            raise ValueError(f"{path}: a volume entry without a file name and a 3-D shape: "
                             f"{entry!r}")
        if not (Path(folder) / entry["file"]).is_file():
            raise ValueError(f"{path}: listed volume {entry['file']} is missing")
        _check_volume(Path(folder) / entry["file"], tuple(entry["shape"]))
    return manifest


def _check_volume(npy: Path, shape: tuple[int, ...]) -> None:
    """Raise ValueError naming ``npy`` unless it maps as an array of ``shape`` (the loaders would
    fail later, with messages that name no file)."""
    try:
        found = np.load(npy, mmap_mode="r").shape      # the header only; no data is read
    except (ValueError, EOFError) as exc:
        raise ValueError(f"{npy}: damaged or truncated .npy ({exc})") from exc
    if found != shape:
        raise ValueError(f"{npy}: shape {found}, but {MANIFEST} says {shape}")
