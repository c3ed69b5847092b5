"""affine_warp: ``F.grid_sample(image, F.affine_grid(theta, image.shape))`` with no grid tensor.

Each output voxel computes its sampling position from theta (folded into an index-space map)
inside the kernel. Gradients: image (scatter, only when it requires grad) and theta (per-block
moment sums, then a fixed-order sum: reproducible). In GVSL this brings the 32-channel local
features of one image into the other's frame, with gradients to both features and theta.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gvsl_fast.ops import _backend, _sampler, reference
from gvsl_fast.ops._sampler import PADDING_CODES, TRITON_NS


@torch.library.custom_op(f"{TRITON_NS}::affine_warp_forward", mutates_args=())
def _triton_affine_warp_forward(image: Tensor, theta: Tensor, padding: int, align_corners: bool,
                                deterministic: bool) -> Tensor:
    from gvsl_fast.kernels import affine_warp as K

    return K.forward(image, theta, padding, align_corners)


@torch.library.custom_op(f"{TRITON_NS}::affine_warp_backward", mutates_args=())
def _triton_affine_warp_backward(grad_out: Tensor, image: Tensor, theta: Tensor, padding: int,
                                 align_corners: bool, deterministic: bool, image_grad: bool,
                                 pos_grad: bool) -> tuple[Tensor, Tensor]:
    from gvsl_fast.kernels import affine_warp as K

    d_image, d_theta = K.backward(grad_out, image, theta, padding, align_corners, deterministic,
                                  image_grad, pos_grad)
    return _sampler.or_empty(d_image, image), _sampler.or_empty(d_theta, theta)


def _image_spatial(image: Tensor, theta: Tensor) -> tuple:
    return tuple(image.shape[2:])


def _reference_affine_warp(image: Tensor, theta: Tensor, padding: int, align_corners: bool,
                           *_) -> Tensor:
    return reference.affine_warp(image, theta, align_corners, reference.PADDINGS[padding])


for _ns in ("gvsl_fast", TRITON_NS):
    if _ns == TRITON_NS or _backend.extension_error() is None:
        _sampler.register(f"{_ns}::affine_warp", _image_spatial, _reference_affine_warp)


@_backend.promotes_under_autocast
def affine_warp(image: Tensor, theta: Tensor, align_corners: bool = False,
                padding_mode: str = "zeros", deterministic: bool | None = None,
                backend: str = "auto") -> Tensor:
    """Resample ``image`` under the affine ``theta``, trilinear, without a sampling grid.

    Args:
        image: (B, C, D, H, W) float tensor, contiguous or channels_last_3d.
        theta: (B, 3, 4) affine in ``F.affine_grid``'s convention (output normalized coordinates
            to input normalized coordinates, (x, y, z) = (W, H, D) order); same dtype and device
            as ``image``.
        align_corners: as in ``F.affine_grid`` / ``F.grid_sample``.
        padding_mode: ``"zeros"`` or ``"border"``.
        deterministic: bit-reproducible image gradient on the GPU (slower); ``None`` follows
            ``torch.are_deterministic_algorithms_enabled()``. The theta gradient is always
            reproducible.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        (B, C, D, H, W) resampled image in the input dtype.

    Raises:
        ValueError: wrong rank or shape, batch mismatch, empty input, bad option, devices differ.
        TypeError: non-floating dtypes, or mismatched ones outside ``torch.autocast``;
            ``align_corners`` not a bool.
        RuntimeError: the requested backend is not available.
    """
    op = "affine_warp"
    _backend.check_volume(op, "image", image)
    if not isinstance(theta, Tensor) or theta.shape != (image.shape[0], 3, 4):
        shape = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
        raise ValueError(f"{op}: `theta` must be ({image.shape[0]}, 3, 4), got {shape}")
    _backend.check_same(op, image=image, theta=theta)
    _backend.check_flag(op, "align_corners", align_corners)
    _backend.check_choice(op, "padding_mode", padding_mode, reference.PADDINGS)
    det = _backend.deterministic(op, deterministic)
    be = _backend.resolve(op, backend, [image, theta])
    if be == "reference":
        return reference.affine_warp(image, theta, align_corners, padding_mode)
    ops = _sampler.op_namespace(be)
    return ops.affine_warp_forward(_backend.layout(image), theta.contiguous(),
                                   PADDING_CODES[padding_mode], align_corners, det)
