"""Triton backend of the fused local NCC (DESIGN §3).

Window sums are separable running sums: one kernel runs a running sum along one axis of a
stacked ``(M * B * C, D, H, W)`` float32 tensor, one program per block of lines (so the work per
voxel does not depend on the window); three launches give the zero-padded box. Per-voxel
kernels compute cc (or per-block loss partials, summed afterwards in a fixed order), the
backward coefficient maps and the gradients with the arithmetic of ``csrc/lncc.h``. Loads are
masked and upcast to float32 at once.

Precision, as the CPU backend: the running sums accumulate in float64 (a float32 one drifts:
what it adds and later subtracts along a line does not cancel exactly, so a constant window
after varying data gets a nonzero variance). The W and H sums are stored rounded to float32, the
full window sums in float64; the statistics (``SII - SI^2/n`` and the like, where the
cancellation is) and the gradients are computed in float64 from them, the other per-voxel
formulas in float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gvsl_fast.kernels.warp import on_device
from gvsl_fast.ops.lncc import forward_fake, make_backward, setup_context

# csrc/lncc.h LnccPreset, constexpr for the kernels' compile-time branches (voxelmorph, 1, takes
# the branches neither names)
GVSL, MONAI = tl.constexpr(0), tl.constexpr(2)
NONE, MEAN = 0, 1  # csrc/lncc.h LnccReduction (sum: 2)
LINES = 64  # lines per program of a running-sum pass
BLOCK = 256 if os.environ.get("TRITON_INTERPRET") == "1" else 1024  # voxels per program


@triton.jit
def _running_sum_kernel(x_ptr, y_ptr, n_lines, L, inner, R: tl.constexpr, LINES: tl.constexpr):
    """y = zero-padded window sum of x (viewed as (outer, L, inner)) along L, window 2R + 1,
    accumulated in float64 and stored in y's dtype."""
    line = tl.program_id(0) * LINES + tl.arange(0, LINES)
    live = line < n_lines
    base = (line // inner).to(tl.int64) * L * inner + (line % inner)
    acc = tl.zeros([LINES], dtype=tl.float64)
    for j in range(0, R + 1):
        acc += tl.load(x_ptr + base + j * inner, mask=live & (j < L), other=0.0).to(tl.float64)
    for i in range(0, L):
        tl.store(y_ptr + base + i * inner, acc.to(y_ptr.dtype.element_ty), mask=live)
        add = tl.load(x_ptr + base + (i + R + 1) * inner, mask=live & (i + R + 1 < L), other=0.0)
        sub = tl.load(x_ptr + base + (i - R) * inner, mask=live & (i - R >= 0), other=0.0)
        acc += add.to(tl.float64) - sub.to(tl.float64)


@triton.jit
def _stack_inputs_kernel(a_ptr, b_ptr, x_ptr, N, BLOCK: tl.constexpr):
    """x[0..4] = I, J, I^2, J^2, IJ (float32)."""
    N = tl.cast(N, tl.int64)  # the stacked volumes' offsets q * N pass 2^31 before N does
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    i = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
    j = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, i, mask=m)
    tl.store(x_ptr + N + offs, j, mask=m)
    tl.store(x_ptr + 2 * N + offs, i * i, mask=m)
    tl.store(x_ptr + 3 * N + offs, j * j, mask=m)
    tl.store(x_ptr + 4 * N + offs, i * j, mask=m)


@triton.jit
def _stats(s_ptr, offs, m, N, n):
    """cross, Ivar, Jvar, muI, muJ (float32) from the float64 window sums, computed in float64
    (lncc_stats<double> of csrc/lncc.h)."""
    si = tl.load(s_ptr + offs, mask=m, other=0.0)
    sj = tl.load(s_ptr + N + offs, mask=m, other=0.0)
    sii = tl.load(s_ptr + 2 * N + offs, mask=m, other=0.0)
    sjj = tl.load(s_ptr + 3 * N + offs, mask=m, other=0.0)
    sij = tl.load(s_ptr + 4 * N + offs, mask=m, other=0.0)
    mui = si / n  # float64: n (= window^3, exact in float32) promotes
    muj = sj / n
    one = n == 1.0  # a one-voxel window: zero statistics, as in exact arithmetic (csrc/lncc.h)
    cross = tl.where(one, 0.0, sij - si * muj)
    ivar = tl.where(one, 0.0, sii - si * mui)
    jvar = tl.where(one, 0.0, sjj - sj * muj)
    return (cross.to(tl.float32), ivar.to(tl.float32), jvar.to(tl.float32), mui.to(tl.float32),
            muj.to(tl.float32))


@triton.jit
def _cc(cross, ivar, jvar, eps, smooth_nr, PRESET: tl.constexpr):
    if PRESET == MONAI:
        return (cross * cross + smooth_nr) * (1.0 / (tl.maximum(ivar, eps) * tl.maximum(jvar, eps)))
    return cross / (ivar * jvar + eps) * cross


@triton.jit
def _cc_kernel(s_ptr, out_ptr, partial_ptr, N, n, eps, smooth_nr, PRESET: tl.constexpr,
               MAP: tl.constexpr, BLOCK: tl.constexpr):
    """The cc map (MAP) or one partial sum of the loss terms per program."""
    N = tl.cast(N, tl.int64)  # offsets q * N into the stacked sums
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    cross, ivar, jvar, mui, muj = _stats(s_ptr, offs, m, N, n)
    cc = _cc(cross, ivar, jvar, eps, smooth_nr, PRESET)
    if MAP:
        tl.store(out_ptr + offs, cc.to(out_ptr.dtype.element_ty), mask=m)
    else:
        term = 1.0 - cc if PRESET == GVSL else -cc
        tl.store(partial_ptr + pid, tl.sum(tl.where(m, term, 0.0), axis=0))


@triton.jit
def _coef_kernel(s_ptr, g_ptr, c_ptr, partial_ptr, N, n, eps, smooth_nr, PRESET: tl.constexpr,
                 G_SCALAR: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr,
                 LOSS: tl.constexpr, BLOCK: tl.constexpr):
    """Coefficient maps a; a*muJ, b, b*muI (NEED_A); a*muI, c, c*muJ (NEED_B); with LOSS also
    one partial sum of the loss terms per program (the forward of a reduced loss)."""
    N = tl.cast(N, tl.int64)  # offsets q * N into the stacked sums and maps
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    cross, ivar, jvar, mui, muj = _stats(s_ptr, offs, m, N, n)
    if G_SCALAR:
        g = tl.load(g_ptr)
    else:
        g = tl.load(g_ptr + offs, mask=m, other=0.0)
    if PRESET == MONAI:
        iv = tl.maximum(ivar, eps)
        jv = tl.maximum(jvar, eps)
        inv = 1.0 / (iv * jv)  # one division: 1/iv = jv * inv, 1/jv = iv * inv
        cc = (cross * cross + smooth_nr) * inv
        ka = 2.0 * g * cross * inv
        kb = tl.where(ivar >= eps, 2.0 * g * cc * jv * inv, 0.0)
        kc = tl.where(jvar >= eps, 2.0 * g * cc * iv * inv, 0.0)
    else:
        r = cross / (ivar * jvar + eps)
        cc = r * cross
        ka = 2.0 * g * r
        kb = 2.0 * g * r * r * jvar
        kc = 2.0 * g * r * r * ivar
    if LOSS:
        term = 1.0 - cc if PRESET == GVSL else -cc
        tl.store(partial_ptr + pid, tl.sum(tl.where(m, term, 0.0), axis=0))
    tl.store(c_ptr + offs, ka, mask=m)
    q = 1
    if NEED_A:
        tl.store(c_ptr + N + offs, ka * muj, mask=m)
        tl.store(c_ptr + 2 * N + offs, kb, mask=m)
        tl.store(c_ptr + 3 * N + offs, kb * mui, mask=m)
        q = 4
    if NEED_B:
        tl.store(c_ptr + q * N + offs, ka * mui, mask=m)
        tl.store(c_ptr + (q + 1) * N + offs, kc, mask=m)
        tl.store(c_ptr + (q + 2) * N + offs, kc * muj, mask=m)


@triton.jit
def _grad_kernel(box_ptr, a_ptr, b_ptr, scale_ptr, ga_ptr, gb_ptr, N, NEED_A: tl.constexpr,
                 NEED_B: tl.constexpr, BLOCK: tl.constexpr):
    """dL/dI = J Box(a) - Box(a muJ) - I Box(b) + Box(b muI); likewise for dL/dJ; times the
    scalar at scale_ptr. In float64, from the float64 window sums (lncc_grad<double> of
    csrc/lncc.h: its terms cancel where the images are smooth), stored through float32 (the
    interpreter mangles float64 -> bfloat16)."""
    N = tl.cast(N, tl.int64)  # offsets q * N into the stacked window sums
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    scale = tl.load(scale_ptr).to(tl.float64)
    i = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32).to(tl.float64)
    j = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32).to(tl.float64)
    box_a = tl.load(box_ptr + offs, mask=m, other=0.0)
    q = 1
    if NEED_A:
        amu = tl.load(box_ptr + N + offs, mask=m, other=0.0)
        bb = tl.load(box_ptr + 2 * N + offs, mask=m, other=0.0)
        bmu = tl.load(box_ptr + 3 * N + offs, mask=m, other=0.0)
        ga = (scale * (j * box_a - amu - i * bb + bmu)).to(tl.float32)
        tl.store(ga_ptr + offs, ga.to(ga_ptr.dtype.element_ty), mask=m)
        q = 4
    if NEED_B:
        amu = tl.load(box_ptr + q * N + offs, mask=m, other=0.0)
        cb = tl.load(box_ptr + (q + 1) * N + offs, mask=m, other=0.0)
        cmu = tl.load(box_ptr + (q + 2) * N + offs, mask=m, other=0.0)
        gb = (scale * (i * box_a - amu - j * cb + cmu)).to(tl.float32)
        tl.store(gb_ptr + offs, gb.to(gb_ptr.dtype.element_ty), mask=m)


def _box(x: torch.Tensor, window: int, reuse_input: bool) -> torch.Tensor:
    """Zero-padded window sums (float64) of the stacked float32 volumes ``x`` (V, D, H, W): three
    running-sum passes (W, H, D), the first two into float32 buffers (as the CPU backend rounds its
    row and plane sums), the last into a float64 one. With ``reuse_input`` the H pass overwrites
    ``x`` (a temporary of the caller's); else ``x`` is left as it was (the forward's coefficient
    maps, saved for backward: a second backward over the graph reads them again)."""
    V, D, H, W = x.shape
    y = torch.empty_like(x)
    z = x if reuse_input else torch.empty_like(x)
    out = torch.empty(x.shape, device=x.device, dtype=torch.float64)
    for (L, inner), src, dst in zip(((W, 1), (H, W), (D, H * W)), (x, y, z), (y, z, out),
                                    strict=True):
        lines = src.numel() // L
        _running_sum_kernel[(triton.cdiv(lines, LINES),)](src, dst, lines, L, inner,
                                                          R=window // 2, LINES=LINES)
    return out


def _window_sums(a: torch.Tensor, b: torch.Tensor, window: int) -> torch.Tensor:
    """The five window sums SI, SJ, SII, SJJ, SIJ as a (5, N) float64 tensor."""
    N = a.numel()
    D, H, W = a.shape[2:]
    x = torch.empty((5, N), device=a.device, dtype=torch.float32)
    _stack_inputs_kernel[(triton.cdiv(N, BLOCK),)](a, b, x, N, BLOCK=BLOCK)
    return _box(x.view(-1, D, H, W), window, reuse_input=True).view(5, N)


@torch.library.custom_op("gvsl_fast::lncc_triton_forward", mutates_args=())
def lncc_forward(a: torch.Tensor, b: torch.Tensor, window: int, eps: float, preset: int,
                 smooth_nr: float, reduction: int, need_a: bool,
                 need_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the cc map or the loss, the coefficient maps for a unit dL/dcc where the loss is reduced
    and an input needs a gradient): as the CPU and CUDA ops."""
    with on_device(a):
        x, a, b = a, a.contiguous(), b.contiguous()
        N = a.numel()
        n = float(window**3)
        s = _window_sums(a, b, window)
        grid = (triton.cdiv(N, BLOCK),)
        if reduction == NONE:
            # the map in the input's layout, as the fake (and the CPU and CUDA ops) say: the
            # kernel writes it contiguous, copied over for a channels_last input
            out = torch.empty_like(x)
            cc = out if out.is_contiguous() else a.new_empty(a.shape)
            _cc_kernel[grid](s, cc, cc, N, n, eps, smooth_nr, PRESET=preset, MAP=True,
                             BLOCK=BLOCK)
            return (out if cc is out else out.copy_(cc)), a.new_empty(0)
        partial = torch.empty(grid[0], device=a.device, dtype=torch.float32)
        coef = partial.new_empty(0)
        if need_a or need_b:  # the loss terms come with the maps, from one read of the sums
            coef = _coefs(s, torch.ones(1, device=a.device), a, window, eps, preset, smooth_nr,
                          need_a, need_b, partial)
        else:
            _cc_kernel[grid](s, partial, partial, N, n, eps, smooth_nr, PRESET=preset,
                             MAP=False, BLOCK=BLOCK)
    total = partial.double().sum()  # a fixed-order reduction
    if reduction == MEAN:
        total = total / N
    return total.float(), coef


lncc_forward.register_fake(forward_fake)


def _coefs(s, g, a, window, eps, preset, smooth_nr, need_a, need_b, partial=None):
    """The coefficient maps (Q, B*C, D, H, W) for dL/dcc = g (a map, or one value) from the
    window sums; with ``partial``, also the per-program loss partials into it."""
    N = a.numel()
    scalar = g.numel() == 1
    g = g.reshape(1) if scalar else g.contiguous()
    Q = 1 + 3 * need_a + 3 * need_b
    coef = torch.empty((Q, N), device=a.device, dtype=torch.float32)
    loss = partial is not None
    _coef_kernel[(triton.cdiv(N, BLOCK),)](s, g, coef, partial if loss else coef, N,
                                           float(window**3), eps, smooth_nr, PRESET=preset,
                                           G_SCALAR=scalar, NEED_A=need_a, NEED_B=need_b,
                                           LOSS=loss, BLOCK=BLOCK)
    B, C, D, H, W = a.shape
    return coef.view(Q, B * C, D, H, W)


@torch.library.custom_op("gvsl_fast::lncc_triton_backward", mutates_args=())
def lncc_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor,
                  window: int, eps: float, preset: int, smooth_nr: float, need_a: bool,
                  need_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/da, dL/db: from the forward's coefficient maps scaled by the scalar ``grad``, or (no
    maps: reduction none) from maps recomputed for the dL/dcc map ``grad``."""
    ga, gb = _grad_buffers(a, b, need_a, need_b)
    if not (need_a or need_b):
        return ga, gb
    with on_device(a):
        a, b = a.contiguous(), b.contiguous()
        D, H, W = a.shape[2:]
        saved = coef.numel() > 0
        scale = grad.reshape(1).float() if saved else torch.ones(1, device=a.device)
        if not saved:
            coef = _coefs(_window_sums(a, b, window), grad, a, window, eps, preset, smooth_nr,
                          need_a, need_b)
        box = _box(coef.view(-1, D, H, W), window, reuse_input=not saved)
        N = a.numel()
        _grad_kernel[(triton.cdiv(N, BLOCK),)](box, a, b, scale, ga, gb, N, NEED_A=need_a,
                                               NEED_B=need_b, BLOCK=BLOCK)
    return ga, gb


def _grad_buffers(a, b, need_a, need_b):
    """Contiguous gradient maps for the inputs that need one, else empty tensors."""
    ga = a.new_empty(a.shape) if need_a else a.new_empty(0)
    gb = b.new_empty(b.shape) if need_b else b.new_empty(0)
    return ga, gb


@lncc_backward.register_fake
def _(grad, a, b, coef, window, eps, preset, smooth_nr, need_a, need_b):
    return _grad_buffers(a, b, need_a, need_b)


lncc_forward.register_autograd(make_backward(lncc_backward), setup_context=setup_context)
