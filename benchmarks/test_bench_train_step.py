"""One GVSL training step (transforms, forward, backward, Adam): the fast path against the
reference path and the original GVSL code's formulation, with a breakdown of where time goes.

Paths:
- fast: batched on-device transforms (fused kernels), custom ops (lncc, affine_warp,
  affine_flow_warp);
- reference: plain-torch transforms and the reference ops of gvsl_fast.ops.reference;
- original: per-sample numpy appearance transforms, the spatial augmentation as two
  grid_sample resamplings, the affine and deformable warps as two grid_sample calls, and the NCC
  as dense 9^3 convolutions (benchmarks/baselines.py).

On the GPU two more variants of the step are timed, with their peak memory: the fast step with
activation checkpointing (``--grad-checkpoint``), and, beside the AMP run, the original code in
float32, as its users run it (it has no AMP): the ratios a user switching from it would see.

Breakdown ("outside the convolutions"): the transforms of a batch plus the forward and backward
of the registration ops and losses on tensors shaped and laid out as in the step (32-channel
features, with the upstream gradient of their warp injected as the deformable head's backward
would return it); the convolutions are the rest of the step. CPU: 2x1x64^3. GPU: 2x1x128^3,
fp32 and AMP, with peak memory.

CPU process: ``gvsl-fast pretrain`` itself (cpu-short preset), which keeps freed memory in
glibc's heap for reuse (gvsl_fast.train.host_memory), against the same command with glibc's
malloc as it is; seconds per step and peak resident memory, both runs in the same test.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from baselines import (
    appearance_numpy,
    original_affine_then_deform,
    original_ncc,
    original_spatial_transformer,
)
from conftest import median_time, record, sync

from gvsl_fast.data import AppearanceTransform, SpatialTransform
from gvsl_fast.models import GVSL, UNet3D
from gvsl_fast.ops import reference
from gvsl_fast.train.host_memory import USER_SETTINGS


class OriginalGVSL(GVSL):
    """The same model with the original code's registration ops and order."""

    def __init__(self, **kw):
        super().__init__(fusion="code", **kw)

    def _op(self, name):
        def affine_warp(x, theta, align_corners=False):
            grid = F.affine_grid(theta, list(x.shape), align_corners=align_corners)
            return F.grid_sample(x, grid, align_corners=align_corners)

        return {"affine_warp": affine_warp, "warp": original_spatial_transformer,
                "lncc": lambda a, b, window: original_ncc(a, b, window)}[name]


def _transforms(path: str, device):
    app = AppearanceTransform(backend="torch" if path == "reference" else "auto")
    spatial = SpatialTransform()

    def run(a, b, g):
        if path == "original":
            rng = np.random.default_rng(0)
            a_np = a.cpu().numpy()
            a_t = torch.from_numpy(np.stack([appearance_numpy(x, rng) for x in a_np])).to(device)
            theta, flow = spatial.params(a, g)
            return tuple(original_affine_then_deform(v, theta, flow) for v in (a, a_t, b))
        a_t = app(a, generator=g)
        if path == "reference":
            theta, flow = spatial.params(a, g)
            x = torch.cat([a, a_t, b], 1)
            return reference.affine_flow_warp(x, theta, flow).split(1, 1)
        return spatial(a, a_t, b, generator=g)

    return run


def _model(path: str, device, grad_checkpoint: bool = False) -> GVSL:
    torch.manual_seed(0)
    if path == "original":
        return OriginalGVSL(backbone=UNet3D()).to(device)
    model = GVSL(UNet3D(grad_checkpoint=grad_checkpoint),
                 ops_backend="auto" if path == "fast" else "reference").to(device)
    # the fast path runs channels_last_3d, as the trainer does
    return model.to(memory_format=torch.channels_last_3d) if path == "fast" else model


def _layout(path: str, *xs):
    if path != "fast":
        return xs
    return tuple(x.contiguous(memory_format=torch.channels_last_3d) for x in xs)


def _step_fn(path: str, device, size, amp: bool, grad_checkpoint: bool = False):
    model = _model(path, device, grad_checkpoint)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    transforms = _transforms(path, device)
    gen = torch.Generator(device=device)
    a = torch.rand(2, 1, *size, device=device)
    b = torch.rand(2, 1, *size, device=device)

    def step():
        gen.manual_seed(0)
        a_, a_t, b_ = _layout(path, *transforms(a, b, gen))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(a_, a_t, b_)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _outside_fn(path: str, device, size):
    """Transforms + registration ops + losses, forward and backward, without the U-Net."""
    model = _model(path, device)
    transforms = _transforms(path, device)
    gen = torch.Generator(device=device)
    a = torch.rand(2, 1, *size, device=device)
    b = torch.rand(2, 1, *size, device=device)
    theta0 = torch.eye(3, 4, device=device).repeat(2, 1, 1) + 0.02 * torch.randn(2, 3, 4,
                                                                                  device=device)
    # the heads' outputs (local features, flow, restoration) and the gradient the deformable
    # head returns for the warped features, in the layout each path's step has them (the fast
    # U-Net and heads run channels_last_3d)
    feats, grad_feats, flow0, restored0 = _layout(
        path, torch.randn(2, 32, *size, device=device), torch.randn(2, 32, *size, device=device),
        torch.randn(2, 3, *size, device=device), torch.rand(2, 1, *size, device=device))

    def run():
        gen.manual_seed(0)
        a_, _, b_ = _layout(path, *transforms(a, b, gen))
        # fresh leaves on the same storage: no copies that the step would not make
        f, theta, flow, restored = (t.detach().requires_grad_()
                                    for t in (feats, theta0, flow0, restored0))
        moved_feats = model._op("affine_warp")(f, theta, align_corners=False)
        warped = model.warp_moving(a_, theta, flow)
        loss = (model._op("lncc")(warped, b_, window=9) + reference.smooth_loss(flow)
                + F.mse_loss(restored, a_))
        torch.autograd.backward((loss, moved_feats), (None, grad_feats))

    return run


def _measure(benchmark, device, size, amp: bool, rounds: int):
    paths = ("fast", "reference", "original")
    # (name, path, amp, activation checkpointing): the extra GPU variants, step time and memory
    variants = [(p, p, amp, False) for p in paths]
    if device.type == "cuda":
        variants.append(("fast_grad_checkpoint", "fast", amp, True))
        if amp:
            variants.append(("original_fp32", "original", False, False))
    full, outside, peak = {}, {}, {}
    for name, path, amp_, ckpt in variants:
        step = _step_fn(path, device, size, amp_, ckpt)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        full[name] = median_time(step, device, warmup=1, reps=rounds)
        if device.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated() / 2**20
        del step
        if name in paths:
            outside[name] = median_time(_outside_fn(path, device, size), device, warmup=1,
                                        reps=rounds)
    fast_step = _step_fn("fast", device, size, amp)

    def timed():
        fast_step()
        sync(device)

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    record(benchmark, seconds=benchmark.stats.stats.median, shape=(2, 1, *size),
           dtype=torch.bfloat16 if amp else torch.float32, backend="fast step", device=device,
           bytes_moved=0, baselines={"reference": full["reference"],
                                     "original": full["original"]}, per="step")
    info = benchmark.extra_info
    for name in full:
        info[f"{name}_step_s"] = round(full[name], 4)
        if name in outside:
            info[f"{name}_outside_convs_s"] = round(outside[name], 4)
            info[f"{name}_convs_s"] = round(full[name] - outside[name], 4)
        if peak:
            info[f"{name}_peak_mib"] = round(peak[name], 1)
    info["outside_convs_speedup_vs_original"] = round(outside["original"] / outside["fast"], 2)
    for base in ("original", "original_fp32"):
        for fast in ("fast", "fast_grad_checkpoint"):
            if base not in peak or fast not in peak:
                continue
            info[f"peak_memory_ratio_{fast}_over_{base}"] = round(peak[fast] / peak[base], 3)
            if (fast, base) != ("fast", "original"):  # that one is record's speedup_vs_original
                info[f"step_speedup_{fast}_vs_{base}"] = round(full[base] / full[fast], 2)


def test_train_step_cpu(benchmark):
    _measure(benchmark, torch.device("cpu"), (64, 64, 64), amp=False, rounds=3)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_train_step_gpu(benchmark, gpu, amp):
    _measure(benchmark, gpu, (128, 128, 128), amp=amp, rounds=5)


PRETRAIN_STEPS = 8
# `gvsl-fast pretrain` that writes its own peak resident memory (VmHWM) to $PEAK_FILE at exit:
# the child's ru_maxrss would also count this process's peak, which the kernel carries over
# when the child execs from vfork.
_PRETRAIN_REPORTING_PEAK = """
import atexit, os, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["PEAK_FILE"], "w") as f:
        f.write(str(kib))
atexit.register(_peak)
runpy.run_module("gvsl_fast.cli", run_name="__main__", alter_sys=True)
"""


def _pretrain_process(out: Path, cache: Path, env: dict[str, str]) -> tuple[float, int]:
    """Median seconds per step (the first left out) and peak resident bytes of one
    `gvsl-fast pretrain` process on the CPU (cpu-short preset)."""
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS} | env
    peak = out.with_suffix(".peak")
    env |= {"GVSL_FAST_CACHE": str(cache), "PEAK_FILE": str(peak)}
    cmd = [sys.executable, "-c", _PRETRAIN_REPORTING_PEAK, "pretrain", "--device", "cpu",
           "--steps", str(PRETRAIN_STEPS), "--out", str(out), "--no-progress", "--save-every",
           "1000"]
    log = out.with_suffix(".log")
    with log.open("w") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    assert code == 0, log.read_text()[-2000:]
    with (out / "history.csv").open() as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    return statistics.median(seconds[1:]), int(peak.read_text()) * 1024  # VmHWM is in KiB


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_pretrain_cpu_host_memory(benchmark, tmp_path):
    cache = tmp_path / "cache"
    # GLIBC_TUNABLES set (even empty): pretrain leaves malloc as it is
    default_step, default_rss = _pretrain_process(tmp_path / "default", cache,
                                                  {"GLIBC_TUNABLES": ""})
    runs = []
    benchmark.pedantic(lambda: runs.append(_pretrain_process(tmp_path / "kept", cache, {})),
                       rounds=1, iterations=1)
    step, rss = runs[0]
    record(benchmark, seconds=step, shape=(2, 1, 48, 48, 48), dtype=torch.float32,
           backend="gvsl-fast pretrain (cpu-short)", device="cpu", bytes_moved=0,
           baselines={"glibc_default_malloc": default_step}, per="step")
    benchmark.extra_info.update(
        steps=PRETRAIN_STEPS, peak_rss_mib=round(rss / 2**20),
        glibc_default_malloc_peak_rss_mib=round(default_rss / 2**20),
        peak_rss_ratio=round(rss / default_rss, 3))
