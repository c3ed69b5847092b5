"""Sampling positions far outside the volume (past the int32 range, so that a float-to-int
conversion of them is undefined behaviour) and non-finite ones, in every sampling op on every
backend, against the reference: values always, gradients for the finite extremes. Far positions
read nothing with zeros padding and the border with border padding, and the image gradient's
scatter writes nothing out of place (tests/test_cuda_emulated.py repeats this for the CUDA
kernels, also under AddressSanitizer).

Not covered, because the kernels get it wrong: a non-finite value at a channel's first voxel.
Their stencils give a corner outside the volume weight 0 and offset 0, so that voxel is read
and multiplied by 0, and an inf or NaN there makes every sample outside NaN (F.grid_sample reads
nothing there; the reference now selects instead of multiplying, as it should)."""

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
    it). Not at a channel's first voxel: see the note on non-finite images there below."""
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
