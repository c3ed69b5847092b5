"""warp and grid_sample: every backend against reference.py and F.grid_sample, values and
gradients, odd shapes, batch, channels, both paddings, positions leaving the volume."""

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
    tolerance,
    upstream_grads,
)

from gvsl_fast.ops import (
    SpatialTransformer,
    Warp,
    _sampler,
    affine_warp,
    grid_sample,
    reference,
    warp,
)

BACKENDS = fast_backends()
IDS = backend_ids(BACKENDS)
PADDINGS = ("zeros", "border")
SHAPE = (2, 3, 7, 9, 11)  # odd sizes, batch > 1, several channels


def _flow(shape, device, dtype=torch.float32, scale=3.0, identity_slab=True):
    """Displacements of a few voxels, many leaving the volume, plus one constant region.
    The identity slab samples at integers, where the one-sided trilinear derivative depends on
    the last bit of the position: only exact-index implementations agree there."""
    B, _, D, H, W = shape
    f = torch.randn(B, 3, D, H, W, device=device, dtype=torch.float32) * scale
    if identity_slab:
        f[:, :, :2] = 0.0  # exact copies there
    f[:, 0, -1] = D + 5.0  # far outside along D
    return f.to(dtype)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("padding", PADDINGS)
def test_warp_values_and_grads(device, backend, padding):
    torch.manual_seed(1)
    image = torch.randn(SHAPE, device=device)
    image[:, :, :, :3, :3] = 2.5  # constant region
    flow = _flow(SHAPE, device)
    args = [t.clone().requires_grad_() for t in (image, flow)]
    out = warp(*args, padding_mode=padding, backend=backend)
    ref_args = [t.clone().requires_grad_() for t in (image, flow)]
    ref = reference.warp(*ref_args, padding_mode=padding)
    assert_matches(out, ref, device, torch.float32)
    for g, r in zip(upstream_grads(out, args), upstream_grads(ref, ref_args), strict=True):
        assert_matches(g, r, device, torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("padding", PADDINGS)
def test_warp_nearest_matches_reference(device, backend, padding):
    torch.manual_seed(2)
    labels = torch.randint(0, 5, SHAPE, device=device).float()
    flow = _flow(SHAPE, device)
    flow[0, 1, 3, 4, 5] = 0.5  # a tie: rounds half to even
    out = warp(labels, flow, "nearest", padding, backend=backend)
    assert torch.equal(out, reference.warp(labels, flow, "nearest", padding))


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("padding", PADDINGS)
def test_zero_flow_is_exact_identity(device, backend, padding):
    image = torch.randn(SHAPE, device=device)
    flow = torch.zeros(SHAPE[0], 3, *SHAPE[2:], device=device)
    for mode in ("bilinear", "nearest"):
        assert torch.equal(warp(image, flow, mode, padding, backend=backend), image)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_flow_gradient_only(device, backend):
    """GVSL's case: the image is data, only the flow requires grad."""
    torch.manual_seed(3)
    image = torch.randn(1, 1, 9, 8, 7, device=device)
    flow = _flow(image.shape, device).requires_grad_()
    out = warp(image, flow, backend=backend)
    (g,) = upstream_grads(out, [flow])
    ref_flow = flow.detach().clone().requires_grad_()
    (r,) = upstream_grads(reference.warp(image, ref_flow), [ref_flow])
    assert_matches(g, r, device, torch.float32)
    assert image.grad is None


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_channels_last(device, backend):
    torch.manual_seed(4)
    image = torch.randn(SHAPE, device=device).contiguous(memory_format=torch.channels_last_3d)
    flow = _flow(SHAPE, device).contiguous(memory_format=torch.channels_last_3d)
    args = [t.clone().requires_grad_() for t in (image, flow)]
    out = warp(*args, padding_mode="border", backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    ref_args = [t.detach().contiguous().requires_grad_() for t in (image, flow)]
    ref = reference.warp(*ref_args, padding_mode="border")
    assert_matches(out, ref, device, torch.float32)
    for g, r in zip(upstream_grads(out, args), upstream_grads(ref, ref_args), strict=True):
        assert_matches(g, r, device, torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", HALF)
def test_half_dtypes(device, backend, dtype):
    torch.manual_seed(5)
    image = torch.randn(SHAPE, device=device)
    flow = _flow(SHAPE, device, scale=1.5)
    args = [t.to(dtype).requires_grad_() for t in (image, flow)]
    out = warp(*args, backend=backend)
    assert out.dtype == dtype
    ref_args = [t.to(dtype).float().requires_grad_() for t in (image, flow)]
    ref = reference.warp(*ref_args)
    assert rel_err(out, ref) <= 1e-2
    for g, r in zip(upstream_grads(out, args), upstream_grads(ref, ref_args), strict=True):
        assert g.dtype == dtype
        assert rel_err(g, r) <= 1e-2


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_deterministic_image_grad_is_bitwise_reproducible(device, backend):
    torch.manual_seed(6)
    image = torch.randn(2, 4, 9, 8, 7, device=device, requires_grad=True)
    flow = torch.randn(2, 3, 9, 8, 7, device=device) * 0.6  # many outputs share corners
    grads = []
    for _ in range(3):
        out = warp(image, flow, deterministic=True, backend=backend)
        (g,) = upstream_grads(out, [image])
        grads.append(g)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    ref = reference.warp(image, flow)
    (r,) = upstream_grads(ref, [image])
    assert_matches(grads[0], r, device, torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_deterministic_zero_grad_out(device, backend):
    """The fixed-point scale stays finite when the incoming gradient is all zeros."""
    image = torch.randn(1, 2, 5, 6, 7, device=device, requires_grad=True)
    flow = torch.randn(1, 3, 5, 6, 7, device=device)
    out = warp(image, flow, deterministic=True, backend=backend)
    (g,) = torch.autograd.grad(out, [image], torch.zeros_like(out))
    assert torch.equal(g, torch.zeros_like(image))


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_deterministic_image_grad_at_float32_extremes(device, backend):
    """deterministic=True with a scale bound past float32's range (an incoming gradient near its
    largest values) still gives the float path's image gradient; an inf or NaN in the incoming
    gradient is not lost (a GradScaler must see it)."""
    image = torch.randn(1, 2, 5, 6, 7, device=device, requires_grad=True)
    flow = 0.5 * torch.randn(1, 3, 5, 6, 7, device=device)
    up = 1e36 * torch.randn(1, 2, 5, 6, 7, device=device)

    def image_grad(det: bool) -> torch.Tensor:
        out = warp(image, flow, deterministic=det, backend=backend)
        return torch.autograd.grad(out, [image], up)[0]

    assert rel_err(image_grad(True), image_grad(False)) <= 1e-6
    for bad in (float("inf"), float("nan")):
        up[0, 1, 2, 3, 4] = bad
        assert not torch.isfinite(image_grad(True)).all()


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_non_finite_flow(device, backend):
    """NaN positions read nothing with zeros padding, the first voxel with border (reference)."""
    image = torch.randn(1, 2, 5, 6, 7, device=device)
    flow = torch.zeros(1, 3, 5, 6, 7, device=device)
    flow[0, 0, 1, 1, 1] = float("nan")
    flow[0, 1, 2, 2, 2] = float("inf")
    for padding in PADDINGS:
        out = warp(image, flow, padding_mode=padding, backend=backend)
        assert torch.equal(out, reference.warp(image, flow, padding_mode=padding))


# ---- grid_sample ---------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("align_corners", (False, True))
def test_grid_sample_matches_torch(device, backend, padding, align_corners):
    torch.manual_seed(7)
    image = torch.randn(SHAPE, device=device)
    theta = torch.eye(3, 4, device=device).repeat(2, 1, 1) + 0.2 * torch.randn(2, 3, 4,
                                                                               device=device)
    grid = F.affine_grid(theta, (2, 3, 5, 8, 6), align_corners=align_corners) * 1.3
    args = [t.clone().requires_grad_() for t in (image, grid)]
    out = grid_sample(*args, padding_mode=padding, align_corners=align_corners, backend=backend)
    ref_args = [t.clone().requires_grad_() for t in (image, grid)]
    ref = F.grid_sample(*ref_args, padding_mode=padding, align_corners=align_corners)
    assert_matches(out, ref, device, torch.float32)
    for g, r in zip(upstream_grads(out, args), upstream_grads(ref, ref_args), strict=True):
        assert_matches(g, r, device, torch.float32)
    near = grid_sample(image, grid, "nearest", padding, align_corners, backend=backend)
    assert torch.equal(near, reference.grid_sample(image, grid, "nearest", padding,
                                                   align_corners))


# ---- the CPU's saved-derivative path: only the position requires grad, few channels ------


def _saved_path(out: torch.Tensor) -> bool:
    return out.grad_fn is not None and "forward_saved" in out.grad_fn.name()


def _sample(source, image, pos, padding, backend="cpu"):
    if source == "warp":
        return warp(image, pos, padding_mode=padding, backend=backend)
    return grid_sample(image, pos, padding_mode=padding, align_corners=False, backend=backend)


def _position(source, shape, dtype, layout):
    """A flow for warp or a grid (another output size) for grid_sample, requiring grad."""
    if source == "warp":
        pos = _flow(shape, "cpu", dtype).contiguous(memory_format=layout)
    else:
        pos = (torch.rand(shape[0], 5, 8, 6, 3, dtype=torch.float64) * 2.6 - 1.3).to(dtype)
    return pos.requires_grad_()


@pytest.mark.parametrize("source", ("warp", "grid_sample"))
@pytest.mark.parametrize("layout", (torch.contiguous_format, torch.channels_last_3d),
                         ids=("contiguous", "channels_last"))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("channels,dtype", [(1, torch.float32), (3, torch.float32),
                                            (1, torch.float64), (3, torch.bfloat16),
                                            (1, torch.float16)], ids=str)
def test_saved_derivative_matches_recompute(monkeypatch, source, layout, padding, channels,
                                            dtype):
    """The forward saves d out / d position and the backward is a streaming product: the same
    values and position gradient as the recomputing backward (the same sums in the same order),
    and as the reference; a retained graph's second backward gives the same again."""
    torch.manual_seed(12)
    shape = (2, channels, 7, 9, 11)
    image = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
    pos = _position(source, shape, dtype, layout)
    out = _sample(source, image, pos, padding)
    assert _saved_path(out)
    (first,) = torch.autograd.grad(out, [pos], torch.ones_like(out), retain_graph=True)
    (second,) = torch.autograd.grad(out, [pos], torch.ones_like(out), retain_graph=True)
    assert torch.equal(first, second)
    (g,) = upstream_grads(out, [pos], layout=layout)
    monkeypatch.setattr(_sampler, "SAVED_DERIVATIVE_CHANNELS", 0)
    plain = _sample(source, image, pos, padding)
    assert not _saved_path(plain)
    (g_plain,) = upstream_grads(plain, [pos], layout=layout)
    exact = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_err(out, plain) <= exact and rel_err(g, g_plain) <= exact
    ref_pos = pos.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    ref_pos.requires_grad_()
    ref = _sample(source, image.to(ref_pos.dtype), ref_pos, padding, "reference")
    (r,) = upstream_grads(ref, [ref_pos], layout=layout)
    assert out.dtype == g.dtype == dtype
    assert rel_err(out, ref) <= tolerance("cpu", dtype)
    assert rel_err(g, r) <= tolerance("cpu", dtype)


def test_saved_derivative_only_when_it_serves():
    """The saved path is taken only for a bilinear CPU sample whose position alone requires
    grad, with grad enabled and at most SAVED_DERIVATIVE_CHANNELS channels."""
    shape = (1, _sampler.SAVED_DERIVATIVE_CHANNELS, 4, 5, 6)
    image = torch.randn(shape)
    flow = _flow(shape, "cpu").requires_grad_()
    assert _saved_path(warp(image, flow, backend="cpu"))
    wide = torch.randn(1, shape[1] + 1, *shape[2:])
    assert not _saved_path(warp(wide, flow, backend="cpu"))
    assert not _saved_path(warp(image.requires_grad_(), flow, backend="cpu"))
    assert not _saved_path(warp(image.detach(), flow, "nearest", backend="cpu"))
    assert not _saved_path(warp(image.detach(), flow, backend="reference"))
    with torch.no_grad():
        assert warp(image.detach(), flow, backend="cpu").grad_fn is None


@pytest.mark.parametrize("padding", PADDINGS)
def test_saved_derivative_gradcheck_cpu(padding):
    torch.manual_seed(13)
    image = torch.randn(2, 2, 3, 4, 5, dtype=torch.float64)
    flow = (torch.rand(2, 3, 3, 4, 5, dtype=torch.float64) * 2.6 - 1.3).requires_grad_()
    grid = (torch.rand(2, 2, 3, 4, 3, dtype=torch.float64) * 2.4 - 1.2).requires_grad_()
    for source, pos in (("warp", flow), ("grid_sample", grid)):
        assert _saved_path(_sample(source, image, pos, padding))
        assert torch.autograd.gradcheck(lambda p, s=source: _sample(s, image, p, padding), (pos,))


def test_saved_derivative_torch_compile():
    torch.manual_seed(14)
    image = torch.randn(1, 1, 6, 7, 8)
    flow = _flow(image.shape, "cpu").requires_grad_()

    def loss(f):
        return warp(image, f, backend="cpu").square().mean()

    compiled = torch.compile(loss, fullgraph=True)
    (gc,) = torch.autograd.grad(compiled(flow), (flow,))
    (ge,) = torch.autograd.grad(loss(flow), (flow,))
    assert rel_err(gc, ge) <= 1e-6


# ---- float64 gradcheck, torch.compile, drop-in modules -------------------------------------


@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck_cpu(padding):
    torch.manual_seed(8)
    image = torch.randn(2, 2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    flow = (torch.rand(2, 3, 3, 4, 5, dtype=torch.float64) * 2.6 - 1.3).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda i, f: warp(i, f, padding_mode=padding, backend="cpu"), (image, flow)
    )
    grid = (torch.rand(2, 2, 3, 4, 3, dtype=torch.float64) * 2.4 - 1.2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda i, g: grid_sample(i, g, padding_mode=padding, backend="cpu"), (image, grid)
    )


def test_torch_compile_no_graph_break():
    torch.manual_seed(9)
    image = torch.randn(1, 2, 6, 7, 8, requires_grad=True)
    flow = _flow(image.shape, "cpu").requires_grad_()

    def loss(i, f):
        return warp(i, f, backend="cpu").square().mean()

    compiled = torch.compile(loss, fullgraph=True)
    gc = torch.autograd.grad(compiled(image, flow), (image, flow))
    ge = torch.autograd.grad(loss(image, flow), (image, flow))
    for a, b in zip(gc, ge, strict=True):
        assert rel_err(a, b) <= 1e-6


def _voxelmorph_transform(src, flow, mode="bilinear"):
    """VoxelMorph's SpatialTransformer.forward (2-D or 3-D), verbatim in substance."""
    size = flow.shape[2:]
    grids = torch.meshgrid(*(torch.arange(s, dtype=flow.dtype, device=flow.device)
                             for s in size), indexing="ij")
    new_locs = torch.stack(grids).unsqueeze(0) + flow
    for i in range(len(size)):
        new_locs[:, i] = 2 * (new_locs[:, i] / (size[i] - 1) - 0.5)
    new_locs = new_locs.movedim(1, -1).flip(-1)
    return F.grid_sample(src, new_locs, align_corners=True, mode=mode)


def _module_inputs(dims: int, device):
    """An image and a displacement for the drop-in modules: SHAPE and _flow in 3-D, or in 2-D
    (B, C, H, W) and (B, 2, H, W) of SHAPE's sizes."""
    if dims == 3:
        return torch.randn(SHAPE, device=device), _flow(SHAPE, device, identity_slab=False)
    B, C, _, H, W = SHAPE
    return torch.randn(B, C, H, W, device=device), 2 * torch.randn(B, 2, H, W, device=device)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dims", [3, 2])
def test_voxelmorph_spatial_transformer(device, backend, dims):
    torch.manual_seed(10)
    src, flow = _module_inputs(dims, device)
    args = [t.clone().requires_grad_() for t in (src, flow)]
    out = SpatialTransformer(src.shape[2:], backend=backend)(*args)
    ref_args = [t.clone().requires_grad_() for t in (src, flow)]
    ref = _voxelmorph_transform(*ref_args)
    assert_matches(out, ref, device, torch.float32)
    for g, r in zip(upstream_grads(out, args), upstream_grads(ref, ref_args), strict=True):
        assert_matches(g, r, device, torch.float32)
    with pytest.raises(ValueError, match="size"):
        SpatialTransformer((5,) * dims)(src, flow)
    for bad in (src[:, :, 1:], src.unsqueeze(2), src[:, 0]):
        with pytest.raises(ValueError, match=r"SpatialTransformer: `src` \(B, C, D, H, W\) is "
                                             r"warped by `flow` \(B, 3, D, H, W\), and"):
            SpatialTransformer(src.shape[2:])(bad, flow)


def test_module_options_and_shapes_are_checked_in_their_words():
    """Bad options fail when the module is built; shape errors name the module's arguments."""
    for build, match in ((lambda: Warp(mode="bicubic"), "Warp: `mode` must be one of"),
                         (lambda: Warp(padding_mode="reflection"), "Warp: `padding_mode`"),
                         (lambda: Warp(backend="gpu"), "Warp: `backend` must be one of"),
                         (lambda: SpatialTransformer((4, 5, 6), mode="bicubic"),
                          "SpatialTransformer: `mode` must be one of")):
        with pytest.raises(ValueError, match=match):
            build()
    image = torch.rand(1, 1, 4, 5, 6)
    for ddf in (torch.zeros(1, 2, 4, 5, 6), torch.zeros(1, 3, 4, 5, 7)):
        with pytest.raises(ValueError, match=r"Warp: `image` \(B, C, D, H, W\) is warped by "
                                             r"`ddf` \(B, 3, D, H, W\)"):
            Warp()(image, ddf)
    with pytest.raises(ValueError, match=r"got \(6,\) and \(1,\)"):
        Warp()(image[0, 0, 0, 0], torch.zeros(1))
    with pytest.raises(TypeError, match="Warp: `ddf` must be a torch.Tensor"):
        Warp()(image, None)


def test_voxelmorph_checkpoints_load():
    """A VoxelMorph state dict holds each transformer's identity grid; it loads strictly here,
    a grid of another size is PyTorch's size-mismatch error, and no grid is written back."""

    class Model(torch.nn.Module):  # VoxelMorph's VxmDense keeps `transformer` and `integrate`
        def __init__(self, size):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)
            self.transformer = SpatialTransformer(size)

    size = SHAPE[2:]
    vxm = {"conv.weight": torch.randn(3, 1, 3, 3, 3), "conv.bias": torch.randn(3),
           "transformer.grid": reference.identity_grid(size, torch.empty(0))}
    model = Model(size)
    model.load_state_dict(vxm)
    assert torch.equal(model.conv.weight, vxm["conv.weight"])
    assert "transformer.grid" in vxm  # the caller's dict is left whole
    assert set(model.state_dict()) == {"conv.weight", "conv.bias"}
    with pytest.raises(RuntimeError, match=r"size mismatch for transformer\.grid"):
        Model((5, 5, 5)).load_state_dict(vxm)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"extra\""):
        model.load_state_dict({**vxm, "extra": torch.zeros(1)})
    planar = SpatialTransformer((4, 5))  # a 2-D transformer's grid is (1, 2, H, W)
    planar.load_state_dict({"grid": torch.zeros(1, 2, 4, 5)})
    with pytest.raises(RuntimeError, match="size mismatch for grid"):
        planar.load_state_dict({"grid": torch.zeros(1, 3, 4, 5)})


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("jitter", [False, True], ids=["", "jitter"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dims", [3, 2])
def test_monai_warp(device, backend, padding, jitter, dims):
    monai_blocks = pytest.importorskip("monai.networks.blocks")
    torch.manual_seed(11)
    image, ddf = _module_inputs(dims, device)
    args = [t.clone().requires_grad_() for t in (image, ddf)]
    out = Warp("bilinear", padding, jitter, backend=backend)(*args)
    after = torch.rand(1)  # the global RNG went on as if no offsets had been drawn
    torch.manual_seed(11)
    _module_inputs(dims, device)
    assert torch.equal(torch.rand(1), after)
    ref_args = [t.clone().requires_grad_() for t in (image, ddf)]
    ref = monai_blocks.Warp("bilinear", padding, jitter)(*ref_args)
    assert_matches(out, ref, device, torch.float32)
    for g, r in zip(upstream_grads(out, args), upstream_grads(ref, ref_args), strict=True):
        assert_matches(g, r, device, torch.float32)


# ---- bad input -----------------------------------------------------------------------------


def test_errors():
    image = torch.randn(1, 2, 4, 5, 6)
    flow = torch.zeros(1, 3, 4, 5, 6)
    with pytest.raises(ValueError, match="3 channels"):
        warp(image, torch.zeros(1, 2, 4, 5, 6))
    with pytest.raises(ValueError, match="spatial size"):
        warp(image, torch.zeros(1, 3, 4, 5, 7))
    with pytest.raises(ValueError, match="batch"):
        warp(image, torch.zeros(2, 3, 4, 5, 6))
    with pytest.raises(ValueError, match="5-D"):
        warp(image[0], flow)
    with pytest.raises(TypeError, match="dtype"):
        warp(image, flow.double())
    with pytest.raises(TypeError, match="floating"):
        warp(image.long(), flow)
    with pytest.raises(ValueError, match="on meta"):
        warp(image, flow.to("meta"))
    with pytest.raises(ValueError, match="padding_mode"):
        warp(image, flow, padding_mode="reflection")
    with pytest.raises(ValueError, match="mode"):
        warp(image, flow, mode="bicubic")
    with pytest.raises(ValueError, match="empty"):
        warp(image[:, :0], flow)
    with pytest.raises(ValueError, match="grid"):
        grid_sample(image, torch.zeros(1, 4, 5, 6, 2))
    with pytest.raises(ValueError, match="batch"):
        grid_sample(image, torch.zeros(2, 4, 5, 6, 3))
    for backend in ("cpu", "reference"):
        with pytest.raises(TypeError, match="grid_sample: `align_corners` must be a bool"):
            grid_sample(image, torch.zeros(1, 4, 5, 6, 3), align_corners="border",
                        backend=backend)
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        warp(image, flow, backend="cuda")


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("layout", (torch.contiguous_format, torch.channels_last_3d))
@pytest.mark.parametrize("padding", PADDINGS)
def test_many_channels(device, backend, layout, padding):
    """From 8 channels on, a channels_last image takes the CPU's channel-vector loops (whole
    vectors and a remainder, channels split among threads): values, both gradients under an
    upstream gradient in either layout, and the image gradient's layout."""
    torch.manual_seed(6)
    shape = (2, VECTOR_CHANNELS, 6, 7, 9)
    for threads, dtype in channel_vector_cases(backend):
        image = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
        flow = _flow(shape, device, dtype=dtype)
        ref_args = [t.detach().contiguous().requires_grad_() for t in (image, flow)]
        ref = reference.warp(*ref_args, padding_mode=padding)
        ref_grads = upstream_grads(ref, ref_args)
        for grad_layout in dict.fromkeys((torch.contiguous_format, layout)):  # each once
            args = [t.clone().requires_grad_() for t in (image, flow)]
            with num_threads(threads):
                out = warp(*args, padding_mode=padding, backend=backend)
                grads = upstream_grads(out, args, layout=grad_layout)
            assert grads[0].stride() == image.stride()
            assert_matches(out, ref, device, dtype)
            for g, r in zip(grads, ref_grads, strict=True):
                assert_matches(g, r, device, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("along", ("batch", "channel"))
def test_offsets_past_int32(device, backend, along):
    """The third of three 1024^3 half volumes, batch element 2 of (3, 1, ...) or channel 2 of
    (1, 3, ...), starts 2^31 elements in: an offset formed in int32 wraps to -2^31 and reads the
    memory 4 GiB before the image (here: 777). The image is a view 2^31 elements into one
    allocation so that the wrapped read stays inside it; untouched pages of the CPU allocation
    cost nothing."""
    S = 1024
    V = S**3
    try:
        big = torch.empty(2**31 + 3 * V, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError):
        pytest.skip("no room for a 10.7 GB (virtual) allocation")
    img = big[2**31:].view((3, 1, S, S, S) if along == "batch" else (1, 3, S, S, S))
    near = slice(508, 517)  # around the sampled index 511.5 on each axis
    for i in range(3):
        (img[i, 0] if along == "batch" else img[0, i])[near, near, near] = i + 1
    big[:V].view(S, S, S)[near, near, near] = 777
    grid = torch.zeros(img.shape[0], 1, 1, 1, 3, dtype=torch.float16, device=device)
    out = grid_sample(img, grid, align_corners=True, backend=backend)
    assert out.flatten().tolist() == [1.0, 2.0, 3.0]


@pytest.mark.skipif(not any(b == "triton" for _, b in BACKENDS), reason="Triton does not run here")
@pytest.mark.parametrize("variant", ("wide", "batch_split"))
def test_triton_launch_variants_give_the_same_results(monkeypatch, variant):
    """Int64 offsets (WIDE, taken from 2^31 elements on) and one launch per batch element (the
    split that keeps grid axis 1 within CUDA's 65535), forced on small inputs: the same
    addresses, hence the same values and gradients for every sampler source."""
    from gvsl_fast.kernels import warp as K

    device = "cuda" if ("cuda", "triton") in BACKENDS else "cpu"
    torch.manual_seed(9)
    image = torch.randn(SHAPE, device=device)
    flow = _flow(SHAPE, device)
    grid = torch.rand(SHAPE[0], 5, 6, 4, 3, device=device) * 2.4 - 1.2
    theta = torch.eye(3, 4, device=device).repeat(SHAPE[0], 1, 1) + 0.2 * torch.randn(
        SHAPE[0], 3, 4, device=device)
    calls = {
        "warp": lambda im, p: warp(im, p, backend="triton"),
        "grid_sample": lambda im, p: grid_sample(im, p, align_corners=False, backend="triton"),
        "affine_warp": lambda im, p: affine_warp(im, p, backend="triton"),
    }
    positions = {"warp": flow, "grid_sample": grid, "affine_warp": theta}
    runs = []
    for forced in (False, True):
        if forced and variant == "wide":
            monkeypatch.setattr(K, "wide_indices", lambda *tensors: True)
        elif forced:
            monkeypatch.setattr(K, "MAX_GRID_Y", 1)
        run = {}
        for name, call in calls.items():
            args = [image.clone().requires_grad_(), positions[name].clone().requires_grad_()]
            out = call(*args)
            run[name] = (out, *upstream_grads(out, args))
        runs.append(run)
    for name in calls:  # the GPU's float atomics may add the image gradient in another order
        for a, b in zip(runs[0][name], runs[1][name], strict=True):
            assert torch.equal(a, b) if device == "cpu" else rel_err(a, b) <= 1e-6, name
