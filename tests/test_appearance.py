"""The fused appearance kernels (C++ on the CPU, Triton) against the plain-torch composition,
and that composition against a literal per-block, per-box Python loop."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gvsl_fast.data import transforms as T
from gvsl_fast.ops import _backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baselines  # noqa: E402


def backends():
    pairs = [("cpu", "cpu")]
    if _backend.triton_error(torch.device("cpu")) is None and os.environ.get("TRITON_INTERPRET"):
        pairs.append(("cpu", "triton"))
    if torch.cuda.is_available():
        pairs.append(("cuda", "triton"))
    return pairs


def make_params(shape, block, n_blocks, seed, shuffle=None, nonlinear=None, device="cpu"):
    """Random parameters with blocks of a chosen size (many overlapping) and boxes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(shape)
    p = T.AppearanceTransform(n_blocks=n_blocks).params(x, g)
    B = shape[0]
    size = torch.tensor(shape[2:])
    p["block"] = block
    p["starts"] = (torch.rand(B, n_blocks, 3, generator=g) * (size - torch.tensor(block) + 1)
                   ).long()
    p["perm"] = torch.argsort(torch.rand(B, int(np.prod(block)), generator=g), 1)
    if shuffle is not None:
        p["shuffle"] = torch.tensor(shuffle)
    if nonlinear is not None:
        p["nonlinear"] = torch.tensor(nonlinear)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in p.items()}


def naive(x, p):
    """The transforms written out literally: blocks then boxes one after another."""
    x = x.double().clone()
    B, C, D, H, W = x.shape
    out = x.clone()
    for b in range(B):
        if p["shuffle"][b]:
            bd, bh, bw = p["block"]
            local = list(itertools.product(range(bd), range(bh), range(bw)))
            for s in p["starts"][b].tolist():
                for j, (i, k, m) in enumerate(local):
                    si, sk, sm = local[int(p["perm"][b, j])]
                    out[b, :, s[0] + i, s[1] + k, s[2] + m] = x[b, :, s[0] + si, s[1] + sk,
                                                                 s[2] + sm]
        if p["nonlinear"][b]:
            lut = p["lut"][b].double()
            v = out[b].clamp(0, 1) * (len(lut) - 1)
            i0 = v.long().clamp(max=len(lut) - 2)
            out[b] = lut[i0] + (v - i0) * (lut[i0 + 1] - lut[i0])
        for box, off in zip(p["boxes"][b].tolist(), p["noise_offset"][b].tolist(), strict=True):
            lo, hi = box[:3], box[3:]
            n = [h - lo_ for lo_, h in zip(lo, hi, strict=True)]
            if min(n) <= 0:
                continue
            vals = p["noise"][off:off + int(np.prod(n))].double().reshape(n)
            out[b, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = vals
    return out


@pytest.mark.parametrize("shape,block", [((2, 1, 9, 11, 13), (2, 3, 2)),
                                         ((3, 2, 7, 9, 11), (3, 1, 2))])
def test_torch_composition_matches_literal_loop(shape, block):
    x = torch.rand(shape)
    p = make_params(shape, block, n_blocks=40, seed=1, shuffle=[True] * shape[0])
    torch.testing.assert_close(T.appearance_torch(x, p).double(), naive(x, p), atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize("device,backend", backends())
@pytest.mark.parametrize("shape,block,n_blocks", [
    ((2, 1, 17, 23, 29), (2, 3, 2), 300),      # heavily overlapping blocks
    ((3, 2, 7, 9, 11), (1, 2, 3), 50),
    ((1, 1, 12, 10, 8), (1, 1, 1), 0),          # no blocks
])
def test_fused_matches_torch(device, backend, shape, block, n_blocks):
    x = torch.rand(shape, device=device) * 1.4 - 0.2       # values outside [0, 1] clamp
    B = shape[0]
    p = make_params(shape, block, n_blocks, seed=2, shuffle=[True, False, True][:B],
                    nonlinear=[True, True, False][:B], device=device)
    want = T.appearance_torch(x, p)
    got = T.appearance(x, p, backend)
    assert got.shape == x.shape and got.dtype == x.dtype and got.device == x.device
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got != x).any()


@pytest.mark.parametrize("device,backend", backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fused_dtypes(device, backend, dtype):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the Triton kernel computes in float32; float64 is for the CPU paths")
    shape = (2, 1, 9, 10, 11)
    x = torch.rand(shape, device=device, dtype=dtype)
    p = make_params(shape, (2, 2, 2), 30, seed=3, shuffle=[True, True], device=device)
    got = T.appearance(x, p, backend)
    assert got.dtype == dtype
    ref = T.appearance_torch(x.float(), p)
    torch.testing.assert_close(got.float(), ref, atol=1e-2 if dtype != torch.float64 else 1e-6,
                               rtol=0)


def test_no_boxes_no_change_when_flags_off():
    x = torch.rand(2, 1, 8, 9, 10)
    p = make_params(x.shape, (2, 2, 2), 20, seed=4, shuffle=[False, False],
                    nonlinear=[False, False])
    p["boxes"] = p["boxes"][:, :0]
    p["noise_offset"] = p["noise_offset"][:, :0]
    p["noise"] = p["noise"][:0]
    for be in ("torch", "cpu"):
        torch.testing.assert_close(T.appearance(x, p, be), x, rtol=0, atol=0)


def test_bezier_lut_matches_the_dense_numpy_curve():
    """The 1024-entry table against the original approach: 100000 curve points and np.interp."""
    ctrl = torch.tensor([[0.1, 0.7, 0.3, 0.9], [0.05, 0.02, 0.95, 0.1], [0.5, 0.5, 0.5, 0.5]])
    lut = T.bezier_lut(ctrl)
    x = torch.rand(3, 1, 5, 6, 7)
    got = T.apply_lut(x, lut)
    for b, (x1, y1, x2, y2) in enumerate(ctrl.tolist()):
        xs, ys = baselines.bezier_curve([(0, 0), (x1, y1), (x2, y2), (1, 1)])
        want = np.interp(x[b].numpy(), xs, ys)
        np.testing.assert_allclose(got[b].numpy(), want, atol=2e-3)
    assert (lut[:, 1:] >= lut[:, :-1]).all()               # monotone
    torch.testing.assert_close(lut[:, [0, -1]], torch.tensor([[0.0, 1.0]] * 3))


def test_bad_backend():
    x = torch.rand(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="backend"):
        T.AppearanceTransform(backend="numpy")
    p = T.AppearanceTransform().params(x)
    with pytest.raises(ValueError, match="backend"):
        T.appearance(x, p, "gpu")


def test_cpu_op_under_torch_compile():
    x = torch.rand(2, 1, 8, 9, 10)
    p = make_params(x.shape, (2, 2, 2), 20, seed=6, shuffle=[True, True])
    compiled = torch.compile(lambda v: T.appearance(v, p, "cpu") * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), T.appearance_torch(x, p) * 2, atol=1e-6, rtol=0)


def test_auto_announces_the_torch_fallback(monkeypatch):
    x = torch.rand(1, 1, 6, 7, 8)
    p = make_params(x.shape, (1, 1, 1), 5, seed=7)
    assert T.resolve_backend("auto", x) == "cpu"
    monkeypatch.setattr(_backend, "extension_error", lambda: "no _C in this test")
    with pytest.warns(RuntimeWarning, match="plain torch ops: no _C in this test"):
        assert T.resolve_backend("auto", x) == "torch"
    with pytest.raises(RuntimeError, match="backend='cpu' is not available: no _C"):
        T.appearance(x, p, "cpu")


def test_triton_launch_grids_within_cuda_limits(monkeypatch):
    """CUDA grids stop at 65535 programs on axes 1 and 2: a 256x512x512 volume (a CT scan at
    full resolution) has 65536 blocks of 1024 voxels. The launches are recorded, not run (a
    meta image; the parameters read only the shape of an untouched CPU one)."""
    pytest.importorskip("triton")
    from gvsl_fast.kernels import appearance as K

    grids = []

    class Record:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    monkeypatch.setattr(K, "_owner_kernel", Record())
    monkeypatch.setattr(K, "_fused_kernel", Record())
    shape = (2, 1, 256, 512, 512)
    p = T.AppearanceTransform().params(torch.empty(shape, dtype=torch.float16),
                                       torch.Generator().manual_seed(0))
    p["shuffle"] = torch.tensor([True, True])
    K.appearance(torch.empty(shape, device="meta"), *T._fused_args(torch.empty(0), p)[1:])
    assert len(grids) == 2
    for grid in grids:
        assert all(n <= 65535 for n in grid[1:]), grid


@pytest.mark.skipif(not any(b == "triton" for _, b in backends()),
                    reason="Triton does not run here")
def test_triton_batch_split_gives_the_same_result(monkeypatch):
    """One launch per batch element (the split that keeps grid axis 1 within CUDA's 65535),
    forced on a small batch: the same result as one launch."""
    from gvsl_fast.kernels import warp as W

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (3, 2, 7, 9, 11)
    x = torch.rand(shape, device=device)
    p = make_params(shape, (3, 1, 2), 25, seed=5, shuffle=[True, False, True],
                    nonlinear=[True, True, False], device=device)
    whole = T.appearance(x, p, "triton")
    monkeypatch.setattr(W, "MAX_GRID_Y", 1)  # read by batch_launches
    assert torch.equal(T.appearance(x, p, "triton"), whole)
