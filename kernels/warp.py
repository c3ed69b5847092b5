"""Triton trilinear sampler shared by warp, grid_sample and affine_warp (kernels/affine_warp.py).

One kernel skeleton, specialised by ``SOURCE`` (where an output voxel samples): a displacement
field (B, 3, D, H, W), a normalized grid (B, D', H', W', 3), or per-batch affine index maps
(B, 12) fp32. Each program handles ``BLOCK`` output voxels of one batch element as a
(BLOCK, 8) tile of corners, built once and reused for every channel (the channel loop runs
inside the program). Semantics follow csrc/sampling.h and csrc/warp.h: border padding clamps
with zero gradient at and beyond the edge, zeros padding reads far/NaN positions as nothing,
nearest rounds half to even.

Backward: the position gradient is a gather (flow and grid written per voxel; theta as 12
moments per program, summed in a fixed order afterwards); the image gradient is a scatter with
float atomics, or with ``deterministic=True`` int64 fixed-point atomics (integer addition is
associative, so the result is bit-identical run to run).

The affine source's host side lives here too, shared with kernels/compose.py: ``affine_maps``
(theta to the (B, 12) maps, via the reference's ``affine_index_map``) and ``theta_grad`` (the
chain rule from the summed moments back to theta), and ``on_device``, the device guard of every
Triton op's launches (kernels/compose.py, kernels/lncc.py).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from gvsl_fast.ops.reference import affine_index_map, affine_map_coefficients

FLOW, GRID, AFFINE = 0, 1, 2
N_MOMENTS = 12
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 64 if _INTERPRET else 128
_FIXED_POINT_BITS = 62  # headroom of the int64 accumulator
MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2: batch elements per launch


@triton.jit
def _wide(i, WIDE: tl.constexpr):
    """`i` in int64 when WIDE (one sample of 2^31 elements or more), else as it is."""
    if WIDE:
        i = tl.cast(i, tl.int64)  # also a Python int (the interpreter's loop index)
    return i


@triton.jit
def _axis(x, size, BORDER: tl.constexpr, NEAREST: tl.constexpr, WIDE: tl.constexpr):
    """(i0, f, v0, v1, dcoord) of coordinate x on an axis of `size` voxels (linear_axis)."""
    hi = size - 1.0  # `size` may arrive as a constexpr 1 (Triton specialises ints equal to 1)
    if BORDER:
        dc = tl.where((x > 0.0) & (x < hi), 1.0, 0.0)
        x = tl.where(x > 0.0, x, 0.0)  # NaN too
        x = tl.minimum(x, hi)
    else:
        dc = tl.full(x.shape, 1.0, tl.float32)
        x = tl.where((x > -2.0) & (x < size + 1.0), x, -2.0)
    fl = tl.floor(x)
    if NEAREST:  # round half to even, as nearbyint
        fr = x - fl
        odd = (fl - 2.0 * tl.floor(fl * 0.5)) != 0.0
        up = (fr > 0.5) | ((fr == 0.5) & odd)
        i0 = (fl + tl.where(up, 1.0, 0.0)).to(tl.int32)
        f = tl.zeros_like(x)
        dc = tl.zeros_like(x)
        v1 = (i0 < 0) & (i0 >= 0)  # always false: nearest has a single corner
    else:
        i0 = fl.to(tl.int32)
        f = x - fl
        v1 = (i0 + 1 >= 0) & (i0 + 1 < size)
    v0 = (i0 >= 0) & (i0 < size)
    return _wide(i0, WIDE), f, v0, v1, dc


@triton.jit
def _affine_position(m, d, h, w):
    """Input index (d, h, w) of output index (d, h, w) under the (12,) map at `m`: rows
    [m_i0, m_i1, m_i2, t_i] for input axes i = d, h, w (csrc/sampling.h apply_affine)."""
    fd, fh, fw = d.to(tl.float32), h.to(tl.float32), w.to(tl.float32)
    xd = tl.load(m + 0) * fd + tl.load(m + 1) * fh + tl.load(m + 2) * fw + tl.load(m + 3)
    xh = tl.load(m + 4) * fd + tl.load(m + 5) * fh + tl.load(m + 6) * fw + tl.load(m + 7)
    xw = tl.load(m + 8) * fd + tl.load(m + 9) * fh + tl.load(m + 10) * fw + tl.load(m + 11)
    return xd, xh, xw


@triton.jit
def _theta_moments(mo, gd, gh, gw, d, h, w, OD, OH, OW):
    """Stores the 12 moments of one program at `mo` (csrc/warp.h theta_moments): for input axis
    i, sum g_i * (p_j - centre_j) for output axes j, then sum g_i; g is zero on masked lanes."""
    pd = d.to(tl.float32) - 0.5 * (OD - 1.0)
    ph = h.to(tl.float32) - 0.5 * (OH - 1.0)
    pw = w.to(tl.float32) - 0.5 * (OW - 1.0)
    tl.store(mo + 0, tl.sum(gd * pd, axis=0))
    tl.store(mo + 1, tl.sum(gd * ph, axis=0))
    tl.store(mo + 2, tl.sum(gd * pw, axis=0))
    tl.store(mo + 3, tl.sum(gd, axis=0))
    tl.store(mo + 4, tl.sum(gh * pd, axis=0))
    tl.store(mo + 5, tl.sum(gh * ph, axis=0))
    tl.store(mo + 6, tl.sum(gh * pw, axis=0))
    tl.store(mo + 7, tl.sum(gh, axis=0))
    tl.store(mo + 8, tl.sum(gw * pd, axis=0))
    tl.store(mo + 9, tl.sum(gw * ph, axis=0))
    tl.store(mo + 10, tl.sum(gw * pw, axis=0))
    tl.store(mo + 11, tl.sum(gw, axis=0))


@triton.jit
def _positions(pos_ptr, b, d, h, w, mask, ps_b, ps_c, ps_d, ps_h, ps_w, D, H, W,
               SOURCE: tl.constexpr, ALIGN: tl.constexpr):
    """Index positions (d, h, w) sampled by output voxels (d, h, w) of batch element b."""
    if SOURCE == 2:
        xd, xh, xw = _affine_position(pos_ptr + b * 12, d, h, w)
    else:
        p = pos_ptr + b * ps_b + d * ps_d + h * ps_h + w * ps_w
        a0 = tl.load(p, mask=mask, other=0.0).to(tl.float32)
        a1 = tl.load(p + ps_c, mask=mask, other=0.0).to(tl.float32)
        a2 = tl.load(p + ps_c + ps_c, mask=mask, other=0.0).to(tl.float32)
        if SOURCE == 0:
            xd = d.to(tl.float32) + a0
            xh = h.to(tl.float32) + a1
            xw = w.to(tl.float32) + a2
        else:  # grid channels are (x, y, z) = (w, h, d)
            if ALIGN:
                xd = (a2 + 1.0) * 0.5 * (D - 1)
                xh = (a1 + 1.0) * 0.5 * (H - 1)
                xw = (a0 + 1.0) * 0.5 * (W - 1)
            else:
                xd = ((a2 + 1.0) * D - 1.0) * 0.5
                xh = ((a1 + 1.0) * H - 1.0) * 0.5
                xw = ((a0 + 1.0) * W - 1.0) * 0.5
    return xd, xh, xw


@triton.jit
def _stencil(xd, xh, xw, mask, D, H, W, is_d, is_h, is_w, BORDER: tl.constexpr,
             NEAREST: tl.constexpr, WIDE: tl.constexpr):
    """(BLOCK, 8) corner offsets, validity, weights and weight derivatives along d, h, w."""
    id0, fd, vd0, vd1, cd = _axis(xd, D, BORDER, NEAREST, WIDE)
    ih0, fh, vh0, vh1, ch = _axis(xh, H, BORDER, NEAREST, WIDE)
    iw0, fw, vw0, vw1, cw = _axis(xw, W, BORDER, NEAREST, WIDE)
    k = tl.arange(0, 8)
    ci = (k >> 2)[None, :]
    cj = ((k >> 1) & 1)[None, :]
    ck = (k & 1)[None, :]
    vd = tl.where(ci == 1, vd1[:, None], vd0[:, None])
    vh = tl.where(cj == 1, vh1[:, None], vh0[:, None])
    vw = tl.where(ck == 1, vw1[:, None], vw0[:, None])
    ok = vd & vh & vw & mask[:, None]
    off = ((id0[:, None] + ci) * is_d + (ih0[:, None] + cj) * is_h + (iw0[:, None] + ck) * is_w)
    wd = tl.where(ci == 1, fd[:, None], 1.0 - fd[:, None])
    wh = tl.where(cj == 1, fh[:, None], 1.0 - fh[:, None])
    ww = tl.where(ck == 1, fw[:, None], 1.0 - fw[:, None])
    sd = tl.where(ci == 1, cd[:, None], -cd[:, None])
    sh = tl.where(cj == 1, ch[:, None], -ch[:, None])
    sw = tl.where(ck == 1, cw[:, None], -cw[:, None])
    wgt = tl.where(ok, wd * wh * ww, 0.0)
    gd = tl.where(ok, sd * wh * ww, 0.0)
    gh = tl.where(ok, wd * sh * ww, 0.0)
    gw = tl.where(ok, wd * wh * sw, 0.0)
    return tl.where(ok, off, 0), ok, wgt, gd, gh, gw


@triton.jit
def _decode(pid, BLOCK: tl.constexpr, OD, OH, OW, WIDE: tl.constexpr):
    offs = _wide(pid, WIDE) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < OD * OH * OW
    w = offs % OW
    h = (offs // OW) % OH
    d = offs // (OW * OH)
    return d, h, w, mask


@triton.jit
def _forward_kernel(img, pos, out, C, D, H, W, OD, OH, OW,
                    is_b, is_c, is_d, is_h, is_w, os_b, os_c, os_d, os_h, os_w,
                    ps_b, ps_c, ps_d, ps_h, ps_w, b0,
                    SOURCE: tl.constexpr, ALIGN: tl.constexpr, BORDER: tl.constexpr,
                    NEAREST: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64) + b0  # int64: b * is_b passes 2^31 before is_b does
    d, h, w, mask = _decode(tl.program_id(0), BLOCK, OD, OH, OW, WIDE)
    xd, xh, xw = _positions(pos, b, d, h, w, mask, ps_b, ps_c, ps_d, ps_h, ps_w, D, H, W,
                            SOURCE, ALIGN)
    off, ok, wgt, _gd, _gh, _gw = _stencil(xd, xh, xw, mask, D, H, W, is_d, is_h, is_w,
                                          BORDER, NEAREST, WIDE)
    src = img + b * is_b + off
    dst = out + b * os_b + d * os_d + h * os_h + w * os_w
    for c in range(C):
        chan = _wide(c, WIDE)
        v = tl.load(src + chan * is_c, mask=ok, other=0.0).to(tl.float32)
        tl.store(dst + chan * os_c, tl.sum(wgt * v, axis=1).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(img, pos, gout, gimg, gpos, scale_ptr, C, D, H, W, OD, OH, OW,
                     is_b, is_c, is_d, is_h, is_w, os_b, os_c, os_d, os_h, os_w,
                     ps_b, ps_c, ps_d, ps_h, ps_w, b0,
                     SOURCE: tl.constexpr, ALIGN: tl.constexpr, BORDER: tl.constexpr,
                     NEAREST: tl.constexpr, IMAGE_GRAD: tl.constexpr, POS_GRAD: tl.constexpr,
                     FIXED_POINT: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64) + b0  # int64: b * is_b passes 2^31 before is_b does
    d, h, w, mask = _decode(pid, BLOCK, OD, OH, OW, WIDE)
    xd, xh, xw = _positions(pos, b, d, h, w, mask, ps_b, ps_c, ps_d, ps_h, ps_w, D, H, W,
                            SOURCE, ALIGN)
    off, ok, wgt, wd, wh, ww = _stencil(xd, xh, xw, mask, D, H, W, is_d, is_h, is_w,
                                        BORDER, NEAREST, WIDE)
    src = img + b * is_b + off
    dst = gimg + b * is_b + off
    go_ptr = gout + b * os_b + d * os_d + h * os_h + w * os_w
    gd = tl.zeros([BLOCK], tl.float32)
    gh = tl.zeros([BLOCK], tl.float32)
    gw = tl.zeros([BLOCK], tl.float32)
    if FIXED_POINT:
        scale = tl.load(scale_ptr)
    for c in range(C):
        chan = _wide(c, WIDE)
        go = tl.load(go_ptr + chan * os_c, mask=mask, other=0.0).to(tl.float32)
        if IMAGE_GRAD:
            contrib = wgt * go[:, None]
            if FIXED_POINT:
                q = tl.floor(contrib * scale + 0.5).to(tl.int64)
                tl.atomic_add(dst + chan * is_c, q, mask=ok)
            else:
                tl.atomic_add(dst + chan * is_c, contrib, mask=ok)
        if POS_GRAD:
            v = tl.load(src + chan * is_c, mask=ok, other=0.0).to(tl.float32)
            gd += go * tl.sum(wd * v, axis=1)
            gh += go * tl.sum(wh * v, axis=1)
            gw += go * tl.sum(ww * v, axis=1)
    if POS_GRAD:
        if SOURCE == 2:
            # this program's moments, summed later over programs in a fixed order
            _theta_moments(gpos + (b * tl.num_programs(0) + pid) * 12, gd, gh, gw, d, h, w,
                           OD, OH, OW)
        else:
            p = gpos + b * ps_b + d * ps_d + h * ps_h + w * ps_w
            ty = gpos.dtype.element_ty
            if SOURCE == 0:
                tl.store(p, gd.to(ty), mask=mask)
                tl.store(p + ps_c, gh.to(ty), mask=mask)
                tl.store(p + ps_c + ps_c, gw.to(ty), mask=mask)
            else:  # d grid = d index * d index / d normalized coordinate, channels (w, h, d)
                if ALIGN:
                    sd, sh, sw = 0.5 * (D - 1), 0.5 * (H - 1), 0.5 * (W - 1)
                else:
                    sd, sh, sw = 0.5 * D, 0.5 * H, 0.5 * W
                tl.store(p, (gw * sw).to(ty), mask=mask)
                tl.store(p + ps_c, (gh * sh).to(ty), mask=mask)
                tl.store(p + ps_c + ps_c, (gd * sd).to(ty), mask=mask)


def affine_maps(theta: torch.Tensor, out_size, in_size, align_corners: bool) -> torch.Tensor:
    """(B, 12) fp32 index maps of theta for SOURCE=AFFINE: rows [m_i0, m_i1, m_i2, t_i] for
    input axes i = d, h, w, from the reference's ``affine_index_map`` (computed in float32, or
    float64 for float64 theta, then rounded), so the identity theta maps every voxel exactly
    onto itself and positions round as the reference's."""
    th = theta if theta.dtype == torch.float64 else theta.float()
    m, t = affine_index_map(th, out_size, in_size, align_corners)
    return torch.cat([m, t[:, :, None]], 2).reshape(-1, 12).float().contiguous()


def theta_grad(moments: torch.Tensor, out_size, in_size, align_corners: bool) -> torch.Tensor:
    """d loss / d theta (B, 3, 4), x/y/z order, from the summed moments (B, 12) of
    _theta_moments (csrc/warp.h theta_grad_from_moments): with centred moments the chain rule
    through the map is d theta_ij = c_i a_j M_ij = ca_ij M_ij and d theta_i3 = c_i M_i3."""
    ca, _, c, _ = affine_map_coefficients(out_size, in_size, align_corners, moments.device)
    mo = moments.to(torch.float64).reshape(-1, 3, 4)
    lin = (ca * mo[:, :, :3]).flip(2)  # columns back to (x, y, z)
    return torch.cat([lin, (c[:, None] * mo[:, :, 3:])], 2).flip(1)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s GPU the current device for the block: Triton launches on the current device
    (and its current stream), and the inputs may live on another (cuda:1 while cuda:0 is
    current). Nothing for CPU tensors (TRITON_INTERPRET=1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def wide_indices(*tensors: torch.Tensor) -> bool:
    """Whether a kernel over `tensors` needs int64 element offsets (the WIDE constexpr): when one
    of them holds 2^31 elements or more. One channel must stay under 2^31 voxels, whose count the
    kernels form in int32."""
    for t in tensors:
        if t.shape[2:].numel() >= 2**31:
            raise ValueError(f"Triton kernels take volumes under 2^31 voxels, got {tuple(t.shape)}")
    return any(t.numel() >= 2**31 for t in tensors)


def batch_launches(batch: int):
    """(first batch element, count) of each launch: the batch goes on grid axis 1, which stops
    at MAX_GRID_Y programs."""
    for b0 in range(0, batch, MAX_GRID_Y):
        yield b0, min(MAX_GRID_Y, batch - b0)


def _pos_strides(pos: torch.Tensor, source: int) -> tuple[int, ...]:
    """(b, c, d, h, w) element strides of the position tensor (unused for affine maps)."""
    if source == FLOW:
        return tuple(pos.stride())
    if source == GRID:
        s = pos.stride()
        return s[0], s[4], s[1], s[2], s[3]
    return (0, 0, 0, 0, 0)


def fixed_point_scale(peak: torch.Tensor, count: int) -> torch.Tensor:
    """Power-of-two float32 scale (1 element, on the device: no host sync) so that `count`
    additions of at most `peak` (a 0-dim bound on |x|) fit in int64; capped so that it stays a
    finite float when the bound is tiny or zero. Computed in float64: a bound past float32's
    range (a product of two maxima) still gives a scale, as no scattered float32 value exceeds
    float32's largest. A non-finite bound (an inf or NaN among the scattered values, such as an
    fp16 overflow that a GradScaler must see) gives a NaN scale: the whole gradient comes out NaN
    instead of rounded integers that hide it."""
    p = peak.double()
    bound = torch.where(p.isfinite(), p.clamp(1e-30, torch.finfo(torch.float32).max), torch.nan)
    bits = torch.floor(_FIXED_POINT_BITS - torch.log2(bound * count))
    return torch.exp2(bits.clamp_max(120.0)).float().reshape(1)


def from_fixed(acc: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fixed-point accumulator (int64, scaled by `scale`) back to `dtype`."""
    return (acc.double() / scale.double()).to(dtype)


def forward(image: torch.Tensor, pos: torch.Tensor, source: int, mode: int, padding: int,
            align_corners: bool, out_spatial) -> torch.Tensor:
    """Samples `image` at the positions of `pos` (flow, grid or (B, 12) affine index maps)."""
    from gvsl_fast.ops._sampler import new_output

    out = new_output(image, out_spatial)
    B, C, D, H, W = image.shape
    OD, OH, OW = out_spatial
    wide = wide_indices(image, pos, out)
    with on_device(image):
        for b0, nb in batch_launches(B):
            _forward_kernel[(triton.cdiv(OD * OH * OW, BLOCK), nb)](
                image, pos, out, C, D, H, W, OD, OH, OW, *image.stride(), *out.stride(),
                *_pos_strides(pos, source), b0, SOURCE=source, ALIGN=align_corners,
                BORDER=padding == 1, NEAREST=mode == 1, WIDE=wide, BLOCK=BLOCK,
            )
    return out


def backward(grad_out: torch.Tensor, image: torch.Tensor, pos: torch.Tensor, source: int,
             mode: int, padding: int, align_corners: bool, deterministic: bool,
             image_grad: bool, pos_grad: bool):
    """(d image or None, d pos or None); for affine maps d pos is the (B, 12) moment sums."""
    B, C, D, H, W = image.shape
    OD, OH, OW = grad_out.shape[2:]
    n_prog = triton.cdiv(OD * OH * OW, BLOCK)
    acc_dtype = torch.int64 if deterministic else torch.float32
    gimg = torch.zeros_like(image, dtype=acc_dtype) if image_grad else image.new_empty(1)
    if pos_grad and source == AFFINE:
        gpos = torch.empty(B, n_prog, N_MOMENTS, device=image.device, dtype=torch.float32)
    else:
        gpos = torch.empty_like(pos) if pos_grad else pos.new_empty(1)
    # each output voxel adds at most max|grad_out| (trilinear weights sum to 1)
    scale = (fixed_point_scale(grad_out.detach().abs().amax(), OD * OH * OW)
             if image_grad and deterministic
             else torch.ones(1, device=image.device))
    wide = wide_indices(image, pos, grad_out)
    with on_device(image):
        for b0, nb in batch_launches(B):
            _backward_kernel[(n_prog, nb)](
                image, pos, grad_out, gimg, gpos, scale, C, D, H, W, OD, OH, OW,
                *image.stride(), *grad_out.stride(), *_pos_strides(pos, source), b0,
                SOURCE=source, ALIGN=align_corners, BORDER=padding == 1, NEAREST=mode == 1,
                IMAGE_GRAD=image_grad, POS_GRAD=pos_grad,
                FIXED_POINT=image_grad and deterministic, WIDE=wide, BLOCK=BLOCK,
            )
    d_image = None
    if image_grad:
        d_image = from_fixed(gimg, scale, image.dtype) if deterministic else gimg.to(image.dtype)
    d_pos = None
    if pos_grad:
        d_pos = gpos.double().sum(1) if source == AFFINE else gpos
    return d_image, d_pos
