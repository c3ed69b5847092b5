"""Trilinear sampling forward+backward (DESIGN §7), fast backends against PyTorch baselines timed
in the same run.

(a) ``warp``, 1 channel, gradient w.r.t. the flow only (the image is data), against VoxelMorph's
    ``F.grid_sample`` path (grid built from the flow) and ``torch.compile(reference.warp)``;
(b) ``affine_warp``, 32 channels, gradients w.r.t. image and theta (GVSL's feature warp), against
    ``F.affine_grid`` + ``F.grid_sample`` and ``torch.compile(reference.affine_warp)``.

CPU: 1 x C x 128^3. GPU (``gpu`` fixture): 2 x C x 160 x 160 x 128, with no input cached between
calls: (a) rotates over 4 input sets (one set's image, 26 MB, would fit in an H100's 50 MB L2);
each tensor of (b) is larger than L2. Compulsory bytes per voxel (float32): (a) 52 (flow read
twice and its gradient written, 36; image read twice, 8; grad_out read and output written, 8);
(b) 24 per channel (image read twice, output written, grad_out read, image gradient zeroed and
written).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import median_time, record, run_benchmark

from gvsl_fast.ops import affine_warp, reference, warp

CPU_SPATIAL = (128, 128, 128)
GPU_SPATIAL = (160, 160, 128)
BANDWIDTH = {"cpu": 28e9, "cuda": 3.0e12}  # DESIGN §7 copy bandwidths
BYTES_A = 52  # per voxel
BYTES_B_PER_CHANNEL = 24


def _voxelmorph_grid_sample(image, flow):
    """VoxelMorph's SpatialTransformer: identity + flow, normalized, F.grid_sample."""
    size = flow.shape[2:]
    locs = reference.identity_grid(size, flow) + flow
    scale = torch.tensor([2.0 / (s - 1) for s in size], device=flow.device).view(1, 3, 1, 1, 1)
    locs = (locs * scale - 1).permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
    return F.grid_sample(image, locs, align_corners=True)


def _torch_affine_warp(image, theta):
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, align_corners=False)


def _fwd_bwd(fn, sets, wanted):
    """One forward+backward per call, cycling over ``sets`` of (inputs, grad_out); the gradients
    of the inputs at positions ``wanted``."""
    cycle = itertools.cycle(sets)

    def step():
        inputs, grad_out = next(cycle)
        return torch.autograd.grad(fn(*inputs), [inputs[i] for i in wanted], grad_out)

    return step


def _baselines(device, make_step, ref_fn, torch_fn):
    """Median seconds of the PyTorch baselines, measured here."""
    out = {"grid_sample": median_time(make_step(torch_fn), device, warmup=1, reps=3)}
    compiled = torch.compile(ref_fn)
    out["compiled_reference"] = median_time(make_step(compiled), device, warmup=2, reps=3)
    return out


def _case_a(benchmark, device, backend, shape):
    torch.manual_seed(0)
    sets = []
    for _ in range(4 if torch.device(device).type == "cuda" else 1):
        image = torch.randn(shape, device=device)
        flow = (torch.randn(shape[0], 3, *shape[2:], device=device) * 2).requires_grad_()
        sets.append(((image, flow), torch.randn(shape, device=device)))

    def make_step(fn):
        return _fwd_bwd(fn, sets, (1,))

    step = make_step(lambda i, f: warp(i, f, backend=backend))
    seconds = run_benchmark(benchmark, step, device, rounds=5)
    base = _baselines(device, make_step, reference.warp, _voxelmorph_grid_sample)
    voxels = image[:, 0].numel()
    record(benchmark, seconds=seconds, shape=shape, dtype=image.dtype, backend=backend,
           device=device, bytes_moved=BYTES_A * voxels, baselines=base,
           floor_seconds=BYTES_A * voxels / BANDWIDTH[torch.device(device).type])


def _case_b(benchmark, device, backend, shape, layout=torch.contiguous_format):
    torch.manual_seed(0)
    image = torch.randn(shape, device=device).contiguous(memory_format=layout).requires_grad_()
    theta = (torch.eye(3, 4, device=device).repeat(shape[0], 1, 1)
             + 0.1 * torch.randn(shape[0], 3, 4, device=device)).requires_grad_()
    grad_out = torch.randn(shape, device=device).contiguous(memory_format=layout)

    def make_step(fn):
        return _fwd_bwd(fn, [((image, theta), grad_out)], (0, 1))

    step = make_step(lambda i, t: affine_warp(i, t, backend=backend))
    seconds = run_benchmark(benchmark, step, device, rounds=3)
    base = _baselines(device, make_step, reference.affine_warp, _torch_affine_warp)
    moved = BYTES_B_PER_CHANNEL * image.numel()
    record(benchmark, seconds=seconds, shape=shape, dtype=image.dtype, backend=backend,
           device=device, bytes_moved=moved, baselines=base,
           floor_seconds=moved / BANDWIDTH[torch.device(device).type])


def test_bench_warp_flow_grad_cpu(benchmark, cpu_extension):
    _case_a(benchmark, "cpu", "cpu", (1, 1, *CPU_SPATIAL))


def test_bench_affine_warp_32ch_cpu(benchmark, cpu_extension):
    _case_b(benchmark, "cpu", "cpu", (1, 32, *CPU_SPATIAL))


def test_bench_affine_warp_32ch_channels_last_cpu(benchmark, cpu_extension):
    """(b) with the features channels_last_3d, as the trainer keeps them (the CPU's
    channel-vector loops); baselines get the same layout."""
    _case_b(benchmark, "cpu", "cpu", (1, 32, *CPU_SPATIAL), torch.channels_last_3d)


@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_bench_warp_flow_grad_gpu(benchmark, gpu, backend):
    _case_a(benchmark, gpu, backend, (2, 1, *GPU_SPATIAL))


@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_bench_affine_warp_32ch_gpu(benchmark, gpu, backend):
    _case_b(benchmark, gpu, backend, (2, 32, *GPU_SPATIAL))
