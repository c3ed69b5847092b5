"""Seeded random sweeps: every op on random small shapes (sizes 1 to 9, batch and channels 1 to
3), memory layouts, options and choices of which inputs require grad, against oracles outside
gvsl_fast: ``F.grid_sample`` and ``F.affine_grid`` for the samplers, compose and
affine_flow_warp; for lncc the float64 reference (conv3d window sums). The hand-picked tests cover
the edge cases we thought of; this covers the ones we did not (it found lncc's one-voxel
window). The emulated CUDA ops are swept against the CPU ones, at sizes that cross their tiles."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from common import OPS, affine_grid_composition, fast_backends, rel_err, tolerance

from gvsl_fast import ops
from gvsl_fast.ops import reference

BACKENDS = [(d, b) for d, b in fast_backends() if d == "cpu"]  # the GPU has its own suite
SEEDS = {"cpu": 24, "triton": 6}  # cases per op: the Triton interpreter is ~50x slower


def relayout(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """``t``'s values in a random layout: contiguous, channels_last_3d, a strided view, or a
    permuted one (the last two are copied by the ops, the first two taken as they are)."""
    kind = rng.randrange(4)
    if kind == 1:
        return t.contiguous(memory_format=torch.channels_last_3d)
    if kind == 2:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if kind == 3:
        return t.transpose(2, 4).contiguous().transpose(2, 4)
    return t.contiguous()


def voxel_grid(q: torch.Tensor) -> torch.Tensor:
    """Voxel positions (B, 3, D, H, W) in (d, h, w) as an ``F.grid_sample`` grid for
    ``align_corners=False`` (defined for every size, 1 included)."""
    size = torch.tensor(q.shape[2:], dtype=q.dtype).view(1, 3, 1, 1, 1)
    return ((2 * q + 1) / size - 1).permute(0, 2, 3, 4, 1).flip(-1)


def case(op: str, seed: int, float64: bool):
    """(fn(backend, *inputs), oracle(*float64 inputs), float64 inputs, which require grad, dtype)
    of one random case of `op`."""
    rng = random.Random(f"{op}-{seed}")
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    B, C = rng.randint(1, 3), rng.randint(1, 3)
    size = [rng.randint(1 if op in ("grid_sample", "warp") else 2, 9) for _ in range(3)]
    pad = rng.choice(["zeros", "border"])
    ac = rng.random() < 0.5
    dtype = rng.choice([torch.float32, torch.float64]) if float64 else torch.float32
    image = randn(B, C, *size)
    theta = torch.eye(3, 4, dtype=torch.float64) + randn(B, 3, 4, scale=rng.choice([0.05, 0.3]))
    flow = randn(B, 3, *size, scale=rng.choice([0.5, 2.0]))
    need = [rng.random() < 0.6 for _ in range(3)]
    if op == "grid_sample":
        mode = rng.choice(["bilinear", "nearest"])
        grid = randn(B, *[rng.randint(1, 7) for _ in range(3)], 3, scale=0.8)
        return (lambda be, x, q: ops.grid_sample(x, q, mode, pad, ac, backend=be),
                lambda x, q: F.grid_sample(x, q, mode, pad, ac),
                [image, grid], [need[0], need[1] and mode == "bilinear"], dtype)
    if op == "warp":
        mode = rng.choice(["bilinear", "nearest"])
        return (lambda be, x, f: ops.warp(x, f, mode, pad, backend=be),
                lambda x, f: F.grid_sample(x, voxel_grid(reference.identity_grid(size, f) + f),
                                           mode, pad, False),
                [image, flow], [need[0], need[1] and mode == "bilinear"], dtype)
    if op == "affine_warp":
        return (lambda be, x, t: ops.affine_warp(x, t, ac, pad, backend=be),
                lambda x, t: F.grid_sample(x, F.affine_grid(t, list(x.shape), align_corners=ac),
                                           "bilinear", pad, ac),
                [image, theta], need[:2], dtype)
    if op == "compose":
        return (lambda be, t, f: ops.compose(t, f, ac, pad, backend=be),
                lambda t, f: affine_grid_composition(t, f, ac, pad)[0],
                [theta, flow], need[:2], dtype)
    if op == "affine_flow_warp":
        return (lambda be, x, t, f: ops.affine_flow_warp(x, t, f, ac, pad, backend=be),
                lambda x, t, f: affine_grid_composition(t, f, ac, pad, x)[1],
                [image, theta, flow], need, dtype)
    window = rng.choice([1, 3, 5, 7, 9, 11])
    preset = rng.choice(["gvsl", "voxelmorph", "monai"])
    reduction = rng.choice(["mean", "sum", "none"])
    other = image + randn(B, C, *size, scale=rng.choice([0.1, 1.0]))
    if rng.random() < 0.3:
        image[..., : size[2] // 2] = 0.25  # a constant block
    return (lambda be, a, b: ops.lncc(a, b, window, reduction=reduction, preset=preset,
                                      backend=be),
            lambda a, b: reference.lncc(a, b, window, reduction=reduction, preset=preset),
            [image, other], need[:2], dtype)


@pytest.mark.parametrize(
    "device,backend,op,seed",
    [(d, b, op, s) for d, b in BACKENDS for op in OPS for s in range(SEEDS[b])],
    ids=lambda x: str(x))
def test_sweep(device, backend, op, seed):
    rng = random.Random(seed)
    fn, oracle, inputs, need, dtype = case(op, seed, backend == "cpu")
    ours = [relayout(t.to(dtype), rng) if t.dim() == 5 else t.to(dtype) for t in inputs]
    ours = [t.detach().requires_grad_(n) for t, n in zip(ours, need, strict=True)]
    # the oracle sees the values ours got (positions rounded to dtype), in float64
    theirs = [t.detach().double().requires_grad_(n) for t, n in zip(ours, need, strict=True)]
    out, want = fn(backend, *ours), oracle(*theirs)
    tol = 1e-10 if dtype == torch.float64 else tolerance(device, dtype)
    assert out.shape == want.shape and rel_err(out, want) <= tol, rel_err(out, want)
    if not any(need) or not want.requires_grad:
        return
    up = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad(out, [t for t in ours if t.requires_grad], up.to(out.dtype))
    ref = torch.autograd.grad(want, [t for t in theirs if t.requires_grad], up)
    for i, (x, r) in enumerate(zip(got, ref, strict=True)):
        assert rel_err(x, r) <= 10 * tol, f"gradient {i}: rel err {rel_err(x, r):.3g}"
