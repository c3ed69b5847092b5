"""The embedded default cohort (DESIGN §5): real anatomy from the nilearn wheel, no download.

The MNI152 2009a templates (T1 and the GM/WM probability maps, 1 mm, 197x233x189) are resampled
to the requested spacing and turned into ``n`` subjects, each with its own random smooth
deformation (small affine + low-frequency displacement field), tissue contrast (T1 plus random
GM/WM weights), gamma and bias field. The cohort is written once in the preprocessed format
(``.npy`` + sidecars + manifest) under the cache folder and reused afterwards.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gvsl_fast.data import nifti

TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
TISSUES = ("t1", "gm", "wm")


def template_paths() -> dict[str, Path]:
    """Paths of the MNI152 templates inside the installed nilearn package (not imported).

    Raises:
        FileNotFoundError: nilearn is not installed or lacks the templates.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default cohort needs the nilearn package (pip install "
                                "nilearn), which ships the MNI152 templates")
    folder = Path(spec.origin).parent / "datasets" / "data"
    paths = {t: folder / TEMPLATE.format(t) for t in TISSUES}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MNI152 templates missing from the nilearn install: {missing}")
    return paths


def _spacing3(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    s = (float(spacing),) * 3 if np.isscalar(spacing) else tuple(float(v) for v in spacing)
    if len(s) != 3 or min(s) <= 0:
        raise ValueError(f"spacing must be one positive number or three, got {spacing!r}")
    return s


def cohort_dir(cache_dir: Path, n: int, spacing, seed: int) -> Path:
    sx, sy, sz = _spacing3(spacing)
    return Path(cache_dir) / f"mni152-n{n}-sp{sx:g}x{sy:g}x{sz:g}-seed{seed}"


def demo_cohort(cache_dir: Path, n: int = 8, spacing: float | Sequence[float] = 2.0,
                seed: int = 0) -> Path:
    """Folder of ``n`` synthetic subjects from the MNI152 templates (built once, then reused).

    Args:
        cache_dir: where the cohort folder is created.
        n: number of subjects (at least 2: training pairs different volumes).
        spacing: voxel size in mm, one number or three.
        seed: the cohort's random seed.

    Returns:
        The folder (``.npy`` volumes, sidecars, ``manifest.json``).
    """
    if n < 2:
        raise ValueError(f"demo_cohort: n must be at least 2, got {n}")
    spacing = _spacing3(spacing)
    out = cohort_dir(cache_dir, n, spacing, seed)
    if _complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build(tmp, n, spacing, seed)
        tmp.chmod(0o777 & ~nifti.UMASK)                # mkdtemp's 0700 -> the usual mode
        try:
            tmp.rename(out)
        except OSError:
            # `out` appeared meanwhile: a concurrent build (another DDP rank) that finished
            # first, which is used as it is (it may be being read), or an incomplete one
            if not _complete(out):
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished cohort (a readable manifest)."""
    try:
        nifti.read_manifest(folder)
        return True
    except (FileNotFoundError, ValueError):
        return False


def _load_templates(spacing) -> tuple[np.ndarray, np.ndarray, dict[str, Path]]:
    paths = template_paths()
    vols, affine = [], None
    for tissue in TISSUES:
        data, canon_affine, _, _ = nifti.load_canonical(paths[tissue])
        data, affine = nifti.resample(data, canon_affine, spacing)
        vols.append(nifti.normalize(data, "mr"))
    return np.stack(vols), affine, paths


def _build(folder: Path, n: int, spacing, seed: int) -> None:
    stack, affine, paths = _load_templates(spacing)
    templates = torch.from_numpy(stack).unsqueeze(0)          # (1, 3, D, H, W)
    entries = []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        vol = subject(templates, rng, spacing)
        name = f"mni152_sub{k:02d}.npy"
        meta = {"source": str(paths["t1"]), "sha256": nifti.sha256(paths["t1"]),
                "spacing": list(spacing), "affine": np.asarray(affine).tolist(),
                "original_shape": list(stack.shape[1:]), "orientation": "RAS",
                "synthetic": {"seed": seed, "subject": k, "templates": [str(p) for p in
                                                                       paths.values()]}}
        meta = nifti.write_volume(folder / name, vol, meta)
        entries.append({"file": name, "shape": meta["shape"], "source": meta["source"],
                        "sha256": meta["sha256"]})
    nifti.write_manifest(folder, entries, spacing=list(spacing), intensity="mr", dtype="float32",
                         cohort={"n": n, "seed": seed, "kind": "mni152-synthetic"})


def subject(templates: torch.Tensor, rng: np.random.Generator, spacing) -> np.ndarray:
    """One synthetic subject ``(D, H, W)`` float32 in [0, 1] from ``templates`` (1, 3, D, H, W)."""
    size = templates.shape[2:]
    grid = _random_grid(size, rng, spacing)
    t1, gm, wm = F.grid_sample(templates, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=True)[0]
    w_gm, w_wm = rng.uniform(-0.25, 0.25, size=2)
    img = t1 + float(w_gm) * gm + float(w_wm) * wm
    img = img.clamp_min(0)
    img = (img / img.max().clamp_min(1e-6)) ** float(rng.uniform(0.7, 1.4))
    img = img * _bias_field(size, rng)
    img = img / img.max().clamp_min(1e-6)
    return img.numpy().astype(np.float32)


def _random_grid(size, rng: np.random.Generator, spacing) -> torch.Tensor:
    """``grid_sample`` grid (1, D, H, W, 3): a small random affine plus a smooth displacement of
    a few mm (control points every ~40 mm, upsampled trilinearly)."""
    ang = np.deg2rad(rng.uniform(-6, 6, size=3))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rot = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
           @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))
    mat = rot @ np.diag(rng.uniform(0.92, 1.08, size=3))
    shift = rng.uniform(-0.03, 0.03, size=3)
    theta = torch.tensor(np.concatenate([mat, shift[:, None]], 1), dtype=torch.float32)[None]
    grid = F.affine_grid(theta, (1, 1, *size), align_corners=True)
    ctrl = [max(2, math.ceil(s * sp / 40.0) + 1) for s, sp in zip(size, spacing, strict=True)]
    disp_mm = torch.from_numpy(rng.normal(0.0, 3.0, size=(1, 3, *ctrl)).astype(np.float32))
    disp = F.interpolate(disp_mm, size=tuple(size), mode="trilinear", align_corners=True)
    # mm -> normalized units per axis; grid channels are (x, y, z) = (W, H, D)
    extent = torch.tensor([(s - 1) * sp / 2 for s, sp in zip(size, spacing, strict=True)])
    disp = disp[0].permute(1, 2, 3, 0) / extent
    return grid + disp.flip(-1)[None]


def _bias_field(size, rng: np.random.Generator) -> torch.Tensor:
    coeff = torch.from_numpy(rng.normal(0.0, 0.08, size=(1, 1, 3, 3, 3)).astype(np.float32))
    field = F.interpolate(coeff, size=tuple(size), mode="trilinear", align_corners=True)
    return torch.exp(field[0, 0])
