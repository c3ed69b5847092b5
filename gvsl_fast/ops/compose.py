"""Affine-plus-deformable displacement (GVSL supplementary Eq. 9) and the fused warp by it.

``compose(theta, flow)`` returns ``psi(p) = flow(p_hat) + p_hat - p`` with ``p_hat = theta(p)``,
and ``affine_flow_warp(image, theta, flow)`` returns ``warp(image, psi)`` without writing ``psi``
(DESIGN §3). Backends: CPU C++ and CUDA (``torch.ops.gvsl_fast.compose_*`` and
``affine_flow_warp_*``, per-voxel math in ``csrc/compose.h``) and Triton (``kernels/compose.py``),
each a forward op and a backward op with fake implementations and autograd registered here, so
``torch.compile(fullgraph=True)`` traces through them. On the CPU ``affine_flow_warp`` also has
a saved-derivative pair (``affine_flow_warp_{fwd,bwd}_saved``), taken as warp's is (``_sampler``).
"""

from __future__ import annotations

import torch

from gvsl_fast.ops import _autodiff, _backend, _sampler, reference
from gvsl_fast.ops._sampler import PADDING_CODES

__all__ = ["compose", "affine_flow_warp"]


# ---- Triton ops: the same four schemas as the C++ ops -------------------------------------


@torch.library.custom_op("gvsl_fast::compose_fwd_triton", mutates_args=())
def _compose_fwd_triton(theta: torch.Tensor, flow: torch.Tensor, align_corners: bool,
                        padding: int, deterministic: bool) -> torch.Tensor:
    from gvsl_fast.kernels import compose as kernels

    return kernels.forward(theta, flow, None, align_corners, padding)


@torch.library.custom_op("gvsl_fast::compose_bwd_triton", mutates_args=())
def _compose_bwd_triton(grad: torch.Tensor, theta: torch.Tensor, flow: torch.Tensor,
                        align_corners: bool, padding: int, deterministic: bool,
                        need_theta: bool, need_flow: bool) -> list[torch.Tensor]:
    from gvsl_fast.kernels import compose as kernels

    _, dtheta, dflow = kernels.backward(grad, theta, flow, None, align_corners, padding,
                                        deterministic, (False, need_theta, need_flow))
    return [dtheta, dflow]


@torch.library.custom_op("gvsl_fast::affine_flow_warp_fwd_triton", mutates_args=())
def _afw_fwd_triton(image: torch.Tensor, theta: torch.Tensor, flow: torch.Tensor,
                    align_corners: bool, padding: int, deterministic: bool) -> torch.Tensor:
    from gvsl_fast.kernels import compose as kernels

    return kernels.forward(theta, flow, image, align_corners, padding)


@torch.library.custom_op("gvsl_fast::affine_flow_warp_bwd_triton", mutates_args=())
def _afw_bwd_triton(grad: torch.Tensor, image: torch.Tensor, theta: torch.Tensor,
                    flow: torch.Tensor, align_corners: bool, padding: int, deterministic: bool,
                    need_image: bool, need_theta: bool, need_flow: bool) -> list[torch.Tensor]:
    from gvsl_fast.kernels import compose as kernels

    return list(kernels.backward(grad, theta, flow, image, align_corners, padding, deterministic,
                                 (need_image, need_theta, need_flow)))


# ---- fake implementations and autograd, shared by the C++ and Triton ops ------------------


def _grad_like(t: torch.Tensor, needed: bool) -> torch.Tensor:
    """Gradients not asked for come back as empty tensors (the op schemas return Tensor[])."""
    return t.new_empty(t.shape if needed else (0,))


def _register(suffix: str) -> dict[str, object]:
    ns = torch.ops.gvsl_fast
    cfwd, cbwd, afwd, abwd = (f"gvsl_fast::{name}{suffix}" for name in (
        "compose_fwd", "compose_bwd", "affine_flow_warp_fwd", "affine_flow_warp_bwd"))

    @torch.library.register_fake(cfwd)
    def _(theta, flow, align_corners, padding, deterministic):
        return torch.empty_like(flow)

    @torch.library.register_fake(cbwd)
    def _(grad, theta, flow, align_corners, padding, deterministic, need_theta, need_flow):
        return [_grad_like(theta, need_theta), _grad_like(flow, need_flow)]

    @torch.library.register_fake(afwd)
    def _(image, theta, flow, align_corners, padding, deterministic):
        return torch.empty_like(image)

    @torch.library.register_fake(abwd)
    def _(grad, image, theta, flow, align_corners, padding, deterministic, need_image,
          need_theta, need_flow):
        return [_grad_like(image, need_image), _grad_like(theta, need_theta),
                _grad_like(flow, need_flow)]

    compose_bwd = getattr(ns, f"compose_bwd{suffix}")
    afw_bwd = getattr(ns, f"affine_flow_warp_bwd{suffix}")

    def setup(ctx, inputs, output):
        *tensors, ctx.align_corners, ctx.padding, ctx.deterministic = inputs
        ctx.save_for_backward(*tensors)

    def compose_backward(ctx, grad):
        theta, flow = ctx.saved_tensors
        need = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True
            return _autodiff.reference_grads("compose", _reference(ctx, reference.compose),
                                             (theta, flow), need, grad) + (None, None, None)
        dtheta, dflow = compose_bwd(grad, theta, flow, ctx.align_corners, ctx.padding,
                                    ctx.deterministic, *need)
        return _only(need, (dtheta, dflow)) + (None, None, None)

    def afw_backward(ctx, grad):
        image, theta, flow = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True
            return _autodiff.reference_grads(
                "affine_flow_warp", _reference(ctx, reference.affine_flow_warp),
                (image, theta, flow), need, grad) + (None, None, None)
        grads = afw_bwd(grad, image, theta, flow, ctx.align_corners, ctx.padding,
                        ctx.deterministic, *need)
        return _only(need, grads) + (None, None, None)

    torch.library.register_autograd(cfwd, compose_backward, setup_context=setup)
    torch.library.register_autograd(afwd, afw_backward, setup_context=setup)
    return {"compose": getattr(ns, f"compose_fwd{suffix}"),
            "affine_flow_warp": getattr(ns, f"affine_flow_warp_fwd{suffix}")}


def _reference(ctx, op):
    """``op`` from reference.py with the options the forward saved on ``ctx``."""
    padding = reference.PADDINGS[ctx.padding]
    return lambda *tensors: op(*tensors, ctx.align_corners, padding)


def _only(need, grads) -> tuple:
    return tuple(g if n else None for n, g in zip(need, grads, strict=True))


def _register_saved() -> None:
    """Fake kernels and autograd of the CPU pair ``affine_flow_warp_fwd_saved(image, theta, flow,
    ...) -> (out, saved)``, ``saved`` (B, 6C, D, H, W) holding d out / d q and d out / d p_hat in
    the accumulation dtype, and ``affine_flow_warp_bwd_saved(grad, saved, ...) -> [d theta,
    d flow]``: only theta and flow get gradients, and the backward loads neither flow nor image."""
    fwd, bwd = "gvsl_fast::affine_flow_warp_fwd_saved", "gvsl_fast::affine_flow_warp_bwd_saved"
    backward_op = torch.ops.gvsl_fast.affine_flow_warp_bwd_saved

    @torch.library.register_fake(fwd)
    def _(image, theta, flow, align_corners, padding):
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        return (torch.empty_like(image),
                image.new_empty((image.shape[0], 6 * image.shape[1], *image.shape[2:]),
                                dtype=acc))

    @torch.library.register_fake(bwd)
    def _(grad, saved, image, theta, flow, align_corners, padding, need_theta, need_flow):
        return [_grad_like(theta, need_theta), _grad_like(flow, need_flow)]

    def setup(ctx, inputs, output):
        image, theta, flow, ctx.align_corners, ctx.padding = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero tensor for saved's gradient
        ctx.save_for_backward(output[1], image, theta, flow)

    def backward(ctx, grad, _grad_saved):
        saved, image, theta, flow = ctx.saved_tensors
        need = ctx.needs_input_grad[1:3]
        if grad is None:  # an undefined (not materialized) grad is a zero one
            return None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True
            grads = _autodiff.reference_grads(
                "affine_flow_warp", _reference(ctx, reference.affine_flow_warp),
                (image, theta, flow), (False, *need), grad)
            return (*grads, None, None)
        grads = backward_op(_backend.layout(grad), saved, image, theta, flow, ctx.align_corners,
                            ctx.padding, *need)
        return (None, *_only(need, grads), None, None)

    torch.library.register_autograd(fwd, backward, setup_context=setup)


_OPS = {"triton": _register("_triton")}
if _backend.extension_error() is None:
    _OPS["cpu"] = _OPS["cuda"] = _register("")
    _register_saved()


# ---- public API -----------------------------------------------------------------------------


def _check(op: str, theta: torch.Tensor, flow: torch.Tensor, align_corners: bool,
           padding_mode: str, image: torch.Tensor | None = None) -> None:
    if image is not None:
        _backend.check_volume(op, "image", image)
    _backend.check_volume(op, "flow", flow, channels=3)
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"{op}: `theta` must be a torch.Tensor, got {type(theta).__name__}")
    if theta.dim() != 3 or tuple(theta.shape[1:]) != (3, 4):
        raise ValueError(f"{op}: `theta` must be (B, 3, 4), got shape {tuple(theta.shape)}")
    if theta.shape[0] != flow.shape[0]:
        raise ValueError(f"{op}: `theta` has batch {theta.shape[0]} but `flow` has "
                         f"{flow.shape[0]}")
    tensors = {"flow": flow, "theta": theta}
    if image is not None:
        if image.shape[0] != flow.shape[0] or image.shape[2:] != flow.shape[2:]:
            raise ValueError(f"{op}: `image` {tuple(image.shape)} and `flow` "
                             f"{tuple(flow.shape)} must share batch and spatial size")
        tensors["image"] = image
    _backend.check_same(op, **tensors)
    _backend.check_flag(op, "align_corners", align_corners)
    _backend.check_choice(op, "padding_mode", padding_mode, reference.PADDINGS)


@_backend.promotes_under_autocast
def compose(theta: torch.Tensor, flow: torch.Tensor, align_corners: bool = False,
            padding_mode: str = "zeros", deterministic: bool | None = None,
            backend: str = "auto") -> torch.Tensor:
    """Displacement of the affine map ``theta`` followed by the deformation ``flow``.

    ``psi(p) = flow(p_hat) + p_hat - p`` with ``p_hat = theta(p)`` in index space, ``flow``
    sampled trilinearly at ``p_hat``; so ``warp(image, psi)(p) = image(p_hat + flow(p_hat))``.
    The identity ``theta`` with a zero ``flow`` gives exactly zero.

    Args:
        theta: ``(B, 3, 4)`` affine in ``F.affine_grid``'s normalized (x, y, z) convention.
        flow: ``(B, 3, D, H, W)`` displacement in voxels, channels in (D, H, W) order.
        align_corners: the meaning of ``theta``'s normalized coordinates, as ``F.affine_grid``.
        padding_mode: ``"zeros"`` or ``"border"``, for sampling ``flow`` outside the volume.
        deterministic: bit-reproducible ``flow`` gradient on the GPU (fixed-point atomics,
            slower); ``None`` follows ``torch.are_deterministic_algorithms_enabled()``. The CPU
            backward is always reproducible.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``psi``, ``(B, 3, D, H, W)`` in voxels, in ``flow``'s dtype. Differentiable in ``theta``
        and ``flow``.

    Raises:
        TypeError, ValueError: bad shapes, dtypes (mixed ones promote under ``torch.autocast``),
            devices or options (naming the argument).
        RuntimeError: the requested backend is not available here.
    """
    _check("compose", theta, flow, align_corners, padding_mode)
    det = _backend.deterministic("compose", deterministic)
    be = _backend.resolve("compose", backend, [flow, theta])
    if be == "reference":
        return reference.compose(theta, flow, align_corners, padding_mode)
    return _OPS[be]["compose"](theta.contiguous(), _backend.layout(flow), align_corners,
                               PADDING_CODES[padding_mode], det)


@_backend.promotes_under_autocast
def affine_flow_warp(image: torch.Tensor, theta: torch.Tensor, flow: torch.Tensor,
                     align_corners: bool = False, padding_mode: str = "zeros",
                     deterministic: bool | None = None, backend: str = "auto") -> torch.Tensor:
    """``warp(image, compose(theta, flow))`` in one pass, without ``psi`` in memory.

    ``out(p) = image(q)`` with ``q = p_hat + flow(p_hat)`` and ``p_hat = theta(p)``; one
    ``padding_mode`` governs both the sampling of ``flow`` at ``p_hat`` and of ``image`` at ``q``.

    Args:
        image: ``(B, C, D, H, W)`` volume, any number of channels.
        theta: ``(B, 3, 4)`` affine in ``F.affine_grid``'s normalized (x, y, z) convention.
        flow: ``(B, 3, D, H, W)`` displacement in voxels (D, H, W order), image's spatial size.
        align_corners: the meaning of ``theta``'s normalized coordinates, as ``F.affine_grid``.
        padding_mode: ``"zeros"`` or ``"border"``.
        deterministic: bit-reproducible ``flow`` and ``image`` gradients on the GPU (fixed-point
            atomics, slower); ``None`` follows ``torch.are_deterministic_algorithms_enabled()``.
            The CPU backward is always reproducible.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        The warped image, ``(B, C, D, H, W)`` in ``image``'s dtype. Differentiable in ``theta``
        and ``flow``, and in ``image`` when it requires grad (a scatter, skipped otherwise).

    Raises:
        TypeError, ValueError: bad shapes, dtypes (mixed ones promote under ``torch.autocast``),
            devices or options (naming the argument).
        RuntimeError: the requested backend is not available here.
    """
    _check("affine_flow_warp", theta, flow, align_corners, padding_mode, image)
    det = _backend.deterministic("affine_flow_warp", deterministic)
    be = _backend.resolve("affine_flow_warp", backend, [flow, theta, image])
    if be == "reference":
        return reference.affine_flow_warp(image, theta, flow, align_corners, padding_mode)
    args = (_backend.layout(image), theta.contiguous(), _backend.layout(flow), align_corners,
            PADDING_CODES[padding_mode])
    if _sampler.saves_derivative(be, image, (theta, flow), "bilinear"):
        return torch.ops.gvsl_fast.affine_flow_warp_fwd_saved(*args)[0]
    return _OPS[be]["affine_flow_warp"](*args, det)
