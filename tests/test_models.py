"""The GVSL model of DESIGN §4: backbone size and shapes, affine matrix, gradient flow."""

import math

import pytest
import torch
import torch.nn.functional as F
from common import rel_err

from gvsl_fast.models import GVSL, UNet3D, affine_matrix


def test_backbone_has_about_23_5_million_parameters():
    n = sum(p.numel() for p in UNet3D().parameters())
    assert abs(n - 23.5e6) / 23.5e6 < 0.01, n


def test_unet_pads_and_crops_odd_sizes():
    net = UNet3D(down=(8, 16, 16, 16, 32), up=(16, 16, 16, 8))
    f_g, f_l = net(torch.rand(2, 1, 17, 23, 29))
    assert f_l.shape == (2, 8, 17, 23, 29)
    assert f_g.shape == (2, 32, 2, 2, 2)  # padded to 32^3, then 1/16


def test_affine_matrix_identity_and_composition():
    z3 = torch.zeros(2, 3)
    theta = affine_matrix(z3, torch.ones(2, 3), z3, torch.zeros(2, 6))
    assert torch.equal(theta, torch.eye(3, 4).repeat(2, 1, 1))
    rot = torch.tensor([[0.0, 0.0, math.pi / 2]])      # 90 degrees about z
    theta = affine_matrix(rot, torch.tensor([[2.0, 1.0, 1.0]]), torch.tensor([[0.1, 0.2, 0.3]]),
                          torch.zeros(1, 6))
    expected = torch.tensor([[[0.0, -2.0, 0.0, 0.1], [1.0, 0.0, 0.0, 0.2], [0.0, 0.0, 1.0, 0.3]]])
    assert torch.allclose(theta, expected, atol=1e-6)


def test_affine_matrix_is_differentiable_in_every_input():
    args = [torch.randn(2, k, dtype=torch.float64, requires_grad=True) for k in (3, 3, 3, 6)]
    assert torch.autograd.gradcheck(affine_matrix, args)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    backbone = UNet3D(down=(8, 16, 16, 16, 32), up=(16, 16, 16, 8))
    return GVSL(backbone, ops_backend="reference")


def test_gradients_reach_every_parameter(small_model):
    torch.manual_seed(1)
    a, b = torch.rand(2, 1, 16, 20, 24), torch.rand(2, 1, 16, 20, 24)
    small_model.zero_grad()
    out = small_model(a, a.clone(), b)
    out.loss.backward()
    for name, p in small_model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert out.warped.shape == a.shape and out.restored.shape == a.shape
    assert out.theta.shape == (2, 3, 4) and out.flow.shape == (2, 3, 16, 20, 24)
    expected = out.ncc + out.smooth + out.mse
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_fusion_orders_differ_but_agree_for_pure_affine(small_model):
    a = torch.rand(2, 1, 12, 14, 16)
    theta = torch.eye(3, 4).repeat(2, 1, 1) + 0.05 * torch.randn(2, 3, 4)
    flow = torch.randn(2, 3, 12, 14, 16)
    paper = GVSL(small_model.backbone, fusion="paper", ops_backend="reference")
    code = GVSL(small_model.backbone, fusion="code", ops_backend="reference")
    assert not torch.allclose(paper.warp_moving(a, theta, flow), code.warp_moving(a, theta, flow))
    zero = torch.zeros_like(flow)
    assert torch.allclose(paper.warp_moving(a, theta, zero), code.warp_moving(a, theta, zero),
                          atol=1e-6)


def test_bad_fusion_is_rejected():
    with pytest.raises(ValueError, match="fusion"):
        GVSL(UNet3D(down=(8, 8, 8, 8, 8), up=(8, 8, 8, 8)), fusion="both")


def test_export_roundtrip(tmp_path):
    net = UNet3D(down=(8, 16, 16, 16, 32), up=(16, 16, 16, 8))
    net.save_pretrained(tmp_path / "bb.pt")
    again = UNet3D.from_pretrained(tmp_path / "bb.pt")
    for (k, v), (k2, v2) in zip(net.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(FileNotFoundError, match="no weights"):
        UNet3D.from_pretrained(tmp_path / "missing.pt")


def test_grad_checkpoint_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = UNet3D(down=(8, 16, 16, 16, 32), up=(16, 16, 16, 8))
    ckpt = UNet3D(down=(8, 16, 16, 16, 32), up=(16, 16, 16, 8), grad_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 16, 16, 16)
    grads = []
    for net in (plain, ckpt):
        f_g, f_l = net(x)
        (f_g.square().mean() + f_l.square().mean()).backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_atomic_free_pooling_and_upsampling_match_pytorch():
    """max_pool2 / upsample2 (the U-Net's layers under deterministic algorithms on the GPU)
    against F.max_pool3d / F.interpolate: pooling exactly, ties included (after LeakyReLU's
    zeros the first maximum gets the gradient, as max_pool3d's does), upsampling to rounding,
    values and gradients, on odd and size-1 axes."""
    from gvsl_fast.models.unet import max_pool2, upsample2

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6, 8).relu().requires_grad_()
    assert (x == 0).float().mean() > 0.3  # many tied windows
    for fn, ref, exact in (
        (max_pool2, lambda t: F.max_pool3d(t, 2), True),
        (upsample2, lambda t: F.interpolate(t, scale_factor=2, mode="trilinear",
                                            align_corners=True), False),
    ):
        for t in (x, torch.randn(1, 2, 1, 3, 5, requires_grad=True)):
            if fn is max_pool2 and t is not x:
                continue  # pooling takes the U-Net's even sizes
            out, want = fn(t), ref(t)
            g = torch.randn_like(want)
            (got_grad,), (want_grad,) = (torch.autograd.grad(o, [t], g) for o in (out, want))
            if exact:
                assert torch.equal(out, want) and torch.equal(got_grad, want_grad)
            else:
                torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)


def test_unet_takes_the_atomic_free_layers_when_asked(monkeypatch):
    """With deterministic_layers true (CUDA tensors under torch.use_deterministic_algorithms),
    the U-Net's features and gradients equal its default ones to rounding."""
    from gvsl_fast.models import unet

    torch.manual_seed(0)
    model = UNet3D(down=(8, 8, 8, 8, 8), up=(8, 8, 8, 8))
    x = torch.randn(1, 1, 16, 16, 16)
    runs = []
    for deterministic in (False, True):
        monkeypatch.setattr(unet, "deterministic_layers", lambda t, d=deterministic: d)
        model.zero_grad()
        f_g, f_l = model(x)
        (f_g.square().sum() + f_l.square().sum()).backward()
        runs.append([f_g, f_l] + [p.grad.clone() for p in model.parameters()])
    calls = []
    monkeypatch.setattr(unet, "max_pool2", lambda t: calls.append(t) or F.max_pool3d(t, 2))
    model(x)
    assert len(calls) == 4
    for a, b in zip(*runs, strict=True):
        assert rel_err(a, b) < 1e-5
