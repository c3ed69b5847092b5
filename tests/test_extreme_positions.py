"""Sampling positions far outside the volume (past the int32 range, so that a float-to-int
conversion of them is undefined behaviour) and non-finite ones, in every sampling op on every
backend, against the reference: values always, gradients for the finite extremes. Far positions
read nothing with zeros padding and the border with border padding, and the image gradient's
scatter writes nothing out of place (tests/test_cuda_emulated.py repeats this for the CUDA
kernels, also under AddressSanitizer).

Also non-finite image values at a channel's first voxel, the address that the C++ kernels' row
loops load for corners outside the volume: a sample outside must not read it, as with
F.grid_sample (before this was tested, an inf or NaN there made every sample outside NaN)."""

from __future__ import annotations

import math

import pytest
import torch
from common import OPS, backend_ids, fast_backends, op_call, op_inputs

BACKENDS = fast_backends()
EXTREMES = (3e9, -3e9, 1e30, -1e30, float("inf"), float("nan"))
# which of op_inputs's tensors hold positions (flow, grid or theta)
POSITIONS = {"warp": (1,), "grid_sample": (1,), "affine_warp": (1,), "compose": (0, 1),
             "affine_flow_warp": (1, 2)}


def extreme_inputs(op: str, device, value: float) -> list[torch.Tensor]:
    """op_inputs with `value` at a few entries of each position tensor: scattered entries of
    flows and grids, theta's translation along x (finite or NaN; not its linear part, where
    huge entries cancel in the folded index map and the sum lands where rounding order puts
    it). Not at a flow's first voxel, whose values test_nonfinite_first_voxel covers."""
    tensors = op_inputs(op, device, torch.float32, image_grad=True)
    for i in POSITIONS[op]:
        t = tensors[i].detach().clone()
        if t.dim() == 3:
            t[:, 0, 3] = value if math.isnan(value) or math.isfinite(value) else 1e30
        else:
            t.view(-1)[1:: max(1, t.numel() // 5)] = value
        tensors[i] = t.requires_grad_()
    return tensors


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("op", [op for op in OPS if op != "lncc"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_extreme_positions_match_reference(device, backend, op, padding):
    for value in EXTREMES:
        inputs = extreme_inputs(op, device, value)
        fn = op_call(op, backend, padding)
        ref_inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        out, ref = fn(*inputs), op_call(op, "reference", padding)(*ref_inputs)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True), value
        if not math.isfinite(value):  # NaN gradients: where exactly they spread is not checked
            continue
        up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0)).to(ref)
        got = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], up)
        want = torch.autograd.grad(ref, [t for t in ref_inputs if t.requires_grad], up)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert torch.allclose(g, w, rtol=1e-4, atol=1e-4, equal_nan=True), (value, i)


def first_voxel_inputs(op: str, device, value: float, channels_last: bool):
    """op_inputs with `value` at the first voxel of every channel of the sampled volumes (the
    image, and the flow that compose and affine_flow_warp sample) and at one voxel inside.
    channels_last: a 9-channel image in channels_last_3d, which the CPU kernels sample with
    their channel-vector loops."""
    tensors = [t.detach().clone() for t in op_inputs(op, device, torch.float32, image_grad=True)]
    if op != "compose":
        image = tensors[0]
        if channels_last:
            image = image.repeat(1, 5, 1, 1, 1)[:, :9].contiguous(
                memory_format=torch.channels_last_3d)
        image[:, :, 0, 0, 0] = value
        image[:, :, 2, 1, 3] = value
        tensors[0] = image
    if op in ("compose", "affine_flow_warp"):
        tensors[-1][:, :, 0, 0, 0] = value
    return [t.requires_grad_() for t in tensors]


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("op", [op for op in OPS if op != "lncc"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_nonfinite_first_voxel(device, backend, op, padding, channels_last):
    """Values (and, with zeros padding, position gradients) against the reference, their inf
    and NaN by place: samples outside the volume stay finite, samples whose stencil reaches a
    non-finite voxel do not."""
    if channels_last and op == "compose":
        pytest.skip("compose samples only the flow")
    for value in (float("inf"), float("nan")):
        inputs = first_voxel_inputs(op, device, value, channels_last)
        ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        out = op_call(op, backend, padding)(*inputs)
        ref = op_call(op, "reference", padding)(*ref_inputs)
        assert ref.isfinite().any() and not ref.isfinite().all()  # the case is a real one
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True), value
        if padding == "border":
            # A clamped position's gradient is 0 times the derivative there: NaN beside a
            # non-finite voxel, as in F.grid_sample, where the reference's autograd gives 0.
            continue
        up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0)).to(ref)
        positions = POSITIONS[op]
        got = torch.autograd.grad(out, [inputs[i] for i in positions], up)
        want = torch.autograd.grad(ref, [ref_inputs[i] for i in positions], up)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            finite = w.isfinite()  # elsewhere sums of infinities: inf or NaN by summation order
            assert torch.equal(g.isfinite(), finite), (value, i)
            assert torch.allclose(g[finite], w[finite], rtol=1e-4, atol=1e-4), (value, i)
