"""AppearanceTransform and SpatialTransform: seeding, GVSL's settings, batched on any device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gvsl_fast.data import AppearanceTransform, SpatialTransform
from gvsl_fast.data import transforms as T


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices())
def test_appearance_seeded_and_batched(device):
    x = torch.rand(3, 1, 21, 40, 27, device=device)
    t = AppearanceTransform()
    a = t(x, torch.Generator(device).manual_seed(0))
    b = t(x, torch.Generator(device).manual_seed(0))
    c = t(x, torch.Generator(device).manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.device == x.device and (a >= 0).all() and (a <= 1).all()
    ref = AppearanceTransform(backend="torch")
    p = t.params(x, torch.Generator(device).manual_seed(0))
    torch.testing.assert_close(ref(x, params=p), a, atol=1e-6, rtol=0)


def test_appearance_settings():
    """GVSL's settings: block S//20, 5000 blocks, boxes randint(S//10, S//5) at [3, S-n-3)."""
    x = torch.rand(64, 1, 60, 80, 100)
    g = torch.Generator().manual_seed(5)
    p = AppearanceTransform().params(x, g)
    assert p["block"] == (3, 4, 5) and p["starts"].shape == (64, 5000, 3)
    assert (p["starts"] >= 0).all()
    assert (p["starts"] < torch.tensor([60 - 3, 80 - 4, 100 - 5])).all()
    assert 0.6 < p["shuffle"].float().mean() < 0.95 and 0.75 < p["nonlinear"].float().mean()
    boxes = p["boxes"]
    length = boxes[..., 3:] - boxes[..., :3]
    used = length.prod(-1) > 0
    size = torch.tensor([60, 80, 100])
    assert (length[used] >= size // 10).all() and (length[used] < size // 5).all()
    assert (boxes[..., :3][used] >= 3).all() and (boxes[..., 3:][used] <= size - 3).all()
    # the number of boxes: consecutive successes of U < 0.95, at most 30 (mean about 11.5)
    count = used.sum(1).float()
    assert count.max() <= 30 and 7 < count.mean() < 16
    assert used[:, :-1].ge(used[:, 1:]).all()                 # used slots come first
    assert p["noise"].numel() == length.prod(-1).sum()


@pytest.mark.parametrize("shape", [(2, 1, 7, 9, 11), (1, 1, 3, 4, 5)])
def test_appearance_small_patches(shape):
    """Tiny patches (CPU smoke runs): sizes and corners are clamped into the volume."""
    x = torch.rand(shape)
    out = AppearanceTransform()(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("device", devices())
def test_spatial_same_warp_for_all_volumes(device):
    g = torch.Generator(device).manual_seed(0)
    a = torch.rand(2, 1, 12, 14, 10, device=device)
    at = torch.rand(2, 1, 12, 14, 10, device=device)
    b = torch.rand(2, 2, 12, 14, 10, device=device, dtype=torch.float16)
    wa, wat, wb = SpatialTransform()(a, at, b, generator=g)
    assert wb.dtype == torch.float16 and wb.shape == b.shape
    s = SpatialTransform()
    theta, flow = s.params(a, torch.Generator(device).manual_seed(0))
    for v, w in ((a, wa), (at, wat)):
        torch.testing.assert_close(w, T.affine_flow_warp(v, theta, flow), rtol=0, atol=0)
    assert not torch.allclose(wa, a)
    assert not torch.allclose(wa[0], SpatialTransform()(a, generator=g)[0][0])


def test_spatial_identity_and_affine_convention():
    x = torch.rand(2, 1, 9, 12, 15)
    theta = torch.eye(3, 4).expand(2, 3, 4)
    flow = torch.zeros(2, 3, 9, 12, 15)
    out, = SpatialTransform()(x, params=(theta, flow))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
    s = SpatialTransform(alpha=(0.0, 0.0))
    theta, flow = s.params(x, torch.Generator().manual_seed(3))
    assert not flow.any()
    out, = s(x, params=(theta, flow))
    want = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False),
                         align_corners=False)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_spatial_ranges():
    """Rotation +-20 deg, scale 0.75-1.25, shear +-10 deg; the linear part in voxel units is
    Shear . Scale . R with |det| in the scale range cubed."""
    x = torch.empty(256, 1, 16, 20, 24)
    s = SpatialTransform(alpha=(0.0, 0.0))
    theta, _ = s.params(x, torch.Generator().manual_seed(1))
    half = torch.tensor([24.0, 20.0, 16.0]) / 2
    m = theta[:, :, :3] * half.view(1, 3, 1) / half.view(1, 1, 3)      # back to voxel units
    det = torch.linalg.det(m.double())
    assert (det > 0.75 ** 3 * 0.9).all() and (det < 1.25 ** 3 * 1.1).all()
    assert (theta[:, :, 3].abs() <= 0.1).all()
    r = SpatialTransform(scale=(1.0, 1.0), shear=0.0, alpha=(0.0, 0.0))
    theta, _ = r.params(x, torch.Generator().manual_seed(2))
    m = (theta[:, :, :3] * half.view(1, 3, 1) / half.view(1, 1, 3)).double()
    torch.testing.assert_close(m @ m.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(
        256, 3, 3), atol=1e-5, rtol=0)                               # a rotation in voxels
    cos = (m.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2
    assert cos.min() > torch.cos(torch.deg2rad(torch.tensor(20.0 * 3 ** 0.5))).double()


def test_elastic_field_is_smooth_and_scaled():
    x = torch.empty(4, 1, 48, 48, 48)
    s = SpatialTransform(rotate=0, scale=(1, 1), shear=0, translate=0, alpha=(512, 512),
                         sigma=(4, 4))
    _, flow = s.params(x, torch.Generator().manual_seed(0))
    std = flow.std().item()
    assert 0.5 < std < 20                          # a few voxels, as the GVSL repository's field
    step = (flow[:, :, 1:] - flow[:, :, :-1]).abs().mean().item()
    assert step < 0.2 * flow.abs().mean().item()   # neighbours move together


def test_spatial_errors():
    with pytest.raises(ValueError, match="at least one"):
        SpatialTransform()()
    with pytest.raises(ValueError, match="batch and size differ"):
        SpatialTransform()(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 5))
    with pytest.raises(ValueError, match="5-D"):
        AppearanceTransform()(torch.rand(4, 4, 4))
