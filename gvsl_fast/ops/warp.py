"""warp and grid_sample: trilinear (or nearest) 3-D sampling with full backward (DESIGN §3).

``warp`` samples at ``p + flow(p)`` (voxel units), ``grid_sample`` at a normalized grid exactly as
``F.grid_sample`` for 5-D input. Both run one sampler: C++ (CPU, CUDA) or Triton, with the
position gradient as a gather and the image gradient (only when the image requires grad) as a
scatter. On the CPU, when the position alone requires grad (the image is data, the usual case)
and there are few channels, the forward also saves d out / d position and the backward is one
streaming product (``_sampler.saves_derivative``). Drop-in modules: :class:`SpatialTransformer`
(VoxelMorph) and :class:`Warp` (MONAI).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gvsl_fast.ops import _backend, _sampler, reference
from gvsl_fast.ops._sampler import MODE_CODES, PADDING_CODES, TRITON_NS

# ---- Triton implementations of the op schemas (csrc/cpu/warp.cpp) -------------------------


@torch.library.custom_op(f"{TRITON_NS}::warp_forward", mutates_args=())
def _triton_warp_forward(image: Tensor, flow: Tensor, mode: int, padding: int,
                         deterministic: bool) -> Tensor:
    from gvsl_fast.kernels import warp as K

    return K.forward(image, flow, K.FLOW, mode, padding, True, tuple(image.shape[2:]))


@torch.library.custom_op(f"{TRITON_NS}::warp_backward", mutates_args=())
def _triton_warp_backward(grad_out: Tensor, image: Tensor, flow: Tensor, mode: int, padding: int,
                          deterministic: bool, image_grad: bool,
                          pos_grad: bool) -> tuple[Tensor, Tensor]:
    from gvsl_fast.kernels import warp as K

    d_image, d_flow = K.backward(grad_out, image, flow, K.FLOW, mode, padding, True,
                                 deterministic, image_grad, pos_grad)
    return _sampler.or_empty(d_image, image), _sampler.or_empty(d_flow, flow)


@torch.library.custom_op(f"{TRITON_NS}::grid_sample_forward", mutates_args=())
def _triton_grid_sample_forward(image: Tensor, grid: Tensor, mode: int, padding: int,
                                align_corners: bool, deterministic: bool) -> Tensor:
    from gvsl_fast.kernels import warp as K

    return K.forward(image, grid, K.GRID, mode, padding, align_corners, tuple(grid.shape[1:4]))


@torch.library.custom_op(f"{TRITON_NS}::grid_sample_backward", mutates_args=())
def _triton_grid_sample_backward(grad_out: Tensor, image: Tensor, grid: Tensor, mode: int,
                                 padding: int, align_corners: bool, deterministic: bool,
                                 image_grad: bool, pos_grad: bool) -> tuple[Tensor, Tensor]:
    from gvsl_fast.kernels import warp as K

    d_image, d_grid = K.backward(grad_out, image, grid, K.GRID, mode, padding, align_corners,
                                 deterministic, image_grad, pos_grad)
    return _sampler.or_empty(d_image, image), _sampler.or_empty(d_grid, grid)


def _flow_spatial(image: Tensor, flow: Tensor) -> tuple:
    return tuple(image.shape[2:])


def _grid_spatial(image: Tensor, grid: Tensor) -> tuple:
    return tuple(grid.shape[1:4])


# The ops in reference.py, called with the op schemas' arguments (trailing `deterministic`).
def _reference_warp(image: Tensor, flow: Tensor, mode: int, padding: int, *_) -> Tensor:
    return reference.warp(image, flow, reference.MODES[mode], reference.PADDINGS[padding])


def _reference_grid_sample(image: Tensor, grid: Tensor, mode: int, padding: int,
                           align_corners: bool, *_) -> Tensor:
    return reference.grid_sample(image, grid, reference.MODES[mode], reference.PADDINGS[padding],
                                 align_corners)


for _ns in ("gvsl_fast", TRITON_NS):
    if _ns == TRITON_NS or _backend.extension_error() is None:
        _sampler.register(f"{_ns}::warp", _flow_spatial, _reference_warp)
        _sampler.register(f"{_ns}::grid_sample", _grid_spatial, _reference_grid_sample)
if _backend.extension_error() is None:
    _sampler.register_saved("gvsl_fast::warp", _flow_spatial, _reference_warp)
    _sampler.register_saved("gvsl_fast::grid_sample", _grid_spatial, _reference_grid_sample)


# ---- public API ----------------------------------------------------------------------------


def _check_options(op: str, mode: str, padding_mode: str) -> None:
    _backend.check_choice(op, "mode", mode, reference.MODES)
    _backend.check_choice(op, "padding_mode", padding_mode, reference.PADDINGS)


@_backend.promotes_under_autocast
def warp(image: Tensor, flow: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
         deterministic: bool | None = None, backend: str = "auto") -> Tensor:
    """Warp ``image`` by a displacement field: ``out(p) = image(p + flow(p))``.

    Args:
        image: (B, C, D, H, W) float tensor, contiguous or channels_last_3d.
        flow: (B, 3, D, H, W) displacement in voxels, channels along D, H, W (VoxelMorph and
            MONAI order); same dtype and device as ``image``. A zero flow returns ``image``
            exactly.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"`` (label maps; no flow gradient).
        padding_mode: ``"zeros"`` (corners outside read 0) or ``"border"`` (positions clamped,
            zero gradient at and beyond the edge).
        deterministic: bit-reproducible image gradient on the GPU (fixed-point atomics,
            slower); ``None`` follows ``torch.are_deterministic_algorithms_enabled()``. The CPU
            backward is always reproducible.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        The warped image, (B, C, D, H, W), in the input dtype.

    Raises:
        ValueError: wrong rank, shape mismatch, flow without 3 channels, empty input, bad option,
            or tensors on different devices.
        TypeError: non-floating dtypes, or mismatched ones outside ``torch.autocast``.
        RuntimeError: the requested backend is not available.
    """
    op = "warp"
    _backend.check_volume(op, "image", image)
    _backend.check_volume(op, "flow", flow, channels=3)
    _backend.check_same(op, image=image, flow=flow)
    if flow.shape[0] != image.shape[0] or flow.shape[2:] != image.shape[2:]:
        raise ValueError(
            f"{op}: `flow` must be (B, 3, D, H, W) with the image's batch and spatial size "
            f"{(image.shape[0], 3, *image.shape[2:])}, got {tuple(flow.shape)}"
        )
    _check_options(op, mode, padding_mode)
    det = _backend.deterministic(op, deterministic)
    be = _backend.resolve(op, backend, [image, flow])
    if be == "reference":
        return reference.warp(image, flow, mode, padding_mode)
    image, flow = _backend.layout(image), _backend.layout(flow)
    options = (MODE_CODES[mode], PADDING_CODES[padding_mode])
    if _sampler.saves_derivative(be, image, (flow,), mode):
        return torch.ops.gvsl_fast.warp_forward_saved(image, flow, *options)[0]
    return _sampler.op_namespace(be).warp_forward(image, flow, *options, det)


@_backend.promotes_under_autocast
def grid_sample(input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = False, deterministic: bool | None = None,
                backend: str = "auto") -> Tensor:
    """``F.grid_sample`` for 5-D input (same signature, results and gradients).

    Args:
        input: (B, C, D, H, W) float tensor.
        grid: (B, D', H', W', 3) normalized sampling positions in (x, y, z) = (W, H, D) order.
        mode: ``"bilinear"`` or ``"nearest"``.
        padding_mode: ``"zeros"`` or ``"border"``.
        align_corners: as in ``F.grid_sample``.
        deterministic: bit-reproducible input gradient on the GPU (slower); ``None`` follows
            ``torch.are_deterministic_algorithms_enabled()``.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        (B, C, D', H', W') samples in the input dtype.

    Raises:
        ValueError: wrong rank or shape, batch mismatch, empty input, bad option, devices differ.
        TypeError: non-floating dtypes, or mismatched ones outside ``torch.autocast``;
            ``align_corners`` not a bool.
        RuntimeError: the requested backend is not available.
    """
    op = "grid_sample"
    _backend.check_volume(op, "input", input)
    if not isinstance(grid, Tensor) or grid.dim() != 5 or grid.shape[-1] != 3:
        shape = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"{op}: `grid` must be (B, D', H', W', 3), got {shape}")
    if grid.shape[0] != input.shape[0]:
        raise ValueError(f"{op}: `grid` batch {grid.shape[0]} != `input` batch {input.shape[0]}")
    if grid.numel() == 0:
        raise ValueError(f"{op}: `grid` is empty, shape {tuple(grid.shape)}")
    _backend.check_same(op, input=input, grid=grid)
    _check_options(op, mode, padding_mode)
    _backend.check_flag(op, "align_corners", align_corners)
    det = _backend.deterministic(op, deterministic)
    be = _backend.resolve(op, backend, [input, grid])
    if be == "reference":
        return reference.grid_sample(input, grid, mode, padding_mode, align_corners)
    input, grid = _backend.layout(input), grid.contiguous()
    options = (MODE_CODES[mode], PADDING_CODES[padding_mode], align_corners)
    if _sampler.saves_derivative(be, input, (grid,), mode):
        return torch.ops.gvsl_fast.grid_sample_forward_saved(input, grid, *options)[0]
    return _sampler.op_namespace(be).grid_sample_forward(input, grid, *options, det)


def _warp_2d_or_3d(module: str, names: tuple[str, str], image: Tensor, flow: Tensor, mode: str,
                   padding_mode: str, backend: str) -> Tensor:
    """:func:`warp` for volumes, and for 2-D images ``(B, C, H, W)`` by ``(B, 2, H, W)`` as one
    slice of depth 1 that nothing moves along: its position there is exactly 0, where the
    trilinear weights are bilinear ones (the depth gradient is computed and dropped). Shape
    errors name the module and its arguments ``names``."""
    for name, t in zip(names, (image, flow), strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(f"{module}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    dims = image.dim() - 2
    if (dims not in (2, 3) or flow.shape[:1] + flow.shape[2:] != image.shape[:1] + image.shape[2:]
            or flow.shape[1:2] != (dims,)):
        raise ValueError(f"{module}: `{names[0]}` (B, C, D, H, W) is warped by `{names[1]}` "
                         f"(B, 3, D, H, W), and (B, C, H, W) by (B, 2, H, W); got "
                         f"{tuple(image.shape)} and {tuple(flow.shape)}")
    if dims == 3:
        return warp(image, flow, mode, padding_mode, backend=backend)
    still = flow.new_zeros(flow.shape[0], 1, *flow.shape[2:])
    flow = torch.cat([still, flow], dim=1).unsqueeze(2)
    return warp(image.unsqueeze(2), flow, mode, padding_mode, backend=backend).squeeze(2)


def _check_module_options(module: str, mode: str, padding_mode: str, backend: str) -> None:
    """The options a module keeps, checked when it is built rather than at its first call."""
    _check_options(module, mode, padding_mode)
    _backend.check_choice(module, "backend", backend, _backend.BACKENDS)


class SpatialTransformer(nn.Module):
    """Drop-in for VoxelMorph's ``SpatialTransformer(size, mode)``: ``forward(src, flow)`` warps
    ``src`` by ``flow`` (voxels, zeros padding), with no sampling grid in memory; 3-D, or 2-D
    (``size`` of two, ``flow`` of two channels) as VoxelMorph also takes.

    VoxelMorph keeps its identity grid as a buffer, so its checkpoints hold a ``grid`` entry
    (``(1, len(size), *size)``) for each transformer. Loading one here takes that entry as read
    (after the same size check a buffer would get) instead of failing ``strict`` loading; this
    module writes no grid."""

    def __init__(self, size: Sequence[int], mode: str = "bilinear",
                 backend: str = "auto") -> None:
        super().__init__()
        _check_module_options("SpatialTransformer", mode, "zeros", backend)
        self.size = tuple(size)
        self.mode = mode
        self.backend = backend
        self.register_load_state_dict_pre_hook(_take_voxelmorph_grid)

    def forward(self, src: Tensor, flow: Tensor) -> Tensor:
        """``src`` (B, C, *size) warped by ``flow`` (B, len(size), *size), zeros outside."""
        if tuple(flow.shape[2:]) != self.size:
            raise ValueError(
                f"SpatialTransformer: flow size {tuple(flow.shape[2:])} != size {self.size}"
            )
        return _warp_2d_or_3d("SpatialTransformer", ("src", "flow"), src, flow, self.mode, "zeros",
                              self.backend)


def _take_voxelmorph_grid(module: SpatialTransformer, state_dict, prefix, local_metadata, strict,
                          missing_keys, unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook: removes a VoxelMorph ``grid`` entry, reporting a size mismatch
    in PyTorch's words."""
    grid = state_dict.pop(prefix + "grid", None)
    expected = (1, len(module.size), *module.size)
    if grid is not None and tuple(grid.shape) != expected:
        error_msgs.append(f"size mismatch for {prefix}grid: copying a param with shape "
                          f"{tuple(grid.shape)} from checkpoint, the shape in current model is "
                          f"{expected} (VoxelMorph's identity grid of `size`).")


class Warp(nn.Module):
    """Drop-in for MONAI's ``Warp(mode, padding_mode, jitter)`` (3-D, or 2-D as MONAI also
    takes): ``forward(image, ddf)`` warps by a dense displacement field in voxels; padding
    defaults to ``"border"`` as in MONAI.
    ``jitter=True`` moves the reference grid off the integers as MONAI does: by ``U[0, 1)``
    offsets drawn with seed 0 (the same draw as MONAI's, the global RNG left untouched)."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "border", jitter: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        _check_module_options("Warp", mode, padding_mode, backend)
        self.mode = mode
        self.padding_mode = padding_mode
        self.jitter = jitter
        self.backend = backend

    def forward(self, image: Tensor, ddf: Tensor) -> Tensor:
        """``image`` (B, C, D, H, W) warped by ``ddf`` (B, 3, D, H, W) in voxels; or (B, C, H, W)
        by (B, 2, H, W)."""
        if self.jitter:
            with torch.random.fork_rng(devices=[ddf.device] if ddf.is_cuda else []):
                torch.random.manual_seed(0)
                ddf = ddf + torch.rand_like(ddf)
        return _warp_2d_or_3d("Warp", ("image", "ddf"), image, ddf, self.mode,
                              self.padding_mode, self.backend)
