"""``gvsl-fast preprocess IN_DIR OUT_DIR``: NIfTI folder to a preprocessed ``.npy`` dataset.

Each ``.nii``/``.nii.gz`` under ``IN_DIR`` (recursively) is reoriented to canonical RAS,
resampled to ``--spacing`` with its header affine, normalized (``--intensity``) and written to
``OUT_DIR/<relative path>/<name>.npy`` with a JSON sidecar; ``OUT_DIR/manifest.json`` lists the
dataset. Re-running skips volumes whose sidecar records the same source checksum and settings.
Files that cannot be used (unreadable, 2-D, 4-D) are reported by name and skipped; the exit status
is 1 when any were, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gvsl_fast.cli import bounded
from gvsl_fast.data import nifti


@dataclass(frozen=True)
class Settings:
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    intensity: str = "mr"
    hu_offset: float = 0.0
    dtype: str = "float32"

    def as_dict(self) -> dict:
        return {"spacing": list(self.spacing), "intensity": self.intensity,
                "hu_offset": self.hu_offset, "dtype": self.dtype}


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    bytes_in: int = 0
    entries: list[dict] = field(default_factory=list)

    def line(self) -> str:
        return (f"preprocess: {self.done} converted, {self.skipped} already done, "
                f"{len(self.failed)} failed")


def output_path(src: Path, in_dir: Path, out_dir: Path) -> Path:
    rel = src.relative_to(in_dir)
    return out_dir / rel.parent / f"{nifti.stem(src)}.npy"


def _finished(npy: Path, checksum: str, settings: Settings) -> dict | None:
    """The sidecar of ``npy`` when it was made from this very source with these settings."""
    side = nifti.sidecar_path(npy)
    if not (npy.is_file() and side.is_file()):
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    same = meta.get("sha256") == checksum and meta.get("settings") == settings.as_dict()
    return meta if same else None


def convert(src: Path, npy: Path, settings: Settings) -> tuple[str, dict]:
    """Convert one file; returns ``("done" | "skipped", sidecar)``. Raises VolumeError."""
    checksum = nifti.sha256(src)
    meta = _finished(npy, checksum, settings)
    if meta is not None:
        return "skipped", meta
    data, canon_affine, orig_affine, orig_shape = nifti.load_canonical(src)
    data, affine = nifti.resample(data, canon_affine, settings.spacing)
    data = nifti.normalize(data, settings.intensity, settings.hu_offset)
    meta = {
        "source": str(src.resolve()),
        "sha256": checksum,
        "settings": settings.as_dict(),
        "spacing": list(settings.spacing),
        "affine": np.asarray(affine).tolist(),
        "original_affine": np.asarray(orig_affine).tolist(),
        "original_shape": list(orig_shape),
        "orientation": "RAS",
    }
    return "done", nifti.write_volume(npy, data.astype(settings.dtype), meta)


def _job(args: tuple[Path, Path, Settings]):
    src, npy, settings = args
    try:
        status, meta = convert(src, npy, settings)
        return src, npy, status, meta
    except nifti.VolumeError as exc:
        return src, npy, "failed", str(exc)


def preprocess(in_dir: Path, out_dir: Path, settings: Settings = Settings(), workers: int = 1,
               progress: bool = True) -> Summary:
    """Convert every NIfTI file under ``in_dir`` into ``out_dir`` and write the manifest.

    Raises:
        FileNotFoundError: ``in_dir`` does not exist, or holds no ``.nii``/``.nii.gz`` file.
        NotADirectoryError: ``in_dir`` or ``out_dir`` exists but is not a folder.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    nifti.require_folder(in_dir, "input folder")
    nifti.require_folder(out_dir, "output folder", missing_ok=True)
    sources = nifti.find_nifti(in_dir)
    if not sources:
        raise FileNotFoundError(f"no .nii or .nii.gz files found in {in_dir}")
    jobs, seen = [], {}
    summary = Summary()
    for src in sources:
        npy = output_path(src, in_dir, out_dir)
        if npy in seen:
            summary.failed.append(f"{src}: same output name as {seen[npy]}")
            continue
        seen[npy] = src
        jobs.append((src, npy, settings))
    bar = _progress(len(jobs), progress)
    t0 = time.perf_counter()
    for src, npy, status, meta in _run(jobs, workers):
        summary.bytes_in += src.stat().st_size
        if status == "failed":
            summary.failed.append(meta)
        else:
            summary.done += status == "done"
            summary.skipped += status == "skipped"
            summary.entries.append({"file": npy.relative_to(out_dir).as_posix(),
                                    "shape": meta["shape"], "source": meta["source"],
                                    "sha256": meta["sha256"]})
        bar.set_postfix_str(f"{summary.bytes_in / 1e6 / max(time.perf_counter() - t0, 1e-9):.1f}"
                            " MB/s in", refresh=False)
        bar.update(1)
    bar.close()
    if summary.entries:
        nifti.write_manifest(out_dir, summary.entries, **settings.as_dict())
    return summary


def _run(jobs, workers: int):
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_job, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_job, jobs)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="preprocess", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


# ---- command line ----------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``preprocess`` subcommand on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "preprocess", help="convert a folder of NIfTI images into a preprocessed .npy dataset",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_dir", type=Path, metavar="IN_DIR")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--spacing", type=bounded(float, 0, strict=True), nargs=3,
                   default=[1.0, 1.0, 1.0], metavar=("SX", "SY", "SZ"),
                   help="target voxel size in mm (default 1 1 1)")
    p.add_argument("--intensity", choices=nifti.INTENSITIES, default="mr",
                   help="ct: clip to [0, 2048] and / 2048; mr: min-max to [0, 1] (default mr)")
    p.add_argument("--hu-offset", type=bounded(float, -math.inf), default=0.0,  # any finite value
                   help="added before the CT clip; 1024 for Hounsfield units (default 0)")
    p.add_argument("--dtype", choices=nifti.DTYPES, default="float32")
    p.add_argument("--workers", type=bounded(int, 1), default=min(4, os.cpu_count() or 1))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the ``preprocess`` subcommand; returns the exit status."""
    settings = Settings(tuple(args.spacing), args.intensity, args.hu_offset, args.dtype)
    try:
        summary = preprocess(args.in_dir, args.out_dir, settings, workers=args.workers,
                             progress=not args.no_progress)
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"preprocess: {exc}", file=sys.stderr)
        return 2
    print(summary.line())
    for msg in summary.failed:
        print(f"  failed: {msg}", file=sys.stderr)
    return 1 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point equivalent to ``gvsl-fast preprocess ...``."""
    parser = argparse.ArgumentParser(prog="gvsl-fast")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
