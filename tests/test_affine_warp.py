"""affine_warp: every backend against reference.py and F.grid_sample(F.affine_grid), values and
gradients for image and theta, both align_corners and paddings, batch, channels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from common import (
    HALF,
    VECTOR_CHANNELS,
    assert_matches,
    backend_ids,
    channel_vector_cases,
    fast_backends,
    num_threads,
    rel_err,
    upstream_grads,
)

from gvsl_fast.ops import affine_warp, reference

BACKENDS = fast_backends()
IDS = backend_ids(BACKENDS)
PADDINGS = ("zeros", "border")
SHAPE = (2, 4, 7, 9, 11)


def _theta(batch, device, spread=0.25, dtype=torch.float32):
    """Rotation/scale/shear/translation around the identity; corners leave the volume."""
    th = torch.eye(3, 4).repeat(batch, 1, 1) + spread * torch.randn(batch, 3, 4)
    return th.to(device=device, dtype=dtype)


def _torch_affine_warp(image, theta, align_corners, padding):
    grid = F.affine_grid(theta, list(image.shape), align_corners=align_corners)
    return F.grid_sample(image, grid, padding_mode=padding, align_corners=align_corners)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("align_corners", (False, True))
def test_values_and_grads(device, backend, padding, align_corners):
    torch.manual_seed(1)
    image = torch.randn(SHAPE, device=device)
    image[:, :, :3] = -1.5  # constant region
    theta = _theta(SHAPE[0], device)
    args = [t.clone().requires_grad_() for t in (image, theta)]
    out = affine_warp(*args, align_corners, padding, backend=backend)
    grads = upstream_grads(out, args)
    for ref_fn in (reference.affine_warp, _torch_affine_warp):
        ref_args = [t.clone().requires_grad_() for t in (image, theta)]
        ref = ref_fn(*ref_args, align_corners, padding)
        assert_matches(out, ref, device, torch.float32)
        for g, r in zip(grads, upstream_grads(ref, ref_args), strict=True):
            assert_matches(g, r, device, torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_theta_gradient_only_and_image_gradient_only(device, backend):
    torch.manual_seed(2)
    image = torch.randn(1, 3, 8, 7, 9, device=device)
    theta = _theta(1, device)
    for i, wanted in enumerate(((False, True), (True, False))):
        args = [t.clone().requires_grad_(w) for t, w in zip((image, theta), wanted, strict=True)]
        target = args[1 - i]
        (g,) = upstream_grads(affine_warp(*args, backend=backend), [target])
        ref_args = [t.clone().requires_grad_(w) for t, w in zip((image, theta), wanted,
                                                                 strict=True)]
        (r,) = upstream_grads(reference.affine_warp(*ref_args), [ref_args[1 - i]])
        assert_matches(g, r, device, torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("align_corners", (False, True))
def test_identity_theta_is_exact(device, backend, align_corners):
    image = torch.randn(SHAPE, device=device)
    theta = torch.eye(3, 4, device=device).repeat(SHAPE[0], 1, 1)
    for padding in PADDINGS:
        out = affine_warp(image, theta, align_corners, padding, backend=backend)
        assert torch.equal(out, image)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_reproducible_gradients(device, backend):
    """theta: fixed-order sums, always; image: deterministic=True."""
    torch.manual_seed(3)
    image = torch.randn(2, 5, 9, 8, 7, device=device, requires_grad=True)
    theta = _theta(2, device, spread=0.1).requires_grad_()
    runs = []
    for _ in range(3):
        runs.append(upstream_grads(affine_warp(image, theta, deterministic=True, backend=backend),
                           [image, theta]))
    for later in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], later, strict=True))


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_channels_last(device, backend):
    torch.manual_seed(4)
    image = torch.randn(SHAPE, device=device).contiguous(memory_format=torch.channels_last_3d)
    theta = _theta(SHAPE[0], device)
    args = [t.clone().requires_grad_() for t in (image, theta)]
    out = affine_warp(*args, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    ref_args = [t.detach().contiguous().requires_grad_() for t in (image, theta)]
    ref = reference.affine_warp(*ref_args)
    assert_matches(out, ref, device, torch.float32)
    for g, r in zip(upstream_grads(out, args), upstream_grads(ref, ref_args), strict=True):
        assert_matches(g, r, device, torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", HALF)
def test_half_dtypes(device, backend, dtype):
    torch.manual_seed(5)
    image = torch.randn(SHAPE, device=device)
    theta = _theta(SHAPE[0], device, spread=0.1)
    args = [t.to(dtype).requires_grad_() for t in (image, theta)]
    out = affine_warp(*args, backend=backend)
    assert out.dtype == dtype
    ref_args = [t.to(dtype).float().requires_grad_() for t in (image, theta)]
    ref = reference.affine_warp(*ref_args)
    assert rel_err(out, ref) <= 1e-2
    for g, r in zip(upstream_grads(out, args), upstream_grads(ref, ref_args), strict=True):
        assert g.dtype == dtype
        assert rel_err(g, r) <= 1e-2


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("align_corners", (False, True))
def test_gradcheck_cpu(padding, align_corners):
    torch.manual_seed(6)
    image = torch.randn(2, 2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    theta = _theta(2, "cpu", dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda i, t: affine_warp(i, t, align_corners, padding, backend="cpu"), (image, theta)
    )


def test_torch_compile_no_graph_break():
    torch.manual_seed(7)
    image = torch.randn(2, 3, 6, 7, 8, requires_grad=True)
    theta = _theta(2, "cpu").requires_grad_()

    def loss(i, t):
        return affine_warp(i, t, backend="cpu").square().mean()

    compiled = torch.compile(loss, fullgraph=True)
    gc = torch.autograd.grad(compiled(image, theta), (image, theta))
    ge = torch.autograd.grad(loss(image, theta), (image, theta))
    for a, b in zip(gc, ge, strict=True):
        assert rel_err(a, b) <= 1e-6


def test_errors():
    image = torch.randn(2, 2, 4, 5, 6)
    theta = _theta(2, "cpu")
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        affine_warp(image, theta[:1])
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        affine_warp(image, theta[:, :2])
    with pytest.raises(TypeError, match="dtype"):
        affine_warp(image, theta.double())
    with pytest.raises(ValueError, match="on meta"):
        affine_warp(image, theta.to("meta"))
    with pytest.raises(ValueError, match="5-D"):
        affine_warp(image[0], theta)
    with pytest.raises(ValueError, match="padding_mode"):
        affine_warp(image, theta, padding_mode="reflection")
    for backend in ("cpu", "reference"):  # padding_mode in align_corners' place
        with pytest.raises(TypeError, match="affine_warp: `align_corners` must be a bool, "
                                            "got 'border'"):
            affine_warp(image, theta, "border", backend=backend)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("layout", (torch.contiguous_format, torch.channels_last_3d))
def test_many_channels(device, backend, layout):
    """GVSL warps 32-channel features; from 8 channels on, a channels_last image takes the CPU's
    channel-vector loops (whole vectors and a remainder, channels split among threads): values,
    both gradients under an upstream gradient in either layout, and the image gradient's layout."""
    torch.manual_seed(5)
    for threads, dtype in channel_vector_cases(backend):
        image = torch.randn(2, VECTOR_CHANNELS, 6, 7, 9, device=device, dtype=dtype)
        image = image.contiguous(memory_format=layout)
        theta = _theta(2, device, dtype=dtype)
        ref_args = [t.detach().contiguous().requires_grad_() for t in (image, theta)]
        ref = reference.affine_warp(*ref_args)
        ref_grads = upstream_grads(ref, ref_args)
        for grad_layout in dict.fromkeys((torch.contiguous_format, layout)):  # each once
            args = [t.clone().requires_grad_() for t in (image, theta)]
            with num_threads(threads):
                out = affine_warp(*args, backend=backend)
                grads = upstream_grads(out, args, layout=grad_layout)
            assert grads[0].stride() == image.stride()
            assert_matches(out, ref, device, dtype)
            for g, r in zip(grads, ref_grads, strict=True):
                assert_matches(g, r, device, dtype)
