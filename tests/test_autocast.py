"""Every op under torch.autocast, as autocast treats F.grid_sample: mixed floating inputs (a flow
from a bf16 convolution, a float32 image) are promoted to the widest dtype instead of refused,
and the op itself runs with autocast off (the reference's convolutions stay in float32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from common import OPS, backend_ids, fast_backends, op_call, op_inputs, rel_err

from gvsl_fast import ops
from gvsl_fast.ops._backend import deterministic_algorithms

BACKENDS = fast_backends()
IDS = backend_ids(BACKENDS)


def _half_last(name: str, device: str) -> list[torch.Tensor]:
    """The op's float32 inputs with the last one (flow, grid, theta, lncc's b) in bfloat16,
    as a network's output under autocast would be."""
    inputs = [t.detach() for t in op_inputs(name, device, torch.float32, False)]
    inputs[-1] = inputs[-1].bfloat16().requires_grad_()
    return inputs


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize(("device", "backend"), BACKENDS, ids=IDS)
def test_mixed_dtypes_under_autocast_promote_to_float32(device, backend, name):
    inputs = _half_last(name, device)
    fn = op_call(name, backend)
    with deterministic_algorithms(True):  # the GPU's flow scatters bit-reproducible
        with torch.autocast(device, dtype=torch.bfloat16):
            out = fn(*inputs)
        (grad,) = torch.autograd.grad(out.float().square().sum(), inputs[-1])
        promoted = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
        expected = fn(*promoted)
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), promoted[-1])
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)  # the same kernel on the same float32 values
    assert grad.dtype == torch.bfloat16 and torch.equal(grad, expected_grad.bfloat16())


@pytest.mark.parametrize("name", OPS)
def test_mixed_dtypes_without_autocast_are_an_error(name):
    with pytest.raises(TypeError, match="dtype"):
        op_call(name, "cpu")(*_half_last(name, "cpu"))


def test_half_inputs_stay_half_under_autocast():
    image, flow = (t.detach().bfloat16() for t in op_inputs("warp", "cpu", torch.float32, False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.warp(image, flow).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["affine_warp", "lncc"])
def test_reference_runs_without_autocast(name):
    """The reference's affine grid (a matmul) and lncc's box sums (convolutions) would drop to
    bfloat16 under autocast; inside the op they stay in float32."""
    inputs = [t.detach() for t in op_inputs(name, "cpu", torch.float32, False)]
    fn = op_call(name, "reference")
    expected = fn(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*inputs)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize(("device", "backend"), BACKENDS, ids=IDS)
def test_grid_sample_matches_torch_under_autocast(device, backend):
    image, grid = (t.detach() for t in op_inputs("grid_sample", device, torch.float32, False))
    grid = grid.bfloat16()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = ops.grid_sample(image, grid, align_corners=True, backend=backend)
        expected = F.grid_sample(image, grid, align_corners=True)
    assert out.dtype == expected.dtype == torch.float32
    assert rel_err(out, expected) <= 1e-5


def test_torch_compile_under_autocast_no_graph_break():
    image, flow = (t.detach() for t in op_inputs("warp", "cpu", torch.float32, False))
    flow = flow.bfloat16().requires_grad_()

    def loss(f):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.warp(image, f, backend="cpu").square().mean()

    compiled = torch.compile(loss, fullgraph=True)
    (gc,) = torch.autograd.grad(compiled(flow), (flow,))
    (ge,) = torch.autograd.grad(loss(flow), (flow,))
    assert gc.dtype == torch.bfloat16 and rel_err(gc, ge) <= 1e-2
