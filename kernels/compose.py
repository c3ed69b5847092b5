"""Triton kernels of compose and affine_flow_warp (DESIGN §3).

One program handles ``BLOCK`` output voxels of one batch item: ``p_hat`` from the index-space
affine map (computed once per batch item on the host, rounded as the reference's, so the
identity ``theta`` maps every voxel exactly onto itself), ``q = p_hat + flow(p_hat)``, then
``psi = q - p`` (compose) or ``image(q)`` (affine_flow_warp). Backward: the gradient at ``q``
(given, or gathered from the image), atomics for the scatters into fp32 buffers, and
per-program partial sums of the index-space moments ``sum g p^T`` and ``sum g`` that a
fixed-order sum and the chain rule through the map turn into ``d theta``. Loads upcast to fp32;
arithmetic is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def _axis(x, size, BORDER: tl.constexpr):
    """Trilinear axis of coordinate x: (i0, frac, corner 0 inside, corner 1 inside, d coord)."""
    if BORDER:
        hi = size * 1.0 - 1.0
        dc = tl.where((x > 0.0) & (x < hi), 1.0, 0.0)
        x = tl.where(x != x, 0.0, tl.minimum(tl.maximum(x, 0.0), hi))
    else:
        dc = 1.0
        x = tl.where((x > -2.0) & (x < size + 1.0), x, -2.0)
    fl = tl.floor(x)
    i0 = fl.to(tl.int32)
    return i0, x - fl, (i0 >= 0) & (i0 < size), (i0 >= -1) & (i0 + 1 < size), dc


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
def _scatter(ptr, sd, sh, sw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0, wv1, value, mask):
    """Adjoint of _sample: adds value * weight to the corners inside the volume."""
    for i in tl.static_range(2):
        id_, wd, vd = _corner(di, df, dv0, dv1, i)
        for j in tl.static_range(2):
            ih, wh, vh = _corner(hi, hf, hv0, hv1, j)
            for k in tl.static_range(2):
                iw, ww, vw = _corner(wi, wf, wv0, wv1, k)
                tl.atomic_add(ptr + id_ * sd + ih * sh + iw * sw, wd * wh * ww * value,
                              mask=mask & vd & vh & vw)


@triton.jit
def _voxels(D, H, W, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return idx, idx < D * H * W, idx // (H * W), (idx // W) % H, idx % W


@triton.jit
def _p_hat(map_ptr, d, h, w):
    """apply_affine of csrc/sampling.h: m (3 x 3, row-major) then t (3) in map_ptr."""
    fd, fh, fw = d.to(tl.float32), h.to(tl.float32), w.to(tl.float32)
    pd = tl.load(map_ptr) * fd + tl.load(map_ptr + 1) * fh + tl.load(map_ptr + 2) * fw
    ph = tl.load(map_ptr + 3) * fd + tl.load(map_ptr + 4) * fh + tl.load(map_ptr + 5) * fw
    pw = tl.load(map_ptr + 6) * fd + tl.load(map_ptr + 7) * fh + tl.load(map_ptr + 8) * fw
    return pd + tl.load(map_ptr + 9), ph + tl.load(map_ptr + 10), pw + tl.load(map_ptr + 11)


@triton.jit
def _forward_kernel(map_ptr, fl_ptr, fsb, fsc, fsd, fsh, fsw, im_ptr, isb, isc, isd, ish, isw,
                    out_ptr, osb, osc, osd, osh, osw, C, D, H, W, BORDER: tl.constexpr,
                    WARP: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    idx, mask, d, h, w = _voxels(D, H, W, BLOCK)
    pd, ph, pw = _p_hat(map_ptr + b * 12, d, h, w)
    di, df, dv0, dv1, _ = _axis(pd, D, BORDER)
    hi, hf, hv0, hv1, _ = _axis(ph, H, BORDER)
    wi, wf, wv0, wv1, _ = _axis(pw, W, BORDER)
    fl = fl_ptr + b * fsb
    u0, _, _, _ = _sample(fl, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0, wv1,
                          mask, False)
    u1, _, _, _ = _sample(fl + fsc, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0,
                          wv1, mask, False)
    u2, _, _, _ = _sample(fl + 2 * fsc, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf,
                          wv0, wv1, mask, False)
    out = out_ptr + b * osb + d * osd + h * osh + w * osw
    ty = out_ptr.dtype.element_ty
    if WARP:
        qdi, qdf, qdv0, qdv1, _ = _axis(pd + u0, D, BORDER)
        qhi, qhf, qhv0, qhv1, _ = _axis(ph + u1, H, BORDER)
        qwi, qwf, qwv0, qwv1, _ = _axis(pw + u2, W, BORDER)
        for c in range(C):
            # names unused before the loop: the compiler treats reassigned names as loop-carried
            v, _vd, _vh, _vw = _sample(im_ptr + b * isb + c * isc, isd, ish, isw, qdi, qdf, qdv0,
                                       qdv1, qhi, qhf, qhv0, qhv1, qwi, qwf, qwv0, qwv1, mask,
                                       False)
            tl.store(out + c * osc, v.to(ty), mask=mask)
    else:
        tl.store(out, (pd + u0 - d.to(tl.float32)).to(ty), mask=mask)
        tl.store(out + osc, (ph + u1 - h.to(tl.float32)).to(ty), mask=mask)
        tl.store(out + 2 * osc, (pw + u2 - w.to(tl.float32)).to(ty), mask=mask)


@triton.jit
def _backward_kernel(map_ptr, fl_ptr, fsb, fsc, fsd, fsh, fsw, im_ptr, isb, isc, isd, ish, isw,
                     g_ptr, gsb, gsc, gsd, gsh, gsw, dimage_ptr, dflow_ptr, part_ptr, C, D, H, W,
                     BORDER: tl.constexpr, WARP: tl.constexpr, NEED_IMAGE: tl.constexpr,
                     NEED_THETA: tl.constexpr, NEED_FLOW: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    idx, mask, d, h, w = _voxels(D, H, W, BLOCK)
    N = D * H * W
    pd, ph, pw = _p_hat(map_ptr + b * 12, d, h, w)
    di, df, dv0, dv1, dc_d = _axis(pd, D, BORDER)
    hi, hf, hv0, hv1, dc_h = _axis(ph, H, BORDER)
    wi, wf, wv0, wv1, dc_w = _axis(pw, W, BORDER)
    fl = fl_ptr + b * fsb
    go = g_ptr + b * gsb + d * gsd + h * gsh + w * gsw
    if WARP:
        u0, _, _, _ = _sample(fl, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0,
                              wv1, mask, False)
        u1, _, _, _ = _sample(fl + fsc, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf,
                              wv0, wv1, mask, False)
        u2, _, _, _ = _sample(fl + 2 * fsc, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0, hv1, wi,
                              wf, wv0, wv1, mask, False)
        qdi, qdf, qdv0, qdv1, qdc_d = _axis(pd + u0, D, BORDER)
        qhi, qhf, qhv0, qhv1, qdc_h = _axis(ph + u1, H, BORDER)
        qwi, qwf, qwv0, qwv1, qdc_w = _axis(pw + u2, W, BORDER)
        gqd = tl.zeros_like(pd)
        gqh = tl.zeros_like(pd)
        gqw = tl.zeros_like(pd)
        for c in range(C):
            gc = tl.load(go + c * gsc, mask=mask, other=0.0).to(tl.float32)
            img = im_ptr + b * isb + c * isc
            if NEED_THETA or NEED_FLOW:
                _jv, jd, jh, jw = _sample(img, isd, ish, isw, qdi, qdf, qdv0, qdv1, qhi, qhf,
                                          qhv0, qhv1, qwi, qwf, qwv0, qwv1, mask, True)
                gqd += gc * jd * qdc_d
                gqh += gc * jh * qdc_h
                gqw += gc * jw * qdc_w
            if NEED_IMAGE:
                _scatter(dimage_ptr + (b * C + c) * N, H * W, W, 1, qdi, qdf, qdv0, qdv1, qhi,
                         qhf, qhv0, qhv1, qwi, qwf, qwv0, qwv1, gc, mask)
    else:
        gqd = tl.load(go, mask=mask, other=0.0).to(tl.float32)
        gqh = tl.load(go + gsc, mask=mask, other=0.0).to(tl.float32)
        gqw = tl.load(go + 2 * gsc, mask=mask, other=0.0).to(tl.float32)
    if NEED_FLOW:
        df_b = dflow_ptr + b * 3 * N
        _scatter(df_b, H * W, W, 1, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0, wv1, gqd, mask)
        _scatter(df_b + N, H * W, W, 1, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0, wv1, gqh,
                 mask)
        _scatter(df_b + 2 * N, H * W, W, 1, di, df, dv0, dv1, hi, hf, hv0, hv1, wi, wf, wv0, wv1,
                 gqw, mask)
    if NEED_THETA:
        # dL/dp_hat = g + J^T g, J the Jacobian of flow at p_hat
        gpd, gph, gpw = gqd, gqh, gqw
        for k in tl.static_range(3):
            gk = gqd if k == 0 else (gqh if k == 1 else gqw)
            _, jd, jh, jw = _sample(fl + k * fsc, fsd, fsh, fsw, di, df, dv0, dv1, hi, hf, hv0,
                                    hv1, wi, wf, wv0, wv1, mask, True)
            gpd += gk * jd * dc_d
            gph += gk * jh * dc_h
            gpw += gk * jw * dc_w
        gpd = tl.where(mask, gpd, 0.0)
        gph = tl.where(mask, gph, 0.0)
        gpw = tl.where(mask, gpw, 0.0)
        fd, fh, fw = d.to(tl.float32), h.to(tl.float32), w.to(tl.float32)
        part = part_ptr + (b * tl.num_programs(0) + tl.program_id(0)) * 12
        # index-space moments: d/dm[i][j] = sum g_i p_j, d/dt[i] = sum g_i
        for i in tl.static_range(3):
            gi = gpd if i == 0 else (gph if i == 1 else gpw)
            tl.store(part + 3 * i, tl.sum(gi * fd, axis=0))
            tl.store(part + 3 * i + 1, tl.sum(gi * fh, axis=0))
            tl.store(part + 3 * i + 2, tl.sum(gi * fw, axis=0))
            tl.store(part + 9 + i, tl.sum(gi, axis=0))


# ---- host side ------------------------------------------------------------------------------


def _map_coefficients(size, align_corners: bool, device):
    """The index-space map of theta (sampling.h: affine_index_map) as coefficient tensors:
    m = A * ca, t = tr * c + (s - 1) / 2 + sum_j A * cb, with A and tr theta in (d, h, w) order."""
    ca = torch.zeros(3, 3, dtype=torch.float64)
    cb = torch.zeros(3, 3, dtype=torch.float64)
    c = torch.zeros(3, dtype=torch.float64)
    for i, si in enumerate(size):
        c[i] = (si - 1) / 2 if align_corners else si / 2
        for j, so in enumerate(size):
            if so <= 1:
                continue
            if align_corners:
                ca[i, j], cb[i, j] = (si - 1) / (so - 1), -(si - 1) / 2
            else:
                ca[i, j], cb[i, j] = si / so, si * (1 - so) / (2 * so)
    offset = torch.tensor([(s - 1) / 2 for s in size], dtype=torch.float64)
    return [x.to(device) for x in (ca, cb, c, offset)]


def _index_map(theta: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """(B, 12) float32: m row-major then t, exact for the identity theta.

    Rounded as the reference's affine_positions (float32, coefficients rounded first, the
    translation accumulated in the same order): trilinear gradients jump where a position
    crosses an integer, so positions a few ulps apart can give visibly different gradients.
    """
    ca, cb, c, offset = (x.float() for x in _map_coefficients(size, align_corners, theta.device))
    th = theta.float()
    A, tr = th[:, :, :3].flip(1).flip(2), th[:, :, 3].flip(1)
    t = tr * c + offset
    for j in range(3):
        t = t + A[:, :, j] * cb[:, j]
    return torch.cat([(A * ca).flatten(1), t], 1).contiguous()


def _theta_grad(moments: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """Chain rule from the (B, 12) index-space moments back through _index_map to theta."""
    ca, cb, c, _ = _map_coefficients(size, align_corners, moments.device)
    B = moments.shape[0]
    gm, gt = moments[:, :9].view(B, 3, 3), moments[:, 9:]
    dA = gm * ca + gt[:, :, None] * cb
    return torch.cat([dA.flip(1).flip(2), (gt * c).flip(1)[:, :, None]], 2)


def _launch_args(theta, flow, image, align_corners):
    size = tuple(flow.shape[2:])
    img = flow if image is None else image
    grid = (triton.cdiv(flow.shape[2] * flow.shape[3] * flow.shape[4], BLOCK), flow.shape[0])
    head = (_index_map(theta, size, align_corners), flow, *flow.stride(), img, *img.stride())
    return grid, head, img.shape[1]


def forward(theta: torch.Tensor, flow: torch.Tensor, image: torch.Tensor | None,
            align_corners: bool, padding: int) -> torch.Tensor:
    """psi (image None) or image(q), in the input dtype."""
    grid, head, channels = _launch_args(theta, flow, image, align_corners)
    out = torch.empty_like(flow if image is None else image)
    _forward_kernel[grid](*head, out, *out.stride(), channels, *flow.shape[2:],
                          BORDER=padding == 1, WARP=image is not None, BLOCK=BLOCK)
    return out


def backward(grad: torch.Tensor, theta: torch.Tensor, flow: torch.Tensor,
             image: torch.Tensor | None, align_corners: bool, padding: int,
             need: tuple[bool, bool, bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d image, d theta, d flow) for the needed ones (others empty), in the input dtypes."""
    need_image, need_theta, need_flow = need
    grid, head, channels = _launch_args(theta, flow, image, align_corners)
    f32 = dict(dtype=torch.float32, device=flow.device)
    dimage = torch.zeros(image.shape if need_image else (1,), **f32)
    dflow = torch.zeros(flow.shape if need_flow else (1,), **f32)
    part = torch.zeros((flow.shape[0], grid[0], 12) if need_theta else (1,), **f32)
    _backward_kernel[grid](*head, grad, *grad.stride(), dimage, dflow, part, channels,
                           *flow.shape[2:], BORDER=padding == 1, WARP=image is not None,
                           NEED_IMAGE=need_image, NEED_THETA=need_theta, NEED_FLOW=need_flow,
                           BLOCK=BLOCK)
    if need_theta:
        dtheta = _theta_grad(part.double().sum(1), tuple(flow.shape[2:]), align_corners)
    return (dimage.to(flow.dtype) if need_image else flow.new_empty(0),
            dtheta.to(theta.dtype) if need_theta else flow.new_empty(0),
            dflow.to(flow.dtype) if need_flow else flow.new_empty(0))
