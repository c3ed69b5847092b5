"""Autograd and torch.compile glue shared by the sampler ops (warp, grid_sample, affine_warp).

Each op is a pair ``<name>_forward(image, pos, *args)`` / ``<name>_backward(grad_out, image,
pos, *args, image_grad, pos_grad) -> (d image, d pos)``, where ``pos`` is the flow, the grid or
theta and ``args`` the op's options. Two implementations share that schema: the C++ extension
(``torch.ops.gvsl_fast``, CPU and CUDA kernels) and Triton (``torch.ops.gvsl_fast_triton``,
custom ops defined in the op modules). Gradients not asked for come back as empty tensors.
warp and grid_sample also have a CPU-only saved-derivative pair (``register_saved``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gvsl_fast.ops import _autodiff, _backend

MODE_CODES = {"bilinear": 0, "nearest": 1}
PADDING_CODES = {"zeros": 0, "border": 1}
TRITON_NS = "gvsl_fast_triton"


def memory_format(image: torch.Tensor) -> torch.memory_format:
    """Layout of a sampler's output: channels_last_3d only for an image that is strictly that."""
    if not image.is_contiguous() and image.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def new_output(image: torch.Tensor, spatial) -> torch.Tensor:
    shape = (image.shape[0], image.shape[1], *spatial)
    return image.new_empty(shape).contiguous(memory_format=memory_format(image))


def grad_like(t: torch.Tensor, wanted: bool) -> torch.Tensor:
    return torch.empty_like(t) if wanted else t.new_empty(0)


def register(qualname: str, out_spatial: Callable[[torch.Tensor, torch.Tensor], tuple],
             reference: Callable[..., torch.Tensor]) -> None:
    """Fake kernels for ``qualname``'s forward and backward, and autograd for the forward;
    ``reference(image, pos, *args)`` is the op in ``reference.py``, for double backward."""
    ns, name = qualname.split("::")
    backward_op = getattr(getattr(torch.ops, ns), f"{name}_backward")

    @torch.library.register_fake(f"{qualname}_forward")
    def _fake_forward(image, pos, *args):
        return new_output(image, out_spatial(image, pos))

    @torch.library.register_fake(f"{qualname}_backward")
    def _fake_backward(grad_out, image, pos, *args):
        *_, image_grad, pos_grad = args
        return grad_like(image, image_grad), grad_like(pos, pos_grad)

    def setup_context(ctx, inputs, output):
        image, pos, *args = inputs
        ctx.save_for_backward(image, pos)
        ctx.args = args

    def backward(ctx, grad_out):
        image, pos = ctx.saved_tensors
        need_image, need_pos = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph=True
            return _autodiff.reference_grads(
                name, lambda i, p: reference(i, p, *ctx.args), (image, pos),
                (need_image, need_pos), grad_out) + (None,) * len(ctx.args)
        d_image, d_pos = backward_op(
            _backend.layout(grad_out), image, pos, *ctx.args, need_image, need_pos
        )
        return (d_image if need_image else None, d_pos if need_pos else None,
                *([None] * len(ctx.args)))

    torch.library.register_autograd(f"{qualname}_forward", backward, setup_context=setup_context)


# CPU only, up to this many channels: when the backward will want the position gradient alone
# (the image is data, as in VoxelMorph's and MONAI's warp), the forward also saves d out / d
# position (3C floats per output voxel, from the corner loads it makes anyway; affine_flow_warp
# 6C: d out / d q and d out / d p_hat) and the backward is a streaming product (plus, for
# affine_flow_warp, the scatter to d flow) instead of a second pass over the stencils. On the
# GPU the second pass is cheaper than the extra bytes, and for many channels the saved tensor
# would be large.
SAVED_DERIVATIVE_CHANNELS = 4


def saves_derivative(backend: str, image: torch.Tensor, positions: Sequence[torch.Tensor],
                     mode: str) -> bool:
    """Whether a forward on ``backend`` takes the saved-derivative ops (see above): some of
    ``positions`` (flow, grid; theta and flow for affine_flow_warp) require grad, the image not."""
    return (backend == "cpu" and mode == "bilinear" and torch.is_grad_enabled()
            and any(p.requires_grad for p in positions) and not image.requires_grad
            and image.shape[1] <= SAVED_DERIVATIVE_CHANNELS)


def register_saved(qualname: str, out_spatial: Callable[[torch.Tensor, torch.Tensor], tuple],
                   reference: Callable[..., torch.Tensor]) -> None:
    """Fake kernels and autograd for ``qualname``'s saved-derivative pair:
    ``<name>_forward_saved(image, pos, *args) -> (out, dpos)`` with dpos (B, 3C, D', H', W') in
    the accumulation dtype, and ``<name>_backward_saved(grad_out, dpos, image, pos, *args) ->
    d pos``. Only the position gets a gradient; ``reference`` as for :func:`register`."""
    ns, name = qualname.split("::")
    backward_op = getattr(getattr(torch.ops, ns), f"{name}_backward_saved")

    @torch.library.register_fake(f"{qualname}_forward_saved")
    def _fake_forward(image, pos, *args):
        out = new_output(image, out_spatial(image, pos))
        acc = torch.float64 if image.dtype == torch.float64 else torch.float32
        return out, image.new_empty((out.shape[0], 3 * out.shape[1], *out.shape[2:]), dtype=acc)

    @torch.library.register_fake(f"{qualname}_backward_saved")
    def _fake_backward(grad_out, dpos, image, pos, *args):
        return torch.empty_like(pos)

    def setup_context(ctx, inputs, output):
        image, pos, *args = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero tensor for dpos's gradient
        ctx.save_for_backward(output[1], image, pos)
        ctx.args = args

    def backward(ctx, grad_out, _grad_dpos):
        dpos, image, pos = ctx.saved_tensors
        nones = (None,) * len(ctx.args)
        if grad_out is None:  # an undefined grad_out (not materialized) is a zero one
            return (None, None, *nones)
        if torch.is_grad_enabled():  # create_graph=True
            return _autodiff.reference_grads(
                name, lambda i, p: reference(i, p, *ctx.args), (image, pos), (False, True),
                grad_out) + nones
        d_pos = backward_op(_backend.layout(grad_out), dpos, image, pos, *ctx.args)
        return (None, d_pos, *nones)

    torch.library.register_autograd(f"{qualname}_forward_saved", backward,
                                    setup_context=setup_context)


def or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A gradient not asked for travels through the op schemas as an empty tensor."""
    return like.new_empty(0) if t is None else t


def op_namespace(backend: str):
    """``torch.ops`` namespace implementing the sampler ops for a resolved backend."""
    return getattr(torch.ops, TRITON_NS) if backend == "triton" else torch.ops.gvsl_fast
