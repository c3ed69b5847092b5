"""Every op's GPU backends launch on their inputs' device, not the current one (a CUDA guard in
the extension's ops, torch.cuda.device around the Triton launches). Needs two GPUs."""

from __future__ import annotations

import pytest
import torch
from common import rel_err, tolerance

from gvsl_fast.ops import (
    _backend,
    affine_flow_warp,
    affine_warp,
    compose,
    grid_sample,
    lncc,
    warp,
)

# Each op on (image, other image, flow, grid, theta) and a backend.
OPS_ON_VOLUMES = {
    "warp": lambda im, ot, fl, gr, th, be: warp(im, fl, backend=be),
    "grid_sample": lambda im, ot, fl, gr, th, be: grid_sample(im, gr, backend=be),
    "affine_warp": lambda im, ot, fl, gr, th, be: affine_warp(im, th, backend=be),
    "compose": lambda im, ot, fl, gr, th, be: compose(th, fl, backend=be),
    "affine_flow_warp": lambda im, ot, fl, gr, th, be: affine_flow_warp(im, th, fl, backend=be),
    "lncc": lambda im, ot, fl, gr, th, be: lncc(im, ot, 5, reduction="none", backend=be),
}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", OPS_ON_VOLUMES)
def test_ops_launch_on_their_inputs_gpu(backend, op):
    """Inputs on cuda:1 while cuda:0 is current: each op launches on the inputs' GPU (a CUDA
    guard in the extension's ops, torch.cuda.device around the Triton launches) and matches the
    CPU, values and gradients; the current device stays cuda:0."""
    if backend == "cuda" and _backend.cuda_kernels_error():
        pytest.skip(_backend.cuda_kernels_error())
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 7, 9, 11)
    inputs = (torch.rand(shape, generator=g), torch.rand(shape, generator=g),
              2.0 * torch.randn(2, 3, *shape[2:], generator=g),
              1.1 * torch.rand(2, 5, 6, 7, 3, generator=g) - 0.55,
              torch.eye(3, 4).repeat(2, 1, 1) + 0.1 * torch.randn(2, 3, 4, generator=g))
    fn = OPS_ON_VOLUMES[op]
    cpu = [t.clone().requires_grad_() for t in inputs]
    want = fn(*cpu, "auto")
    up = torch.randn(want.shape, generator=g)
    want_grads = torch.autograd.grad(want, cpu, up, allow_unused=True)
    with torch.cuda.device(0):
        gpu = [t.to("cuda:1").requires_grad_() for t in inputs]
        got = fn(*gpu, backend)
        grads = torch.autograd.grad(got, gpu, up.to("cuda:1"), allow_unused=True)
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
    assert got.device == torch.device("cuda:1")
    assert rel_err(got, want) <= tolerance("cuda", torch.float32)
    for x, r in zip(grads, want_grads, strict=True):
        assert (x is None) == (r is None)
        if r is not None:
            assert rel_err(x, r) <= tolerance("cuda", torch.float32)
