"""lncc forward+backward (GVSL: only the warped image needs grad) against MONAI's loss, the
PyTorch reference and torch.compile(reference), with the memory floor of DESIGN §7."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import median_time, record, run_benchmark

from gvsl_fast.ops import lncc, reference

BYTES_PER_VOXEL = 20  # read I, J forward; read I, J and write dI backward (DESIGN §7)
CPU_BANDWIDTH = 28e9  # DESIGN §7: 2-core CPU copy bandwidth
GPU_BANDWIDTH = 3.0e12  # DESIGN §7: H100 measured


def fwd_bwd(loss_fn, sets):
    """A callable running loss + backward on the next input set (rotating)."""
    it = itertools.cycle(sets)

    def step():
        a, b = next(it)
        loss_fn(a, b).backward()
        a.grad = None

    return step


def input_sets(shape, device, count):
    g = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(count):
        a = torch.rand(shape, generator=g).to(device).requires_grad_(True)
        b = torch.rand(shape, generator=g).to(device)
        sets.append((a, b))
    return sets


def baselines(sets, device):
    """Median seconds of the baselines; MONAI's where it is installed (a test dependency, absent
    from some GPU images)."""
    ref = lambda a, b: reference.lncc(a, b, 9)
    out = {
        "reference": median_time(fwd_bwd(ref, sets), device, reps=3),
        "compiled_reference": median_time(fwd_bwd(torch.compile(ref), sets), device, warmup=2,
                                          reps=3),
    }
    try:
        from monai.losses import LocalNormalizedCrossCorrelationLoss
    except ImportError:
        return out
    monai = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9)
    out["monai"] = median_time(fwd_bwd(monai, sets), device, reps=3)
    return out


def test_lncc_cpu(benchmark, cpu_extension):
    shape = (1, 1, 128, 128, 128)
    sets = input_sets(shape, "cpu", 1)
    base = baselines(sets, "cpu")
    ours = fwd_bwd(lambda a, b: lncc(a, b, 9, backend="cpu"), sets)
    seconds = run_benchmark(benchmark, ours, "cpu", rounds=10)
    voxels = torch.Size(shape).numel()
    record(benchmark, seconds=seconds, shape=shape, dtype=torch.float32, backend="cpu",
           device="cpu", bytes_moved=BYTES_PER_VOXEL * voxels, baselines=base,
           floor_seconds=BYTES_PER_VOXEL * voxels / CPU_BANDWIDTH)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_lncc_gpu(benchmark, gpu, backend):
    shape = (2, 1, 160, 160, 128)
    sets = input_sets(shape, gpu, 3)  # 3 x 52 MB: more than L2
    base = baselines(sets, gpu)
    ours = fwd_bwd(lambda a, b: lncc(a, b, 9, backend=backend), sets)
    seconds = run_benchmark(benchmark, ours, gpu, rounds=50, warmup=5)
    voxels = torch.Size(shape).numel()
    record(benchmark, seconds=seconds, shape=shape, dtype=torch.float32, backend=backend,
           device=gpu, bytes_moved=BYTES_PER_VOXEL * voxels, baselines=base,
           floor_seconds=BYTES_PER_VOXEL * voxels / GPU_BANDWIDTH)
