"""Triton kernels of compose and affine_flow_warp (DESIGN §3).

One program handles ``BLOCK`` output voxels of one batch item: ``p_hat`` from the index-space
affine map (computed once per batch item on the host, rounded as the reference's, so the
identity ``theta`` maps every voxel exactly onto itself), ``q = p_hat + flow(p_hat)``, then
``psi = q - p`` (compose) or ``image(q)`` (affine_flow_warp). Backward: the gradient at ``q``
(given, or gathered from the image), atomics for the scatters into fp32 buffers (or, with
``deterministic``, int64 fixed-point buffers: integer sums do not depend on the order), and
per-program partial sums of the centred index-space moments ``sum g (p - centre)^T`` and
``sum g`` that a fixed-order sum and the chain rule through the map turn into ``d theta``. Loads
upcast to fp32; arithmetic is fp32. The axis, voxel, map and moment helpers (device) and the map
and theta-gradient functions (host) are kernels/warp.py's, so both ops share one convention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gvsl_fast.kernels.warp import (
    _affine_position,
    _axis,
    _decode,
    _theta_moments,
    _wide,
    affine_maps,
    batch_launches,
    fixed_point_scale,
    from_fixed,
    on_device,
    theta_grad,
    wide_indices,
)

BLOCK = 256


@triton.jit
def _corner(i0, f, v0, v1, c: tl.constexpr):
    if c == 0:
        i, w, v = i0, 1.0 - f, v0
    else:
        i, w, v = i0 + 1, f, v1
    return i, w, v


@triton.jit
def _sample(ptr, sd, sh, sw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0, wv1, mask,
            GRAD: tl.constexpr):
    """Trilinear value at the axes (zero outside) and, with GRAD, its d/dd, d/dh, d/dw."""
    val = tl.zeros_like(df)
    gd = tl.zeros_like(df)
    gh = tl.zeros_like(df)
    gw = tl.zeros_like(df)
    for i in tl.static_range(2):
        id_, wd, vd = _corner(di, df, dv0, dv1, i)
        for j in tl.static_range(2):
            ih, wh, vh = _corner(hi, hf, hv0, hv1, j)
            for k in tl.static_range(2):
                iw, ww, vw = _corner(wi, wf, wv0, wv1, k)
                v = tl.load(ptr + id_ * sd + ih * sh + iw * sw, mask=mask & vd & vh & vw,
                            other=0.0).to(tl.float32)
                val += wd * wh * ww * v
                if GRAD:
                    gd += (2 * i - 1) * wh * ww * v
                    gh += (2 * j - 1) * wd * ww * v
                    gw += (2 * k - 1) * wd * wh * v
    return val, gd, gh, gw


@triton.jit
def _scatter(ptr, sd, sh, sw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0, wv1, value, mask,
             scale, FIXED: tl.constexpr):
    """Adjoint of _sample: adds value * weight to the corners inside the volume (with FIXED,
    rounded to int64 after multiplying by scale)."""
    for i in tl.static_range(2):
        id_, wd, vd = _corner(di, df, dv0, dv1, i)
        for j in tl.static_range(2):
            ih, wh, vh = _corner(hi, hf, hv0, hv1, j)
            for k in tl.static_range(2):
                iw, ww, vw = _corner(wi, wf, wv0, wv1, k)
                x = wd * wh * ww * value
                if FIXED:
                    x = tl.floor(x * scale + 0.5).to(tl.int64)
                tl.atomic_add(ptr + id_ * sd + ih * sh + iw * sw, x, mask=mask & vd & vh & vw)


@triton.jit
def _forward_kernel(map_ptr, fl_ptr, fsb, fsc, fsd, fsh, fsw, im_ptr, isb, isc, isd, ish, isw,
                    out_ptr, osb, osc, osd, osh, osw, C, D, H, W, b0, BORDER: tl.constexpr,
                    WARP: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64) + b0
    d, h, w, mask = _decode(tl.program_id(0), BLOCK, D, H, W, WIDE)
    pd, ph, pw = _affine_position(map_ptr + b * 12, d, h, w)
    di, df, dv0, dv1, _ = _axis(pd, D, BORDER, False, WIDE)
    hi, hf, hv0, hv1, _ = _axis(ph, H, BORDER, False, WIDE)
    wi, wf, wv0, wv1, _ = _axis(pw, W, BORDER, False, WIDE)
    fl = fl_ptr + b * fsb
    u0, _, _, _ = _sample(fl, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0, wv1,
                          mask, False)
    u1, _, _, _ = _sample(fl + fsc, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0,
                          wv1, mask, False)
    u2, _, _, _ = _sample(fl + fsc + fsc, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf,
                          wv0, wv1, mask, False)
    out = out_ptr + b * osb + d * osd + h * osh + w * osw
    ty = out_ptr.dtype.element_ty
    if WARP:
        qdi, qdf, qdv0, qdv1, _ = _axis(pd + u0, D, BORDER, False, WIDE)
        qhi, qhf, qhv0, qhv1, _ = _axis(ph + u1, H, BORDER, False, WIDE)
        qwi, qwf, qwv0, qwv1, _ = _axis(pw + u2, W, BORDER, False, WIDE)
        for c in range(C):
            # names unused before the loop: the compiler treats reassigned names as loop-carried
            chan = _wide(c, WIDE)
            v, _vd, _vh, _vw = _sample(im_ptr + b * isb + chan * isc, isd, ish, isw, qdi, qdf, qdv0,
                                       qdv1, qhi, qhf, qhv0, qhv1, qwi, qwf, qwv0, qwv1, mask,
                                       False)
            tl.store(out + chan * osc, v.to(ty), mask=mask)
    else:
        tl.store(out, (pd + u0 - d.to(tl.float32)).to(ty), mask=mask)
        tl.store(out + osc, (ph + u1 - h.to(tl.float32)).to(ty), mask=mask)
        tl.store(out + osc + osc, (pw + u2 - w.to(tl.float32)).to(ty), mask=mask)


@triton.jit
def _backward_kernel(map_ptr, fl_ptr, fsb, fsc, fsd, fsh, fsw, im_ptr, isb, isc, isd, ish, isw,
                     g_ptr, gsb, gsc, gsd, gsh, gsw, dimage_ptr, dflow_ptr, part_ptr, scale_ptr,
                     C, D, H, W, b0, BORDER: tl.constexpr, WARP: tl.constexpr,
                     NEED_IMAGE: tl.constexpr, NEED_THETA: tl.constexpr, NEED_FLOW: tl.constexpr,
                     FIXED: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64) + b0
    si = tl.load(scale_ptr)  # fixed-point scales of d image and d flow (1 when not FIXED)
    sf = tl.load(scale_ptr + 1)
    d, h, w, mask = _decode(tl.program_id(0), BLOCK, D, H, W, WIDE)
    N = D * H * W
    pd, ph, pw = _affine_position(map_ptr + b * 12, d, h, w)
    di, df, dv0, dv1, dc_d = _axis(pd, D, BORDER, False, WIDE)
    hi, hf, hv0, hv1, dc_h = _axis(ph, H, BORDER, False, WIDE)
    wi, wf, wv0, wv1, dc_w = _axis(pw, W, BORDER, False, WIDE)
    fl = fl_ptr + b * fsb
    go = g_ptr + b * gsb + d * gsd + h * gsh + w * gsw
    if WARP:
        u0, _, _, _ = _sample(fl, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0,
                              wv1, mask, False)
        u1, _, _, _ = _sample(fl + fsc, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf,
                              wv0, wv1, mask, False)
        u2, _, _, _ = _sample(fl + fsc + fsc, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi,
                              wf, wv0, wv1, mask, False)
        qdi, qdf, qdv0, qdv1, qdc_d = _axis(pd + u0, D, BORDER, False, WIDE)
        qhi, qhf, qhv0, qhv1, qdc_h = _axis(ph + u1, H, BORDER, False, WIDE)
        qwi, qwf, qwv0, qwv1, qdc_w = _axis(pw + u2, W, BORDER, False, WIDE)
        gqd = tl.zeros_like(pd)
        gqh = tl.zeros_like(pd)
        gqw = tl.zeros_like(pd)
        for c in range(C):
            chan = _wide(c, WIDE)
            gc = tl.load(go + chan * gsc, mask=mask, other=0.0).to(tl.float32)
            img = im_ptr + b * isb + chan * isc
            if NEED_THETA or NEED_FLOW:
                _jv, jd, jh, jw = _sample(img, isd, ish, isw, qdi, qdf, qdv0, qdv1, qhi, qhf,
                                          qhv0, qhv1, qwi, qwf, qwv0, qwv1, mask, True)
                gqd += gc * jd * qdc_d
                gqh += gc * jh * qdc_h
                gqw += gc * jw * qdc_w
            if NEED_IMAGE:
                _scatter(dimage_ptr + (b * C + chan) * N, H * W, W, 1, qdi, qdf, qdv0, qdv1, qhi,
                         qhf, qhv0, qhv1, qwi, qwf, qwv0, qwv1, gc, mask, si, FIXED)
    else:
        gqd = tl.load(go, mask=mask, other=0.0).to(tl.float32)
        gqh = tl.load(go + gsc, mask=mask, other=0.0).to(tl.float32)
        gqw = tl.load(go + gsc + gsc, mask=mask, other=0.0).to(tl.float32)
    if NEED_FLOW:
        df_b = dflow_ptr + b * 3 * N
        _scatter(df_b, H * W, W, 1, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0, wv1, gqd,
                 mask, sf, FIXED)
        _scatter(df_b + N, H * W, W, 1, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0, wv1, gqh,
                 mask, sf, FIXED)
        _scatter(df_b + N + N, H * W, W, 1, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0, wv1,
                 gqw, mask, sf, FIXED)
    if NEED_THETA:
        # dL/dp_hat = g + J^T g, J the Jacobian of flow at p_hat
        gpd, gph, gpw = gqd, gqh, gqw
        for k in tl.static_range(3):
            gk = gqd if k == 0 else (gqh if k == 1 else gqw)
            flk = fl if k == 0 else (fl + fsc if k == 1 else fl + fsc + fsc)
            _, jd, jh, jw = _sample(flk, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0,
                                    hv1, wi, wf, wv0, wv1, mask, True)
            gpd += gk * jd * dc_d
            gph += gk * jh * dc_h
            gpw += gk * jw * dc_w
        gpd = tl.where(mask, gpd, 0.0)
        gph = tl.where(mask, gph, 0.0)
        gpw = tl.where(mask, gpw, 0.0)
        # centred index-space moments of dL/dp_hat (the layout of kernels/warp.py)
        _theta_moments(part_ptr + (b * tl.num_programs(0) + tl.program_id(0)) * 12, gpd, gph,
                       gpw, d, h, w, D, H, W)


# ---- host side ------------------------------------------------------------------------------


def _launch_args(theta, flow, image, align_corners):
    size = tuple(flow.shape[2:])
    img = flow if image is None else image
    n_prog = triton.cdiv(flow.shape[2] * flow.shape[3] * flow.shape[4], BLOCK)
    maps = affine_maps(theta, size, size, align_corners)
    head = (maps, flow, *flow.stride(), img, *img.stride())
    # outputs and gradients have the shapes of flow and img
    return n_prog, head, img.shape[1], wide_indices(flow, img)


def forward(theta: torch.Tensor, flow: torch.Tensor, image: torch.Tensor | None,
            align_corners: bool, padding: int) -> torch.Tensor:
    """psi (image None) or image(q), in the input dtype."""
    n_prog, head, channels, wide = _launch_args(theta, flow, image, align_corners)
    out = torch.empty_like(flow if image is None else image)
    with on_device(flow):
        for b0, nb in batch_launches(flow.shape[0]):
            _forward_kernel[(n_prog, nb)](*head, out, *out.stride(), channels, *flow.shape[2:],
                                          b0, BORDER=padding == 1, WARP=image is not None,
                                          WIDE=wide, BLOCK=BLOCK)
    return out


def backward(grad: torch.Tensor, theta: torch.Tensor, flow: torch.Tensor,
             image: torch.Tensor | None, align_corners: bool, padding: int, deterministic: bool,
             need: tuple[bool, bool, bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d image, d theta, d flow) for the needed ones (others empty), in the input dtypes."""
    need_image, need_theta, need_flow = need
    n_prog, head, channels, wide = _launch_args(theta, flow, image, align_corners)
    fixed = deterministic and (need_image or need_flow)
    f32 = dict(dtype=torch.float32, device=flow.device)
    acc = dict(dtype=torch.int64 if fixed else torch.float32, device=flow.device)
    dimage = torch.zeros(image.shape if need_image else (1,), **acc)
    dflow = torch.zeros(flow.shape if need_flow else (1,), **acc)
    part = torch.zeros((flow.shape[0], n_prog, 12) if need_theta else (1,), **f32)
    scales = _fixed_point_scales(grad, image, flow) if fixed else torch.ones(2, **f32)
    with on_device(flow):
        for b0, nb in batch_launches(flow.shape[0]):
            _backward_kernel[(n_prog, nb)](*head, grad, *grad.stride(), dimage, dflow, part,
                                           scales, channels, *flow.shape[2:], b0,
                                           BORDER=padding == 1, WARP=image is not None,
                                           NEED_IMAGE=need_image, NEED_THETA=need_theta,
                                           NEED_FLOW=need_flow, FIXED=fixed, WIDE=wide,
                                           BLOCK=BLOCK)
    if need_theta:
        size = tuple(flow.shape[2:])
        dtheta = theta_grad(part.double().sum(1), size, size, align_corners)

    def back(acc: torch.Tensor, i: int) -> torch.Tensor:
        return from_fixed(acc, scales[i], flow.dtype) if fixed else acc.to(flow.dtype)

    return (back(dimage, 0) if need_image else flow.new_empty(0),
            dtheta.to(theta.dtype) if need_theta else flow.new_empty(0),
            back(dflow, 1) if need_flow else flow.new_empty(0))


def _fixed_point_scales(grad: torch.Tensor, image: torch.Tensor | None,
                        flow: torch.Tensor) -> torch.Tensor:
    """Fixed-point scales of d image and d flow. Each output voxel adds at most its largest
    scattered value (trilinear weights sum to 1): |grad| to d image; to d flow |dL/dq| <=
    C * max|grad| * 2 max|image| (a trilinear derivative is a weighted mean of neighbour
    differences), or max|grad| for compose."""
    n = flow.shape[2] * flow.shape[3] * flow.shape[4]
    peak = grad.detach().abs().amax().double()
    peak_q = peak if image is None else peak * image.detach().abs().amax().double() * (
        2 * image.shape[1])
    return torch.cat([fixed_point_scale(peak, n), fixed_point_scale(peak_q, n)])
