"""compose and affine_flow_warp, forward + backward at 1 x 3 x 128^3 (DESIGN §7).

Baselines timed in the same test:
- ``reference``: gvsl_fast.ops.reference (compose, then warp by psi for affine_flow_warp);
- ``two_resample``: the original GVSL code's path, image(M(p + u(p))) as two successive
  ``F.grid_sample`` calls (affine grid, then identity + flow);
- ``grid_sample_warp``: a plain warp of the same size, ``F.grid_sample`` of identity + flow with
  the gradient to flow;
- ``warp``: the same plain warp through this backend's own ``warp`` op (the target is
  affine_flow_warp <= 1.3x of it: the composition nearly free);
- ``deterministic`` (GPU): the op itself with ``deterministic=True`` (fixed-point scatters).
The image does not require grad (as in GVSL); theta and flow do.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import median_time, record, run_benchmark

from gvsl_fast.ops import affine_flow_warp, compose, warp
from gvsl_fast.ops import reference as R

SIZE = (128, 128, 128)
BANDWIDTH = {"cpu": 28e9, "cuda": 3.0e12}  # DESIGN §7: 2-core CPU copy bandwidth, H100 HBM3
# compulsory bytes per voxel, float32, fwd + bwd: flow read twice and its gradient written,
# compose also psi written and its gradient read; affine_flow_warp the image read twice and the
# output written, its gradient read (C = 1)
BYTES_PER_VOXEL = {"compose": 5 * 12, "affine_flow_warp": 3 * 12 + 4 * 4}


def flow_grid(flow: torch.Tensor) -> torch.Tensor:
    """identity + flow as an ``F.grid_sample`` grid (align_corners=True), (x, y, z) last."""
    size = flow.shape[2:]
    scale = torch.tensor([2 / (s - 1) for s in size], device=flow.device).view(1, 3, 1, 1, 1)
    pos = R.identity_grid(size, flow) + flow
    return (pos * scale - 1).permute(0, 2, 3, 4, 1).flip(-1)


def two_resample(image, theta, flow):
    """The original GVSL code's order: the affine resampling, then the deformable one."""
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    moved = F.grid_sample(image, grid, align_corners=False)
    return F.grid_sample(moved, flow_grid(flow), align_corners=True)


def grid_sample_warp(image, theta, flow):
    return F.grid_sample(image, flow_grid(flow), align_corners=True)


def make_sets(device, count: int):
    """`count` input sets (theta, flow, image, incoming gradient); on the GPU enough of them that
    one pass over all exceeds L2."""
    g = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(count):
        theta = torch.eye(3, 4) + 0.05 * torch.randn(1, 3, 4, generator=g)
        coarse = 2 * torch.randn(1, 3, 8, 8, 8, generator=g)  # a smooth flow of a few voxels
        flow = F.interpolate(coarse, size=SIZE, mode="trilinear", align_corners=True)
        image = torch.rand(1, 1, *SIZE, generator=g)
        grad = torch.randn(1, 3, *SIZE, generator=g)
        theta, flow, image, grad = (t.to(device) for t in (theta, flow, image, grad))
        sets.append((theta.requires_grad_(), flow.requires_grad_(), image, grad))
    return sets


def fwd_bwd(fn, sets, out_channels: int):
    """A closure running fn forward and backward (to theta and flow) on the next input set."""
    cycle = itertools.cycle(sets)

    def step():
        theta, flow, image, grad = next(cycle)
        out = fn(image, theta, flow)
        torch.autograd.grad(out, [theta, flow], grad[:, :out_channels], allow_unused=True)

    return step


def _bench(benchmark, device, backend, op: str):
    sets = make_sets(device, 4 if torch.device(device).type == "cuda" else 1)
    fast = {
        "compose": lambda im, th, fl: compose(th, fl, backend=backend),
        "affine_flow_warp": lambda im, th, fl: affine_flow_warp(im, th, fl, backend=backend),
    }[op]
    out_channels = 3 if op == "compose" else 1
    if op == "compose":
        baselines = {"reference": lambda im, th, fl: R.compose(th, fl)}
    else:
        baselines = {"reference": R.affine_flow_warp, "two_resample": two_resample,
                     "grid_sample_warp": grid_sample_warp,
                     "warp": lambda im, th, fl: warp(im, fl, backend=backend)}
    if torch.device(device).type == "cuda":  # the price of fixed-point scatters (the CPU's
        # backward is deterministic anyway)
        baselines["deterministic"] = {
            "compose": lambda im, th, fl: compose(th, fl, deterministic=True, backend=backend),
            "affine_flow_warp": lambda im, th, fl: affine_flow_warp(
                im, th, fl, deterministic=True, backend=backend),
        }[op]
    times = {name: median_time(fwd_bwd(fn, sets, out_channels), device, reps=3)
             for name, fn in baselines.items()}
    seconds = run_benchmark(benchmark, fwd_bwd(fast, sets, out_channels), device)
    nbytes = BYTES_PER_VOXEL[op] * SIZE[0] * SIZE[1] * SIZE[2]
    record(benchmark, seconds=seconds, shape=(1, 3, *SIZE), dtype=torch.float32, backend=backend,
           device=device, bytes_moved=nbytes, baselines=times,
           floor_seconds=nbytes / BANDWIDTH[torch.device(device).type])


@pytest.mark.parametrize("op", ["compose", "affine_flow_warp"])
def test_bench_cpu(benchmark, cpu_extension, op):
    _bench(benchmark, "cpu", "cpu", op)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", ["compose", "affine_flow_warp"])
def test_bench_gpu(benchmark, gpu, op, backend):
    _bench(benchmark, gpu, backend, op)
