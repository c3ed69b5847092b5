"""The plain-PyTorch references against independent computations (F.grid_sample, F.affine_grid,
dense convolutions, MONAI) and hand-computed cases."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from common import rel_err

from gvsl_fast.ops import reference as R

SHAPE = (2, 3, 7, 9, 11)


@pytest.fixture(autouse=True)
def _float64():
    """These comparisons run in float64 (restored afterwards: other modules assume float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _theta(batch: int, scale: float = 0.15) -> torch.Tensor:
    return torch.eye(3, 4).repeat(batch, 1, 1) + scale * torch.randn(batch, 3, 4)


@pytest.mark.parametrize("align_corners,padding_mode,mode",
                         list(itertools.product((True, False), R.PADDINGS, R.MODES)))
def test_grid_sample_matches_torch(align_corners, padding_mode, mode):
    x = torch.randn(*SHAPE, requires_grad=True)
    grid = (torch.rand(2, 5, 6, 8, 3) * 2.8 - 1.4).requires_grad_(mode == "bilinear")
    ours = R.grid_sample(x, grid, mode, padding_mode, align_corners)
    ref = F.grid_sample(x, grid, mode, padding_mode, align_corners)
    assert rel_err(ours, ref) < 1e-12
    g = torch.randn_like(ref)
    inputs = (x, grid) if mode == "bilinear" else (x,)
    for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g),
                    strict=True):
        assert rel_err(a, b) < 1e-12


def test_zero_flow_is_exact_identity():
    x = torch.randn(*SHAPE, dtype=torch.float32)
    flow = torch.zeros(2, 3, *SHAPE[2:], dtype=torch.float32)
    for pm in R.PADDINGS:
        assert torch.equal(R.warp(x, flow, padding_mode=pm), x)


def test_integer_shift_moves_voxels_exactly():
    x = torch.randn(*SHAPE)
    flow = torch.zeros(2, 3, *SHAPE[2:])
    flow[:, 0], flow[:, 1], flow[:, 2] = 1, -2, 3
    out = R.warp(x, flow)
    expected = torch.zeros_like(x)
    expected[:, :, :-1, 2:, :-3] = x[:, :, 1:, :-2, 3:]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("align_corners,padding_mode",
                         list(itertools.product((True, False), R.PADDINGS)))
def test_affine_warp_matches_affine_grid(align_corners, padding_mode):
    x = torch.randn(*SHAPE, requires_grad=True)
    theta = _theta(2).requires_grad_()
    ours = R.affine_warp(x, theta, align_corners, padding_mode)
    grid = F.affine_grid(theta, list(x.shape), align_corners=align_corners)
    ref = F.grid_sample(x, grid, "bilinear", padding_mode, align_corners)
    assert rel_err(ours, ref) < 1e-12
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (x, theta), g),
                    torch.autograd.grad(ref, (x, theta), g), strict=True):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("align_corners", (True, False))
def test_identity_affine_positions_are_exact(align_corners):
    theta = torch.eye(3, 4, dtype=torch.float32).repeat(2, 1, 1)
    size = (17, 23, 29)
    pos = R.affine_positions(theta, size, size, align_corners)
    assert torch.equal(pos, R.identity_grid(size, pos).expand_as(pos))


@pytest.mark.parametrize("align_corners,padding_mode",
                         list(itertools.product((True, False), R.PADDINGS)))
def test_compose_matches_grid_sample_of_flow(align_corners, padding_mode):
    flow = 2 * torch.randn(2, 3, *SHAPE[2:])
    theta = _theta(2)
    psi = R.compose(theta, flow, align_corners, padding_mode)
    grid = F.affine_grid(theta, [2, 3, *SHAPE[2:]], align_corners=align_corners)
    sampled = F.grid_sample(flow, grid, "bilinear", padding_mode, align_corners)
    size = torch.tensor(SHAPE[2:], dtype=flow.dtype).view(1, 3, 1, 1, 1)
    xyz = grid.permute(0, 4, 1, 2, 3).flip(1)  # normalized (d, h, w)
    p_hat = (xyz + 1) / 2 * (size - 1) if align_corners else ((xyz + 1) * size - 1) / 2
    expected = sampled + p_hat - R.identity_grid(SHAPE[2:], flow)
    assert rel_err(psi, expected) < 1e-12


def test_compose_identity_is_exactly_zero():
    theta = torch.eye(3, 4, dtype=torch.float32).repeat(2, 1, 1)
    for ac in (True, False):
        psi = R.compose(theta, torch.zeros(2, 3, 17, 23, 29, dtype=torch.float32), ac)
        assert torch.equal(psi, torch.zeros_like(psi))


def test_affine_flow_warp_is_warp_of_compose():
    x, flow, theta = torch.randn(*SHAPE), torch.randn(2, 3, *SHAPE[2:]), _theta(2)
    out = R.affine_flow_warp(x, theta, flow, True, "border")
    assert torch.equal(out, R.warp(x, R.compose(theta, flow, True, "border"), "bilinear", "border"))


def _dense_cc(a, b, k, eps):
    ones = torch.ones(1, 1, k, k, k)
    n = k ** 3

    def box(t):
        return F.conv3d(t.reshape(-1, 1, *t.shape[2:]), ones, padding=k // 2).reshape(t.shape)

    SI, SJ, SII, SJJ, SIJ = box(a), box(b), box(a * a), box(b * b), box(a * b)
    mu_i, mu_j = SI / n, SJ / n
    cross = SIJ - mu_j * SI - mu_i * SJ + mu_i * mu_j * n   # GVSL's code form
    var_i = SII - 2 * mu_i * SI + mu_i * mu_i * n
    var_j = SJJ - 2 * mu_j * SJ + mu_j * mu_j * n
    return cross * cross / (var_i * var_j + eps)


@pytest.mark.parametrize("window", (3, 5, 9))
def test_lncc_matches_dense_convolution(window):
    a, b = torch.rand(2, 2, 9, 10, 11), torch.rand(2, 2, 9, 10, 11)
    cc = R.lncc(a, b, window, reduction="none")
    assert rel_err(cc, _dense_cc(a, b, window, 1e-5)) < 1e-10
    assert R.lncc(a, b, window).item() == pytest.approx(1 - cc.mean().item(), rel=1e-12)
    assert R.lncc(a, b, window, preset="voxelmorph").item() == pytest.approx(-cc.mean().item())


def test_lncc_monai_preset_equals_monai():
    monai_losses = pytest.importorskip("monai.losses")
    a = torch.rand(2, 1, 9, 10, 11, requires_grad=True)
    b = torch.rand(2, 1, 9, 10, 11)
    ours = R.lncc(a, b, 5, preset="monai")
    ref = monai_losses.LocalNormalizedCrossCorrelationLoss(3, kernel_size=5)(a, b)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    assert rel_err(torch.autograd.grad(ours, a)[0], torch.autograd.grad(ref, a)[0]) < 1e-10


def test_lncc_constant_region_is_zero_not_nan():
    a = torch.full((1, 1, 8, 8, 8), 0.3)
    b = torch.rand(1, 1, 8, 8, 8)
    cc = R.lncc(a, b, 3, reduction="none")
    assert torch.isfinite(cc).all()
    # zero padding makes the border windows non-constant; the interior ones have zero variance
    assert cc[..., 1:-1, 1:-1, 1:-1].abs().max() < 1e-6
    assert cc.abs().max() > 1e-3


def test_smooth_loss_hand_computed():
    flow = torch.zeros(1, 3, 4, 5, 6)
    flow[:, 0] = 0.5 * torch.arange(4.0).view(4, 1, 1)     # d/dD = 0.5 on channel 0 only
    # only the D differences are nonzero: mean over (1,3,3,5,6) of 0.25 on one channel in three
    assert R.smooth_loss(flow).item() == pytest.approx((0.25 / 3) / 3)
