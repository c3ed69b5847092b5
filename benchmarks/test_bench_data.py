"""Data pipeline throughput: pairs per second of 128^3 crops from each loader, and the batched
appearance / spatial transforms against the original per-sample numpy approach.

CPU:  pytest benchmarks/test_bench_data.py --benchmark-only
GPU cases use the ``gpu`` fixture (skipped without CUDA).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from baselines import appearance_numpy
from conftest import median_time, record, run_benchmark

from gvsl_fast.data import AppearanceTransform, SpatialTransform, demo_cohort, loader, make_loader

PATCH = (128, 128, 128)
BATCH = 2
VOXELS = BATCH * int(np.prod(PATCH))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four 1 mm subjects (197x233x189) from the MNI152 templates."""
    return demo_cohort(tmp_path_factory.mktemp("bench-data"), n=4, spacing=1.0)


def _loader_case(benchmark, cohort, kind, device):
    ld = make_loader(cohort, patch=PATCH, batch_size=BATCH, seed=0, kind=kind, device=device,
                     workers=2)
    it = iter(ld)

    def step():
        a, b = next(it)
        return a.sum() + b.sum()                   # touch the data on the device

    sec = run_benchmark(benchmark, step, device, rounds=10, warmup=2)
    record(benchmark, seconds=sec, shape=(BATCH, 1, *PATCH), dtype=torch.float32,
           backend=f"loader-{kind}", device=device, bytes_moved=2 * VOXELS * 4)
    benchmark.extra_info["pairs_per_s"] = round(BATCH / sec, 2)
    ld.close()


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_loader_cpu(benchmark, cohort, kind):
    if kind == "dali" and loader.dali_error():
        pytest.skip(loader.dali_error())
    _loader_case(benchmark, cohort, kind, torch.device("cpu"))


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_loader_gpu(benchmark, cohort, kind, gpu):
    if kind == "dali" and loader.dali_error():
        pytest.skip(loader.dali_error())
    _loader_case(benchmark, cohort, kind, gpu)


def _numpy_per_sample(x: torch.Tensor) -> float:
    """Seconds per sample of the original approach (per-sample numpy on the CPU)."""
    rng = np.random.default_rng(0)
    sample = x[0].float().cpu().numpy()
    return median_time(lambda: appearance_numpy(sample.copy(), rng), "cpu", warmup=1, reps=3)


def _appearance_case(benchmark, device):
    x = torch.rand(BATCH, 1, *PATCH, device=device)
    g = torch.Generator(device).manual_seed(0)
    t = AppearanceTransform()
    sec = run_benchmark(benchmark, lambda: t(x, g), device, rounds=5, warmup=1)
    per_sample = sec / BATCH
    record(benchmark, seconds=per_sample, shape=x.shape, dtype=x.dtype,
           backend=f"appearance-{'triton' if x.is_cuda else 'cpu'}", device=device,
           bytes_moved=8 * VOXELS // BATCH,
           baselines={"numpy_per_sample": _numpy_per_sample(x)}, per="sample")
    benchmark.extra_info["samples_per_s"] = round(1 / per_sample, 2)


def test_appearance_cpu(benchmark):
    _appearance_case(benchmark, torch.device("cpu"))


def test_appearance_gpu(benchmark, gpu):
    _appearance_case(benchmark, gpu)


def test_spatial_gpu(benchmark, gpu):
    """A, A_t and B warped alike (one resampling of three channels) per step."""
    vols = [torch.rand(BATCH, 1, *PATCH, device=gpu) for _ in range(3)]
    g = torch.Generator(gpu).manual_seed(0)
    s = SpatialTransform()
    sec = run_benchmark(benchmark, lambda: s(*vols, generator=g), gpu, rounds=5, warmup=1)
    record(benchmark, seconds=sec, shape=(BATCH, 3, *PATCH), dtype=torch.float32,
           backend="spatial-reference-warp", device=gpu, bytes_moved=3 * VOXELS * 8)
    benchmark.extra_info["samples_per_s"] = round(BATCH / sec, 2)
