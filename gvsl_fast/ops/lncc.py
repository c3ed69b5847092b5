"""Fused local normalized cross-correlation (DESIGN §3) and drop-in loss modules.

``lncc`` computes the five zero-padded window sums with separable running sums (work per voxel
independent of the window) and reduces ``mean``/``sum`` inside the kernel (no cc map is
written). The backward box-sums per-voxel coefficient maps (1 + 3 per input that requires grad;
DESIGN §3). They are linear in dL/dcc, which a reduced loss makes one scalar, so for ``mean`` and
``sum`` the forward leaves them (unit dL/dcc) and the backward only scales their window sums;
for ``none`` the backward recomputes them from the inputs and the upstream map.

Drop-in modules: :class:`NCC` (VoxelMorph's ``NCC(win).loss(y_true, y_pred)``) and
:class:`LocalNormalizedCrossCorrelationLoss` (MONAI's rectangular-kernel loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gvsl_fast.ops import _autodiff, _backend, reference
from gvsl_fast.ops.reference import PRESETS, REDUCTIONS

__all__ = ["lncc", "NCC", "LocalNormalizedCrossCorrelationLoss"]

OP = "lncc"
CUDA_MAX_WINDOW = 15  # the CUDA kernels keep a window-deep ring of planes in registers
# Codes shared with csrc/lncc.h (LnccPreset: PRESETS order; LnccReduction) and kernels/lncc.py.
REDUCTIONS_CODE = {"none": 0, "mean": 1, "sum": 2}


def _constant(name: str, value: float, positive: bool) -> float:
    """``value`` as a float if finite and > 0 (``positive``) or >= 0, else a ValueError naming
    ``name``: a zero ``eps`` makes every flat window (any background) 0 / 0 = NaN."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{OP}: `{name}` must be a finite number {'>' if positive else '>='} 0, "
                         f"got {value!r}")
    return v


def _check(a: torch.Tensor, b: torch.Tensor, window: int, reduction: str, preset: str,
           eps: float, smooth_nr: float) -> None:
    _constant("eps", eps, positive=True)
    _constant("smooth_nr", smooth_nr, positive=False)
    _backend.check_volume(OP, "a", a)
    _backend.check_volume(OP, "b", b)
    if a.shape != b.shape:
        raise ValueError(f"{OP}: `a` and `b` must have one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    _backend.check_same(OP, a=a, b=b)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"{OP}: `window` must be an odd positive int, got {window!r}")
    _backend.check_choice(OP, "reduction", reduction, REDUCTIONS)
    _backend.check_choice(OP, "preset", preset, PRESETS)


@_backend.promotes_under_autocast
def lncc(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5,
         reduction: str = "mean", preset: str = "gvsl", backend: str = "auto", *,
         smooth_nr: float = 0.0) -> torch.Tensor:
    """Local normalized cross-correlation of two volumes over cubic windows of side ``window``.

    Args:
        a: ``(B, C, D, H, W)`` volume (in GVSL the warped image, the only input needing grad).
        b: volume of the same shape, device and dtype as ``a``.
        window: odd window side ``k``; zero padding, fixed count ``k^3``.
        eps: ``cc = cross^2 / (Ivar Jvar + eps)`` (gvsl, voxelmorph); for ``monai`` the variances
            are clamped to at least ``eps`` (MONAI's ``smooth_dr``).
        reduction: ``"mean"`` or ``"sum"`` of ``1 - cc`` (gvsl) or ``-cc`` (voxelmorph, monai),
            a float32 scalar (float64 for float64 input); ``"none"`` returns the ``cc`` map in the
            input dtype.
        preset: ``"gvsl"``, ``"voxelmorph"`` or ``"monai"``.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.
        smooth_nr: added to ``cross^2`` by the ``monai`` preset (MONAI's ``smooth_nr``).

    Returns:
        The loss scalar, or the ``cc`` map for ``reduction="none"``.

    Raises:
        ValueError: wrong rank, empty input, shape or device mismatch, even window, bad option,
            ``eps`` not > 0 or ``smooth_nr`` not >= 0 (or either not finite).
        TypeError: non-floating dtypes, or mismatched ones outside ``torch.autocast``.
        RuntimeError: the requested backend cannot run here (the message says why).
    """
    _check(a, b, window, reduction, preset, eps, smooth_nr)
    be = _backend.resolve(OP, backend, [a, b])
    if be == "cuda" and window > CUDA_MAX_WINDOW:
        if backend == "cuda":
            raise RuntimeError(f"{OP}: backend='cuda' supports windows up to {CUDA_MAX_WINDOW}, "
                               f"got {window}; use backend='triton'")
        be = _large_window_backend(a)
    if be == "reference":
        return reference.lncc(a, b, window, eps, reduction, preset, smooth_nr=smooth_nr)
    a, b = _backend.layout(a), _backend.layout(b)
    grad = torch.is_grad_enabled()
    args = (a, b, window, float(eps), PRESETS.index(preset), float(smooth_nr),
            REDUCTIONS_CODE[reduction], grad and a.requires_grad, grad and b.requires_grad)
    if be == "triton":
        from gvsl_fast.kernels import lncc as triton_lncc

        return triton_lncc.lncc_forward(*args)[0]
    return torch.ops.gvsl_fast.lncc_forward(*args)[0]


def _large_window_backend(a: torch.Tensor) -> str:
    """Where backend='auto' runs a window the CUDA kernels do not take: Triton, else the
    reference (said once, as _backend.resolve says its fallbacks)."""
    why = _backend.why_not("triton", a.device, a.dtype)
    if why is None:
        return "triton"
    return _backend.fallback(OP, f"windows over {CUDA_MAX_WINDOW} (the CUDA kernels' limit) "
                                 f"need Triton: {why}")


def grad_of_cc(grad: torch.Tensor, a: torch.Tensor, reduction: int) -> torch.Tensor:
    """``dL/dcc`` in the accumulation dtype: the upstream map for ``none``, else one scalar
    (``-grad / N`` for mean, ``-grad`` for sum: each loss term is ``c - cc``)."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    if reduction == REDUCTIONS_CODE["none"]:
        return grad.to(acc)
    scale = -1.0 / a.numel() if reduction == REDUCTIONS_CODE["mean"] else -1.0
    return grad.to(acc) * scale


def setup_context(ctx, inputs, output) -> None:
    a, b, window, eps, preset, smooth_nr, reduction, need_a, need_b = inputs
    coef = output[1]
    ctx.mark_non_differentiable(coef)
    ctx.set_materialize_grads(False)  # else autograd fills a zero "gradient" of the maps each step
    ctx.save_for_backward(a, b, coef)
    ctx.params = (window, eps, preset, smooth_nr)
    ctx.reduction = reduction


def make_backward(backward_op):
    """The autograd backward of a forward op whose gradients come from `backward_op`, which
    computes only the maps asked for (from the forward's coefficient maps where it left them)."""

    def backward(ctx, grad: torch.Tensor, _grad_coef: torch.Tensor | None):
        if grad is None:  # grads are not materialized: none reached the loss
            return (None,) * 9
        a, b, coef = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph=True
            window, eps, preset, smooth_nr = ctx.params
            reduction = next(k for k, v in REDUCTIONS_CODE.items() if v == ctx.reduction)
            return _autodiff.reference_grads(
                OP, lambda x, y: reference.lncc(x, y, window, eps, reduction, PRESETS[preset],
                                                smooth_nr=smooth_nr),
                (a, b), (need_a, need_b), grad) + (None,) * 7
        g = grad_of_cc(grad, a, ctx.reduction)
        ga, gb = backward_op(g, a, b, coef, *ctx.params, need_a, need_b)
        return (ga if need_a else None, gb if need_b else None) + (None,) * 7

    return backward


def forward_fake(a, b, window, eps, preset, smooth_nr, reduction, need_a, need_b):
    """Shapes of the forward ops' (output, coefficient maps), for every backend."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    if reduction == REDUCTIONS_CODE["none"]:
        return torch.empty_like(a), a.new_empty(0)
    maps = 1 + 3 * need_a + 3 * need_b if need_a or need_b else 0
    D, H, W = a.shape[2:]
    coef = a.new_empty((maps, a.shape[0] * a.shape[1], D, H, W) if maps else (0,), dtype=acc)
    return a.new_empty((), dtype=acc), coef


def _register() -> None:
    if _backend.extension_error() is not None:
        return

    torch.library.register_fake("gvsl_fast::lncc_forward")(forward_fake)

    @torch.library.register_fake("gvsl_fast::lncc_backward")
    def _(grad, a, b, coef, window, eps, preset, smooth_nr, need_a, need_b):
        ga = torch.empty_like(a) if need_a else a.new_empty(0)
        gb = torch.empty_like(b) if need_b else b.new_empty(0)
        return ga, gb

    torch.library.register_autograd("gvsl_fast::lncc_forward",
                                    make_backward(torch.ops.gvsl_fast.lncc_backward),
                                    setup_context=setup_context)


_register()


# ---- drop-in modules -------------------------------------------------------------------------


def _window_side(arg: str, win: int | Sequence[int] | None, default: int = 9) -> int:
    """One odd cubic window side from an int or a per-axis list of equal sides (VoxelMorph
    style); errors name the module's argument ``arg``."""
    if win is None:
        return default
    if isinstance(win, (list, tuple)) and len(win) != 3:
        raise ValueError(f"{OP}: `{arg}` must be one side or three (the volumes are 3-D), got "
                         f"{win!r}")
    sides = set(win) if isinstance(win, (list, tuple)) else {win}
    if len(sides) != 1:
        raise ValueError(f"{OP}: `{arg}` must give one side for every axis (only cubic windows "
                         f"are supported), got {win!r}")
    side = sides.pop()
    if isinstance(side, bool) or not isinstance(side, int) or side < 1 or side % 2 == 0:
        raise ValueError(f"{OP}: `{arg}` must be an odd positive int, got {win!r}")
    return side


class NCC:
    """VoxelMorph's local NCC loss: ``NCC(win).loss(y_true, y_pred) = -mean(cc)``.

    Args:
        win: window side (int, or a list of equal sides as VoxelMorph takes); default 9.
        eps: added to ``Ivar * Jvar`` (VoxelMorph uses 1e-5).
        backend: as :func:`lncc`.
    """

    def __init__(self, win: int | Sequence[int] | None = None, eps: float = 1e-5,
                 backend: str = "auto") -> None:
        self.win = _window_side("win", win)
        self.eps = _constant("eps", eps, positive=True)
        _backend.check_choice(OP, "backend", backend, _backend.BACKENDS)
        self.backend = backend

    def loss(self, y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
        """``-mean(cc)`` of ``y_pred`` against ``y_true``, each ``(B, C, D, H, W)``."""
        return lncc(y_pred, y_true, self.win, self.eps, "mean", "voxelmorph", self.backend)


class LocalNormalizedCrossCorrelationLoss(torch.nn.Module):
    """MONAI's ``LocalNormalizedCrossCorrelationLoss`` with the rectangular kernel, 3-D.

    Args:
        spatial_dims: must be 3.
        kernel_size: odd window side (or a list of equal sides).
        kernel_type: must be ``"rectangular"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the ``-cc`` map), as MONAI.
        smooth_nr: added to ``cross^2``.
        smooth_dr: lower clamp of each local variance.
        backend: as :func:`lncc`.

    Raises:
        ValueError: unsupported ``spatial_dims``, ``kernel_type``, even kernel, bad reduction,
            ``smooth_dr`` not > 0 or ``smooth_nr`` not >= 0 (MONAI takes them and returns NaN
            on every flat window).
    """

    def __init__(self, spatial_dims: int = 3, kernel_size: int = 3,
                 kernel_type: str = "rectangular", reduction: str = "mean",
                 smooth_nr: float = 0.0, smooth_dr: float = 1e-5, backend: str = "auto") -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"{OP}: only spatial_dims=3 is supported, got {spatial_dims}")
        if kernel_type != "rectangular":
            raise ValueError(f"{OP}: only kernel_type='rectangular' is supported, got "
                             f"{kernel_type!r}")
        self.kernel_size = _window_side("kernel_size", kernel_size)
        _backend.check_choice(OP, "reduction", str(reduction), REDUCTIONS)
        self.reduction = str(reduction)
        self.smooth_nr = _constant("smooth_nr", smooth_nr, positive=False)
        self.smooth_dr = _constant("smooth_dr", smooth_dr, positive=True)
        _backend.check_choice(OP, "backend", backend, _backend.BACKENDS)
        self.backend = backend

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``-cc`` of ``pred`` against ``target`` (each ``(B, C, D, H, W)``), reduced as set."""
        out = lncc(pred, target, self.kernel_size, self.smooth_dr, self.reduction, "monai",
                   self.backend, smooth_nr=self.smooth_nr)
        return -out if self.reduction == "none" else out
