"""Batches of image pairs (A, B) for the training step, from a preprocessed dataset.

Every batch is a pure function of ``(seed, rank, world_size, step)``: the volumes paired and the
crop corners are drawn from ``numpy.random.default_rng([seed, rank, step])`` by
:class:`PairSampler`, so resuming at step N reproduces the stream exactly, and the two loaders
(DALI and the torch fallback) fed the same plan deliver identical batches.

Sharding for DDP: when the dataset has at least two volumes per rank, rank ``r`` draws only from
volumes ``r, r + world_size, ...`` (disjoint shares); otherwise every rank draws from all volumes,
and the ranks still differ because the rank is part of the random stream.

Crops: a patch ``P`` from an axis of length ``S`` starts at a random index in
``[min(0, S - P), max(0, S - P)]``; where the patch leaves the volume (only when ``S < P``) it is
padded with zeros, so volumes smaller than the patch are used, not rejected.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gvsl_fast.data import nifti

log = logging.getLogger("gvsl_fast.data")
KINDS = ("auto", "dali", "torch")


@dataclass(frozen=True)
class Plan:
    """What batch ``step`` holds: volume indices (into the dataset) and crop corners (D, H, W)."""

    a: np.ndarray          # (B,) int
    b: np.ndarray          # (B,) int, b[i] != a[i]
    start_a: np.ndarray    # (B, 3) int, may be negative (padding)
    start_b: np.ndarray    # (B, 3) int


class PairSampler:
    """Draws the pairs and crops of each step for one rank (see the module docstring)."""

    def __init__(self, shapes: Sequence[Sequence[int]], patch: Sequence[int], batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        if len(shapes) < 2:
            raise ValueError(f"need at least 2 volumes to pair different images, got {len(shapes)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"bad batch_size {batch_size} or patch {tuple(patch)}")
        self.shapes = np.asarray(shapes, dtype=np.int64)
        self.patch = np.asarray(patch, dtype=np.int64)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        n = len(shapes)
        self.share = (np.arange(rank, n, world_size) if n >= 2 * world_size
                      else np.arange(n))

    def plan(self, step: int) -> Plan:
        rng = np.random.default_rng([self.seed, self.rank, step])
        n, bs = len(self.share), self.batch_size
        ia = rng.integers(0, n, size=bs)
        ib = (ia + rng.integers(1, n, size=bs)) % n
        a, b = self.share[ia], self.share[ib]
        return Plan(a, b, self._starts(rng, a), self._starts(rng, b))

    def _starts(self, rng: np.random.Generator, idx: np.ndarray) -> np.ndarray:
        room = self.shapes[idx] - self.patch                        # (B, 3)
        lo, hi = np.minimum(room, 0), np.maximum(room, 0)
        return lo + np.floor(rng.random(room.shape) * (hi - lo + 1)).astype(np.int64)


def crop(volume: np.ndarray, start: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """``volume[start : start + patch]`` as float32, zero where the window leaves the volume."""
    out = np.zeros(tuple(patch), dtype=np.float32)
    src, dst = [], []
    for s0, p, n in zip(start, patch, volume.shape, strict=True):
        lo, hi = max(s0, 0), min(s0 + p, n)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s0, lo - s0 + max(hi - lo, 0)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


class PairLoader:
    """Yields ``(A, B)``, each ``(batch, 1, *patch)`` float32 on ``device``, A and B from
    different volumes. ``batch(step)`` gives any step; iterating continues from ``self.step``.

    Attributes:
        kind: ``"dali"`` or ``"torch"``.
        reason: why this kind was chosen.
        files: the dataset's volumes, in manifest order (the plan's indices point here).
    """

    kind = ""

    def __init__(self, files: list[Path], sampler: PairSampler, device: torch.device,
                 reason: str):
        self.files, self.sampler, self.device, self.reason = files, sampler, device, reason
        self.step = 0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            out = self.batch(self.step)
            self.step += 1
            yield out

    def state_dict(self) -> dict:
        s = self.sampler
        return {"step": self.step, "seed": s.seed, "rank": s.rank, "world_size": s.world_size,
                "batch_size": s.batch_size, "patch": s.patch.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state["step"]``; the stream must be the same (seed, rank, ...)."""
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "batch_size", "patch"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader "
                                 f"{mine[key]!r}: the data stream would differ")
        self.step = int(state["step"])

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B, *patch) -> A, B of (B, 1, *patch) on the device."""
        bs = self.sampler.batch_size
        x = x.to(self.device, torch.float32, non_blocking=True).unsqueeze(1)
        return x[:bs], x[bs:]

    def close(self) -> None:
        """Release the worker threads or the DALI pipeline."""


class TorchPairLoader(PairLoader):
    """Memory-mapped ``.npy`` volumes, crops assembled by a pool of worker threads; while
    iterating, up to ``workers`` batches are prepared ahead."""

    kind = "torch"

    def __init__(self, files, sampler, device, reason, workers: int = 2):
        super().__init__(files, sampler, device, reason)
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="gvsl-loader")
        self._volumes = [np.load(f, mmap_mode="r") for f in files]

    @staticmethod
    def held_bytes(workers: int, batch_size: int, patch: Sequence[int]) -> int:
        """Bytes of the batches this loader holds while iterating: ``max(1, workers)``
        prepared ahead, the one in use and the next one's crops, each (2B, *patch) float32."""
        return (max(1, workers) + 2) * 2 * batch_size * math.prod(patch) * 4

    def _assemble(self, step: int) -> torch.Tensor:
        p = self.sampler.plan(step)
        patch = tuple(self.sampler.patch.tolist())
        idx = np.concatenate([p.a, p.b])
        starts = np.concatenate([p.start_a, p.start_b])
        x = torch.from_numpy(np.stack([crop(self._volumes[i], s, patch)
                                       for i, s in zip(idx, starts, strict=True)]))
        return x.pin_memory() if self.device.type == "cuda" else x

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(self._assemble(step))

    def __iter__(self):
        ahead: deque = deque()
        while True:
            while len(ahead) < self.workers:
                ahead.append(self._pool.submit(self._assemble, self.step + len(ahead)))
            out = self._split(ahead.popleft().result())
            self.step += 1
            yield out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def dali_error() -> str | None:
    """Why NVIDIA DALI cannot be used, or None."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as exc:
        return f"nvidia.dali is not importable ({exc})"
    return None


_said: set[str] = set()


def choose_kind(kind: str, device: torch.device) -> tuple[str, str]:
    """``(kind, reason)`` for a requested kind; ``auto`` takes DALI on a GPU when importable."""
    if kind not in KINDS:
        raise ValueError(f"loader kind must be one of {KINDS}, got {kind!r}")
    why = dali_error()
    if kind == "dali":
        if why:
            raise RuntimeError(f"--loader dali is not available: {why}")
        where = "GPU reader" if device.type == "cuda" else "CPU pipeline"
        return "dali", f"asked for DALI ({where})"
    if kind == "torch":
        return "torch", "asked for the torch loader"
    if device.type != "cuda":
        reason = f"auto: torch loader, the training device is {device} (DALI is used on a GPU)"
    elif why:
        reason = f"auto: torch loader, {why}"
    else:
        return "dali", f"auto: DALI GPU reader on {device} (nvidia.dali importable)"
    return "torch", reason


def make_loader(data_dir: Path, *, patch: tuple[int, int, int], batch_size: int, seed: int,
                kind: str = "auto", device: torch.device | str = "cpu", rank: int = 0,
                world_size: int = 1, workers: int = 2) -> PairLoader:
    """A :class:`PairLoader` over the preprocessed dataset in ``data_dir``.

    Args:
        data_dir: folder with ``manifest.json`` (see :func:`gvsl_fast.data.prepare_dataset`).
        patch: crop size (D, H, W).
        batch_size: pairs per batch.
        seed: stream seed; batch ``step`` depends only on (seed, rank, world_size, step).
        kind: ``"dali"``, ``"torch"`` or ``"auto"`` (DALI on a GPU when importable).
        device: where the batches are delivered.
        rank, world_size: this process's share of the data (see the module docstring).
        workers: loader threads (torch) or DALI CPU threads.

    Raises:
        FileNotFoundError / ValueError: no manifest, fewer than two volumes, bad arguments.
        RuntimeError: ``kind="dali"`` without an importable DALI.
    """
    device = torch.device(device)
    manifest = nifti.read_manifest(Path(data_dir))
    files = [Path(data_dir) / v["file"] for v in manifest["volumes"]]
    try:
        sampler = PairSampler([v["shape"] for v in manifest["volumes"]], patch, batch_size, seed,
                              rank, world_size)
    except ValueError as exc:  # name the dataset (one volume, say)
        raise ValueError(f"{data_dir}: {exc}") from exc
    kind, reason = choose_kind(kind, device)
    if reason not in _said:
        _said.add(reason)
        log.info("data loader: %s", reason)
    if kind == "dali":
        from gvsl_fast.data.dali import DaliPairLoader

        return DaliPairLoader(files, sampler, device, reason, workers=workers)
    return TorchPairLoader(files, sampler, device, reason, workers=workers)
