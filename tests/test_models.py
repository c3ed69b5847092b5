"""The GVSL model of DESIGN §4: backbone size and shapes, affine matrix, gradient flow."""

import math

import pytest
import torch

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
