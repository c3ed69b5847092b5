"""The CUDA ops' own sources (csrc/cuda/*.cu), built for the host and run with a host thread per
CUDA thread (csrc/cuda/emulate.h; the ``cuda_emulated`` fixture): their kernels, launch
configuration, grid slicing, shared-memory tiles, barriers, warp shuffles, atomics and
reductions, against the CPU backend's ops of the same schema (themselves checked against the
reference) and, for lncc's precision cases, against the float64 reference.

The emulation slices grid axes y and z at 2 blocks instead of 65535 (so batches of 5 take three
launches) and plans lncc's depth chunks for an H100's 132 SMs. It checks the kernels' logic and
arithmetic, not the GPU's timing, memory model or compiler: tests/test_triton_compile.py and the
CUDA build do not replace a GPU run either."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from common import HALF, rel_err, tolerance, volumes
from conftest import EMULATE_ASAN

from gvsl_fast.ops import reference
from gvsl_fast.ops.lncc import PRESETS, REDUCTIONS_CODE, grad_of_cc

CPU = torch.ops.gvsl_fast
DTYPES = (torch.float32, *HALF)
BATCH = 5  # three launches of at most 2 batch elements
MODES = {"bilinear": 0, "nearest": 1}
PADDINGS = {"zeros": 0, "border": 1}


def check(got, want, dtype: torch.dtype, what: str = "") -> None:
    """Same shape, dtype and values (DESIGN §6's CUDA tolerance) for one tensor or a sequence,
    inf and NaN in the same places; empty tensors (gradients not asked for) must stay empty."""
    if isinstance(got, torch.Tensor):
        got, want = [got], [want]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype, (what, i, g.shape, w.shape)
        if w.numel():
            fin = torch.isfinite(w)  # non-finite results: the same ones, in the same places
            assert torch.equal(torch.isfinite(g), fin), f"{what} output {i}: non-finite elsewhere"
            assert torch.equal(g[~fin].nan_to_num(), w[~fin].nan_to_num()), f"{what} output {i}"
            err = rel_err(g.where(fin, 0), w.where(fin, 0))
            assert err <= tolerance("cuda", dtype), f"{what} output {i}: rel err {err:.3g}"


def inputs(*shapes, dtype=torch.float32, channels_last=False, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        t = (scale * torch.randn(shape, generator=g)).to(dtype)
        if channels_last and t.dim() == 5:
            t = t.contiguous(memory_format=torch.channels_last_3d)
        out.append(t)
    return out


def near_identity(batch: int, spread: float = 0.2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(3, 4).repeat(batch, 1, 1) + spread * torch.randn(batch, 3, 4, generator=g)


ASKED = ((True, True), (True, False), (False, True))


def check_sampler(emu, name: str, image, pos, options, dtype, deterministic: bool):
    """``<name>_forward(image, pos, *options, deterministic)`` and its backward, every gradient
    asked for together and alone, emulated CUDA against the CPU backend."""
    fwd, bwd = f"{name}_forward", f"{name}_backward"
    out = getattr(emu, fwd)(image, pos, *options, deterministic)
    want = getattr(CPU, fwd)(image, pos, *options, deterministic)
    check(out, want, dtype, fwd)
    assert out.stride() == want.stride()  # the image's layout
    go = inputs(out.shape, dtype=dtype, seed=5)[0]
    for asked in ASKED:
        args = (go, image, pos, *options, deterministic, *asked)
        check(getattr(emu, bwd)(*args), getattr(CPU, bwd)(*args), dtype, f"{bwd} {asked}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_warp(cuda_emulated, mode, padding, channels_last, dtype):
    image, flow = inputs((BATCH, 3, 6, 7, 9), (BATCH, 3, 6, 7, 9), dtype=dtype,
                         channels_last=channels_last, scale=2.5)
    for deterministic in (False, True):
        check_sampler(cuda_emulated, "warp", image, flow, (MODES[mode], PADDINGS[padding]),
                      dtype, deterministic)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_grid_sample(cuda_emulated, mode, padding, align_corners, dtype):
    image, grid = inputs((BATCH, 2, 6, 7, 9), (BATCH, 4, 5, 6, 3), dtype=dtype, scale=0.7)
    check_sampler(cuda_emulated, "grid_sample", image, grid,
                  (MODES[mode], PADDINGS[padding], align_corners), dtype, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding", PADDINGS)
def test_affine_warp(cuda_emulated, padding, align_corners, channels_last, dtype):
    (image,) = inputs((BATCH, 3, 6, 7, 9), dtype=dtype, channels_last=channels_last)
    theta = near_identity(BATCH).to(dtype)
    for deterministic in (False, True):
        check_sampler(cuda_emulated, "affine_warp", image, theta,
                      (PADDINGS[padding], align_corners), dtype, deterministic)


def test_deterministic_image_gradient_is_bitwise_reproducible(cuda_emulated):
    """deterministic=True: the image gradient's fixed-point atomics give the same bits whatever
    order the threads add in; many flows land on few voxels."""
    image, flow = inputs((BATCH, 2, 6, 7, 9), (BATCH, 3, 6, 7, 9), scale=0.3)
    go = inputs(image.shape, seed=3)[0]
    args = (go, image, flow, 0, 0, True, True, False)
    first = cuda_emulated.warp_backward(*args)[0]
    assert all(torch.equal(first, cuda_emulated.warp_backward(*args)[0]) for _ in range(3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding", PADDINGS)
def test_compose_and_affine_flow_warp(cuda_emulated, padding, align_corners, channels_last,
                                      dtype):
    image, flow = inputs((BATCH, 2, 6, 7, 9), (BATCH, 3, 6, 7, 9), dtype=dtype,
                         channels_last=channels_last, scale=2.0)
    theta = near_identity(BATCH, 0.15).to(dtype)
    for deterministic in (False, True):
        check_compose(cuda_emulated, image, theta, flow,
                      (align_corners, PADDINGS[padding], deterministic), dtype)


def check_compose(emu, image, theta, flow, opts, dtype):
    """compose_{fwd,bwd} and affine_flow_warp_{fwd,bwd} with options ``opts`` (align_corners,
    padding, deterministic), every choice of gradients, emulated CUDA against the CPU backend."""
    out = emu.compose_fwd(theta, flow, *opts)
    check(out, CPU.compose_fwd(theta, flow, *opts), dtype, "compose_fwd")
    go = inputs(out.shape, dtype=dtype, seed=5)[0]
    for asked in ASKED:
        args = (go, theta, flow, *opts, *asked)
        check(emu.compose_bwd(*args), CPU.compose_bwd(*args), dtype, f"compose {asked} {opts}")
    out = emu.affine_flow_warp_fwd(image, theta, flow, *opts)
    check(out, CPU.affine_flow_warp_fwd(image, theta, flow, *opts), dtype, "afw_fwd")
    go = inputs(out.shape, dtype=dtype, seed=6)[0]
    for asked in ((True, True, True), (True, False, False), (False, True, False),
                  (False, False, True), (False, True, True)):
        args = (go, image, theta, flow, *opts, *asked)
        check(emu.affine_flow_warp_bwd(*args), CPU.affine_flow_warp_bwd(*args), dtype,
              f"afw {asked} {opts}")


@pytest.mark.parametrize("op", ["compose", "affine_flow_warp"])
def test_deterministic_scatters_are_bitwise_reproducible(cuda_emulated, op):
    """deterministic=True: d flow (and affine_flow_warp's d image) by fixed-point atomics give
    the same bits whatever order the threads add in. theta shrinks the volume to a third, so
    about 27 voxels scatter to each flow corner; the float-atomic path, run alike, does change
    bits with that order (so the equality is not trivial) and agrees to float rounding. The
    image is large (1e6), so a fixed-point scale bound that left out its size overflows."""
    image, flow = inputs((BATCH, 2, 6, 7, 9), (BATCH, 3, 6, 7, 9), scale=0.3)
    image = image * 1e6
    theta = torch.eye(3, 4).repeat(BATCH, 1, 1)
    theta[:, :, :3] *= 0.33
    opts = (False, 0)
    if op == "compose":
        go = inputs(flow.shape, seed=3)[0]
        args = (go, theta, flow, *opts)
        asked = (True, True)
    else:
        go = inputs(image.shape, seed=3)[0]
        args = (go, image, theta, flow, *opts)
        asked = (True, True, True)
    bwd = getattr(cuda_emulated, f"{op}_bwd")
    fixed = [bwd(*args, True, *asked) for _ in range(4)]
    floats = [bwd(*args, False, *asked) for _ in range(4)]
    assert all(torch.equal(a, b) for run in fixed[1:] for a, b in zip(fixed[0], run, strict=True))
    assert any(not torch.equal(a, b) for run in floats[1:]
               for a, b in zip(floats[0], run, strict=True))
    for a, b in zip(fixed[0], floats[0], strict=True):
        assert rel_err(a, b) <= 1e-6


def scattered_gradients(ops, op: str, go: torch.Tensor, image: torch.Tensor, flow: torch.Tensor,
                        deterministic: bool) -> list[torch.Tensor]:
    """The gradients `op`'s backward scatters (warp: d image; compose: d flow; affine_flow_warp:
    d image and d flow), theta a shrink that sends many voxels to each target."""
    theta = torch.eye(3, 4).repeat(BATCH, 1, 1)
    theta[:, :, :3] *= 0.5
    if op == "warp":
        return [ops.warp_backward(go, image, flow, 0, 0, deterministic, True, False)[0]]
    if op == "compose":
        return [ops.compose_bwd(go, theta, flow, False, 0, deterministic, False, True)[1]]
    out = ops.affine_flow_warp_bwd(go, image, theta, flow, False, 0, deterministic, True, False,
                                   True)
    return [out[0], out[2]]


@pytest.mark.parametrize("op", ["warp", "compose", "affine_flow_warp"])
def test_deterministic_scatters_at_float32_extremes(cuda_emulated, op):
    """deterministic=True at the edges of float32. A scale bound past float32's range (values
    near its largest, or affine_flow_warp's product of two maxima) still gives the float-atomic
    result; one inf or NaN in the incoming gradient (an fp16 overflow, which a GradScaler must
    see) makes the whole fixed-point gradient NaN, never finite integers that hide it."""
    image, flow = inputs((BATCH, 2, 6, 7, 9), (BATCH, 3, 6, 7, 9), scale=0.3)
    go = inputs(flow.shape if op == "compose" else image.shape, seed=3)[0]
    if op == "affine_flow_warp":  # bound 2 C max|grad| max|image| * count overflows float32
        image, go = image * 1e6, go * 1e29
    else:  # bound max|grad| * count overflows float32
        go = go * 1e36
    fixed = scattered_gradients(cuda_emulated, op, go, image, flow, True)
    floats = scattered_gradients(cuda_emulated, op, go, image, flow, False)
    for a, b in zip(fixed, floats, strict=True):
        assert torch.isfinite(b).all() and rel_err(a, b) <= 1e-6
    for bad in (float("inf"), float("nan")):
        go_bad = go.clone()
        go_bad[1, 0, 2, 3, 4] = bad
        for g in scattered_gradients(cuda_emulated, op, go_bad, image, flow, True):
            assert g.isnan().all()
        for g in scattered_gradients(cuda_emulated, op, go_bad, image, flow, False):
            assert not torch.isfinite(g).all()  # as the float atomics propagate it


# ---- lncc ------------------------------------------------------------------------------------


def lncc_args(a, b, window, preset="gvsl", reduction="mean", need=(True, True), eps=1e-5,
              smooth_nr=0.0):
    return (a, b, window, eps, PRESETS.index(preset), smooth_nr, REDUCTIONS_CODE[reduction],
            *need)


def lncc_grads(ops, a, b, window, preset="gvsl", reduction="mean", need=(True, True), seed=1):
    """(loss or cc map, d a, d b) of ``ops``' lncc_forward / lncc_backward, as the autograd of
    gvsl_fast.ops.lncc chains them, under a fixed random upstream gradient for a map."""
    args = lncc_args(a, b, window, preset, reduction, need)
    out, coef = ops.lncc_forward(*args)
    up = torch.ones(()) if reduction != "none" else inputs(out.shape, seed=seed)[0]
    g = grad_of_cc(up.to(out.dtype), a, REDUCTIONS_CODE[reduction])
    ga, gb = ops.lncc_backward(g, a, b, coef, *args[2:6], *need)
    return out, ga, gb


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("reduction", REDUCTIONS_CODE)
def test_lncc_presets_and_reductions(cuda_emulated, preset, reduction):
    """Three volumes (one launch slice each along grid z), W and H not multiples of the 32 x 8
    tile; the forward's coefficient maps and the gradients of each input alone."""
    a, b = volumes((3, 1, 9, 10, 35))
    for need in ((True, True), (True, False), (False, True)):
        got = lncc_grads(cuda_emulated, a, b, 5, preset, reduction, need)
        want = lncc_grads(CPU, a, b, 5, preset, reduction, need)
        check(got, want, torch.float32, f"{preset} {reduction} {need}")


@pytest.mark.parametrize("window", [1, 3, 7, 9, 11, 13, 15])
def test_lncc_windows(cuda_emulated, window):
    """Every window the CUDA kernels take (a template each), with both inputs needing gradients
    (7 coefficient maps) and with only the first (4 maps: GVSL's case, the warped image)."""
    a, b = volumes((1, 2, 9, 11, 12))
    for need in ((True, True), (True, False)):
        check(lncc_grads(cuda_emulated, a, b, window, need=need),
              lncc_grads(CPU, a, b, window, need=need), torch.float32, f"window {window} {need}")


@pytest.mark.parametrize("preset", PRESETS)
def test_lncc_window_one(cuda_emulated, preset):
    """A one-voxel window: cc and both gradients exactly zero (tests/test_lncc.py::
    test_window_one), at intensities near 100."""
    a, b = (x + 100.0 for x in volumes((1, 2, 5, 6, 33)))
    cc, ga, gb = lncc_grads(cuda_emulated, a, b, 1, preset, "none")
    assert not cc.any() and not ga.any() and not gb.any()


@pytest.mark.parametrize("window", [3, 9, 15])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lncc_partial_tiles_and_depth_chunks(cuda_emulated, window, reduction):
    """Partial tiles past the first along W and H, and a depth of 41 that the plan for 132 SMs
    splits into uneven chunks (for K = 3: 6 chunks of 7, the last 6 deep), against float64."""
    a, b = volumes((1, 2, 41, 19, 45))
    got = lncc_grads(cuda_emulated, a, b, window, reduction=reduction)
    ref = lncc_grads(CPU, a.double(), b.double(), window, reduction=reduction)
    check(got, [r.to(g.dtype) for g, r in zip(got, ref, strict=True)], torch.float32)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_lncc_half_inputs(cuda_emulated, dtype):
    a, b = volumes((2, 1, 8, 9, 33), dtype=dtype)
    check(lncc_grads(cuda_emulated, a, b, 5, reduction="none"),
          lncc_grads(CPU, a, b, 5, reduction="none"), dtype)


def torch_lncc(a, b, reduction):
    """Value and gradients of the reference lncc (window 9, gvsl) by autograd."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = reference.lncc(a, b, 9, reduction=reduction)
    up = torch.ones(()) if reduction != "none" else inputs(out.shape, seed=1)[0].to(out.dtype)
    return (out.detach(), *torch.autograd.grad(out, (a, b), up))


@pytest.mark.parametrize("offset", [10.0, 100.0])
def test_lncc_intensity_offset(cuda_emulated, offset):
    """Raw-scanner-like offsets: at least as accurate as the float32 reference against float64
    (tests/test_lncc.py::test_intensity_offset; on an H100 in session 1 the CUDA backend missed
    this, with float running sums)."""
    a, b = (x + offset for x in volumes((1, 2, 12, 13, 14)))
    got = lncc_grads(cuda_emulated, a, b, 9)
    ref32, ref = torch_lncc(a, b, "mean"), torch_lncc(a.double(), b.double(), "mean")
    for name, x, x32, r in zip(("value", "grad a", "grad b"), got, ref32, ref, strict=True):
        err, err32 = rel_err(x, r), rel_err(x32, r)
        assert err <= max(err32, tolerance("cuda", torch.float32)), (name, err, err32)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lncc_constant_after_variation(cuda_emulated, reduction):
    """Constant blocks that the running sums reach only after varying data (powers of two, so
    exact in float32 products): the double running sums leave no drift for cross / eps to blow
    up (tests/test_lncc.py::test_constant_after_variation)."""
    a, b = volumes((1, 2, 12, 14, 16))
    a[:, :, 7:] = 0.25
    a[:, :, :, 8:] = 0.25
    a[:, :, :, :, 9:] = 0.25
    b[:, 1, :, :, 10:] = 0.5
    got = lncc_grads(cuda_emulated, a, b, 9, reduction=reduction)
    ref = torch_lncc(a.double(), b.double(), reduction)
    check(got, [r.to(g.dtype) for g, r in zip(got, ref, strict=True)], torch.float32)


def test_lncc_reduction_is_reproducible(cuda_emulated):
    """The loss: per-block partials (shuffles, then warp 0) summed in a fixed order."""
    a, b = volumes((2, 2, 12, 13, 14))
    args = lncc_args(a, b, 5, need=(False, False))
    first = cuda_emulated.lncc_forward(*args)[0]
    assert all(torch.equal(first, cuda_emulated.lncc_forward(*args)[0]) for _ in range(2))


def test_lncc_rejects_windows_over_15(cuda_emulated):
    a, b = volumes((1, 1, 4, 5, 6))
    with pytest.raises(RuntimeError, match="odd windows up to 15"):
        cuda_emulated.lncc_forward(*lncc_args(a, b, 17))


# ---- direct calls with bad input -------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 2, 4, 5, 6), (2, 0, 4, 5, 6), (2, 2, 0, 5, 6)],
                         ids=["batch", "channels", "depth"])
@pytest.mark.parametrize("ops", ["cuda_emulated", "cpu"])
def test_empty_inputs_are_errors(request, ops, shape):
    """The Python API rejects empty tensors; the ops called directly (torch.ops.gvsl_fast.*)
    raise too, where they divided by zero, indexed past empty buffers or launched empty grids."""
    ops = request.getfixturevalue("cuda_emulated") if ops == "cuda_emulated" else CPU
    image = torch.randn(shape)
    flow = torch.randn(shape[0], 3, *shape[2:])
    theta = torch.eye(3, 4).repeat(shape[0], 1, 1)
    grid = torch.zeros(shape[0], *shape[2:], 3)
    calls = [
        lambda: ops.warp_forward(image, flow, 0, 0, False),
        lambda: ops.warp_backward(image, image, flow, 0, 0, True, True, True),
        lambda: ops.grid_sample_backward(image, image, grid, 0, 0, False, True, True, True),
        lambda: ops.affine_warp_backward(image, image, theta, 0, False, False, True, True),
        *([lambda: ops.compose_bwd(flow, theta, flow, False, 0, True, True, True)]
          if flow.numel() == 0 else []),  # compose has no image
        lambda: ops.affine_flow_warp_bwd(image, image, theta, flow, False, 0, True, True, True,
                                         True),
        *(lambda r=r: ops.lncc_forward(*lncc_args(image, image, 5, reduction=r))
          for r in REDUCTIONS_CODE),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="empty"):
            call()


# ---- random sweep ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_random_sweep(cuda_emulated, seed):
    """Every op on random sizes (up to 9 x 17 x 40, so past the lncc tile's 8 x 32 and the
    samplers' blocks), batch, channels, dtype, layout and options, emulated CUDA against the CPU
    backend (which tests/test_random_sweep.py checks against F.grid_sample and the reference).
    Under the AddressSanitizer run below, random tails and halos also meet the redzones."""
    rng = random.Random(seed)
    B, C = rng.randint(1, 3), rng.randint(1, 3)
    size = (rng.randint(1, 9), rng.randint(1, 17), rng.randint(1, 40))
    dtype = rng.choice(DTYPES)
    cl = rng.random() < 0.5
    image, flow = inputs((B, C, *size), (B, 3, *size), dtype=dtype, channels_last=cl,
                         scale=rng.choice([0.5, 2.0]), seed=seed)
    theta = near_identity(B, rng.choice([0.05, 0.3]), seed=seed).to(dtype)
    mode, padding, align_corners = rng.randrange(2), rng.randrange(2), rng.random() < 0.5
    deterministic = rng.random() < 0.5
    check_sampler(cuda_emulated, "warp", image, flow, (mode, padding), dtype, deterministic)
    grid = inputs((B, *(rng.randint(1, 9) for _ in range(3)), 3), dtype=dtype, scale=0.8,
                  seed=seed)[0]
    check_sampler(cuda_emulated, "grid_sample", image, grid, (mode, padding, align_corners),
                  dtype, deterministic)
    check_sampler(cuda_emulated, "affine_warp", image, theta, (padding, align_corners), dtype,
                  deterministic)
    check_compose(cuda_emulated, image, theta, flow, (align_corners, padding, deterministic),
                  dtype)
    a, b = volumes((B, C, *size), dtype=dtype, seed=seed)
    window, preset = rng.choice([1, 3, 5, 9, 15]), rng.choice(PRESETS)
    for reduction in REDUCTIONS_CODE:
        need = rng.choice(ASKED)
        check(lncc_grads(cuda_emulated, a, b, window, preset, reduction, need),
              lncc_grads(CPU, a, b, window, preset, reduction, need), dtype,
              f"lncc {window} {preset} {reduction} {need}")


@pytest.mark.parametrize("value", [3e9, -1e30, float("inf"), float("nan")])
def test_extreme_positions(cuda_emulated, value):
    """Positions past the int32 range and non-finite ones (tests/test_extreme_positions.py),
    every sampling kernel against the CPU ops; under AddressSanitizer too, where a conversion
    gone wrong would read or scatter outside the tensors."""
    image, flow = inputs((2, 2, 4, 5, 6), (2, 3, 4, 5, 6), scale=2.0)
    grid = inputs((2, 3, 4, 2, 3), scale=0.7)[0]
    flow.view(-1)[1::17] = value
    grid.view(-1)[1::7] = value
    theta = near_identity(2)
    theta[:, 0, 3] = value
    for deterministic in (False, True):
        for padding in PADDINGS.values():
            check_sampler(cuda_emulated, "warp", image, flow, (0, padding), torch.float32,
                          deterministic)
            check_sampler(cuda_emulated, "grid_sample", image, grid, (0, padding, False),
                          torch.float32, deterministic)
            check_sampler(cuda_emulated, "affine_warp", image, theta, (padding, False),
                          torch.float32, deterministic)
            check_compose(cuda_emulated, image, theta, flow, (False, padding, deterministic),
                          torch.float32)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_nonfinite_first_voxel(cuda_emulated, value):
    """inf or NaN at every channel's first voxel of the image and the flow, with positions partly
    outside the volume: the kernels load nothing for corners outside (which read that voxel
    before), so they agree with the CPU ops (tests/test_extreme_positions.py checks those
    against the reference), inf and NaN by place. Forwards, and the backward reads (position
    gradients alone, no scatter) with NaN, whose sums do not depend on their order as inf's do."""
    image, flow = inputs((2, 2, 4, 5, 6), (2, 3, 4, 5, 6), scale=2.0)
    grid = inputs((2, 3, 4, 2, 3), scale=0.9)[0]
    image[:, :, 0, 0, 0] = value
    flow[:, :, 0, 0, 0] = value
    theta = near_identity(2, 0.3)
    go = inputs(image.shape, seed=5)[0]
    grads = math.isnan(value)
    for padding in PADDINGS.values():
        cases = [("warp", flow, (mode, padding)) for mode in (0, 1)]
        cases += [("grid_sample", grid, (mode, padding, False)) for mode in (0, 1)]
        cases += [("affine_warp", theta, (padding, False))]
        for name, pos, options in cases:
            out = getattr(cuda_emulated, f"{name}_forward")(image, pos, *options, False)
            check(out, getattr(CPU, f"{name}_forward")(image, pos, *options, False),
                  torch.float32, name)
            if grads:
                args = (go[..., : out.shape[2], : out.shape[3], : out.shape[4]], image, pos,
                        *options, False, False, True)
                check(getattr(cuda_emulated, f"{name}_backward")(*args),
                      getattr(CPU, f"{name}_backward")(*args), torch.float32, name)
        opts = (False, padding, False)
        check(cuda_emulated.compose_fwd(theta, flow, *opts), CPU.compose_fwd(theta, flow, *opts),
              torch.float32, "compose")
        check(cuda_emulated.affine_flow_warp_fwd(image, theta, flow, *opts),
              CPU.affine_flow_warp_fwd(image, theta, flow, *opts), torch.float32, "afw")
        if grads:
            args = (go, image, theta, flow, *opts, False, True, False)
            check(cuda_emulated.affine_flow_warp_bwd(*args), CPU.affine_flow_warp_bwd(*args),
                  torch.float32, "afw theta")


# ---- out-of-bounds accesses ------------------------------------------------------------------


def _runtime(name: str) -> str | None:
    """The C++ compiler's copy of a runtime library (libasan.so, libstdc++.so.6), or None."""
    cxx = os.environ.get("CXX", "c++")
    try:
        path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(os.environ.get(EMULATE_ASAN) == "1", reason="this is the ASan run")
def test_no_out_of_bounds_access_under_address_sanitizer(tmp_path):
    """Every other test of this file again, in a subprocess with the emulation built with
    AddressSanitizer and libasan preloaded (with libstdc++ first, or C++ exceptions abort):
    every torch CPU tensor then has redzones, so a kernel that reads or writes past a tensor (an
    unguarded tail thread, a halo load without its bounds check) stops the run with a report.
    ASan warns that it does not fully support swapcontext; no false positive has shown up."""
    libasan, libstdcxx = _runtime("libasan.so"), _runtime("libstdc++.so.6")
    if libasan is None or libstdcxx is None:
        pytest.skip("the C++ compiler has no libasan")
    env = dict(os.environ, **{EMULATE_ASAN: "1", "LD_PRELOAD": f"{libasan} {libstdcxx}",
                              "ASAN_OPTIONS": f"detect_leaks=0:log_path={tmp_path / 'asan'}"})
    here = Path(__file__)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", str(here)], cwd=here.parents[1],
                         env=env, capture_output=True, text=True, timeout=3600)
    reports = "".join(p.read_text() for p in tmp_path.glob("asan*"))
    assert "ERROR: AddressSanitizer" not in reports, reports[-6000:]
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]
