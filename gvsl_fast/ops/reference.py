"""Plain-PyTorch reference implementations of every op (DESIGN §2-3), written for clarity.

Each fast backend is validated against these functions, which have the same signatures as the
public ops (less ``backend=`` and ``deterministic=``). Autograd differentiates them, so their
gradients are the reference gradients too. Conventions:

- volumes ``(B, C, D, H, W)``; index space has voxel centres at integers ``0..S-1``;
- ``flow`` is ``(B, 3, D, H, W)`` in voxels, channels in (D, H, W) order: output voxel ``p``
  samples the input at ``p + flow(p)``;
- ``theta`` is ``(B, 3, 4)`` in ``F.affine_grid``'s convention (normalized coordinates, rows and
  columns in (x, y, z) = (W, H, D) order).

Arithmetic runs in float32 for half inputs (float64 stays float64); outputs return in the input
dtype, loss scalars in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

PADDINGS = ("zeros", "border")
MODES = ("bilinear", "nearest")
PRESETS = ("gvsl", "voxelmorph", "monai")
REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def identity_grid(size: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Index coordinates ``(1, 3, D, H, W)`` of every voxel, in (d, h, w) order."""
    axes = [torch.arange(s, device=like.device, dtype=like.dtype) for s in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)


def _gather(flat: torch.Tensor, idx, size) -> torch.Tensor:
    """Values of ``flat`` (B, C, D*H*W) at integer positions ``idx`` (3 x (B, *S)); 0 outside."""
    B, C, _ = flat.shape
    valid = torch.ones_like(idx[0], dtype=torch.bool)
    clamped = []
    for i, s in zip(idx, size, strict=True):
        valid &= (i >= 0) & (i <= s - 1)
        clamped.append(i.clamp(0, s - 1).long())
    lin = (clamped[0] * size[1] + clamped[1]) * size[2] + clamped[2]
    out_shape = lin.shape[1:]
    vals = flat.gather(2, lin.reshape(B, 1, -1).expand(B, C, -1)).reshape(B, C, *out_shape)
    # a select, not a product with the mask: 0 * inf would make a corner outside NaN, where
    # F.grid_sample reads nothing
    return torch.where(valid.unsqueeze(1), vals, vals.new_zeros(()))


def sample(image: torch.Tensor, pos: torch.Tensor, mode: str = "bilinear",
           padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``image`` (B, C, D, H, W) at index positions ``pos`` (B, 3, *S) in (d, h, w) order.

    ``zeros``: corners outside the volume read 0; ``border``: positions are clamped into the
    volume, with zero gradient at and beyond the edge (``F.grid_sample`` passes it at exactly the
    edge, and agrees everywhere else). Non-finite positions read as far outside (border: NaN
    goes to 0, +-inf to the edges).
    """
    B, C, D, H, W = image.shape
    size = (D, H, W)
    flat = image.reshape(B, C, D * H * W)
    coords = []
    for i, s in enumerate(size):
        x = pos[:, i]
        if padding_mode == "border":
            inside = (x > 0) & (x < s - 1)
            edge = torch.nan_to_num(x.detach(), nan=0.0).clamp(0, s - 1)
            x = torch.where(inside, x, edge)
        else:
            far = ~((x > -2) & (x < s + 1))
            x = torch.where(far, torch.full_like(x, -2.0), x)
        coords.append(x)
    if mode == "nearest":
        out = _gather(flat, [torch.round(x.detach()) for x in coords], size)
        if any(x.requires_grad for x in coords):
            # times exactly 1, whose derivative is round's, 0: the output stays on the
            # positions' graph with a zero gradient, as F.grid_sample's does (coords are finite)
            one = sum(torch.round(x) - torch.round(x).detach() for x in coords) + 1
            out = out * one.unsqueeze(1)
        return out
    lo = [torch.floor(x.detach()) for x in coords]
    frac = [x - x0 for x, x0 in zip(coords, lo, strict=True)]
    out = torch.zeros((), dtype=image.dtype, device=image.device)
    for corner in itertools.product((0, 1), repeat=3):
        w = 1.0
        for c, f in zip(corner, frac, strict=True):
            w = w * (f if c else 1 - f)
        vals = _gather(flat, [x0 + c for x0, c in zip(lo, corner, strict=True)], size)
        out = out + w.unsqueeze(1) * vals
    return out


def _as_compute(*ts: torch.Tensor):
    dt = _compute_dtype(ts[0])
    return [t.to(dt) for t in ts]


def warp(image: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """``out(p) = image(p + flow(p))``, trilinear (or nearest), in the input dtype."""
    img, fl = _as_compute(image, flow)
    pos = identity_grid(flow.shape[2:], fl) + fl
    return sample(img, pos, mode, padding_mode).to(image.dtype)


def _unnormalize(x: torch.Tensor, size: int, align_corners: bool) -> torch.Tensor:
    if align_corners:
        return (x + 1) / 2 * (size - 1)
    return ((x + 1) * size - 1) / 2


def grid_sample(input: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear",
                padding_mode: str = "zeros", align_corners: bool = False) -> torch.Tensor:
    """``F.grid_sample`` for 5-D input: ``grid`` (B, D', H', W', 3) normalized, in (x, y, z)."""
    img, g = _as_compute(input, grid)
    D, H, W = input.shape[2:]
    pos = torch.stack([_unnormalize(g[..., 2], D, align_corners),
                       _unnormalize(g[..., 1], H, align_corners),
                       _unnormalize(g[..., 0], W, align_corners)], dim=1)
    return sample(img, pos, mode, padding_mode).to(input.dtype)


def affine_map_coefficients(out_size: Sequence[int], in_size: Sequence[int], align_corners: bool,
                            device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """Coefficients of the index-space map of theta (csrc/sampling.h ``affine_index_map``),
    float64, in (d, h, w) order: ``(ca (3, 3), cb (3, 3), c (3,), offset (3,))`` with

        m = A * ca,    t = tr * c + offset + sum_j A[:, j] * cb[:, j],

    A and tr theta's linear part and translation reordered to (d, h, w). ``c_i`` is d index /
    d normalized coordinate on input axis ``i`` (grid_sample's unnormalize), ``ca[i, j] = c_i
    a_j`` and ``cb[i, j] = -ca[i, j] * (so_j - 1) / 2`` with ``a_j`` the slope of affine_grid's base
    grid on output axis ``j`` (0 on an axis of one voxel), ``offset_i = (si_i - 1) / 2``. Each
    ratio is one division, so the identity theta with equal sizes gives m = I and t = 0 exactly.
    """
    ca = [[0.0] * 3 for _ in range(3)]
    cb = [[0.0] * 3 for _ in range(3)]
    for i, si in enumerate(in_size):
        for j, so in enumerate(out_size):
            if so <= 1:                                   # affine_grid's base grid is 0 there
                continue
            if align_corners:
                ca[i][j], cb[i][j] = (si - 1) / (so - 1), -(si - 1) / 2
            else:
                ca[i][j], cb[i][j] = si / so, si * (1 - so) / (2 * so)
    c = [(s - 1) / 2 if align_corners else s / 2 for s in in_size]
    offset = [(s - 1) / 2 for s in in_size]
    return tuple(torch.tensor(x, dtype=torch.float64, device=device) for x in (ca, cb, c, offset))


def affine_index_map(theta: torch.Tensor, out_size: Sequence[int], in_size: Sequence[int],
                     align_corners: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """theta (B, 3, 4) folded into the index-space map ``input index = m @ (d, h, w) + t``:
    ``(m (B, 3, 3), t (B, 3))`` in (d, h, w) order and theta's dtype.

    The same map as ``F.affine_grid`` followed by ``grid_sample``'s unnormalization. Arithmetic
    runs in theta's dtype with the coefficients rounded to it first and the translation
    accumulated in a fixed order, so the identity theta with equal sizes maps every voxel exactly
    onto itself (the Triton kernels use this map too, rounded the same way).
    """
    ca, cb, c, offset = (x.to(theta.dtype) for x in
                         affine_map_coefficients(out_size, in_size, align_corners, theta.device))
    # theta rows/columns in (x, y, z) = (w, h, d): reverse both to (d, h, w)
    A = theta[:, :, :3].flip(1).flip(2)
    t = theta[:, :, 3].flip(1) * c + offset
    for j in range(3):
        t = t + A[:, :, j] * cb[:, j]
    return A * ca, t


def affine_positions(theta: torch.Tensor, out_size: Sequence[int], in_size: Sequence[int],
                     align_corners: bool) -> torch.Tensor:
    """Input index positions ``(B, 3, *out_size)`` (d, h, w) of each output voxel under ``theta``
    (``affine_index_map`` applied to every output index; exact for the identity theta with equal
    sizes, which the composition identity tests rely on)."""
    B = theta.shape[0]
    m, t = affine_index_map(theta, out_size, in_size, align_corners)
    grid = identity_grid(out_size, theta)
    return torch.einsum("bij,bj...->bi...", m, grid.expand(B, -1, *out_size)) + t.view(
        B, 3, 1, 1, 1
    )


def affine_warp(image: torch.Tensor, theta: torch.Tensor, align_corners: bool = False,
                padding_mode: str = "zeros") -> torch.Tensor:
    """``F.grid_sample(image, F.affine_grid(theta, image.shape))``, trilinear."""
    img, th = _as_compute(image, theta)
    size = image.shape[2:]
    pos = affine_positions(th, size, size, align_corners)
    return sample(img, pos, "bilinear", padding_mode).to(image.dtype)


def compose(theta: torch.Tensor, flow: torch.Tensor, align_corners: bool = False,
            padding_mode: str = "zeros") -> torch.Tensor:
    """Affine-plus-deformable DVF (GVSL supplementary Eq. 9), in voxels:
    ``psi(p) = flow(p_hat) + p_hat - p`` with ``p_hat = theta(p)`` and ``flow`` sampled
    trilinearly at ``p_hat``. Then ``warp(image, psi)(p) = image(p_hat + flow(p_hat))``."""
    fl, th = _as_compute(flow, theta)
    size = flow.shape[2:]
    p_hat = affine_positions(th, size, size, align_corners)
    psi = sample(fl, p_hat, "bilinear", padding_mode) + p_hat - identity_grid(size, fl)
    return psi.to(flow.dtype)


def affine_flow_warp(image: torch.Tensor, theta: torch.Tensor, flow: torch.Tensor,
                     align_corners: bool = False, padding_mode: str = "zeros") -> torch.Tensor:
    """``warp(image, compose(theta, flow))``: one resampling of ``image``."""
    img, th, fl = _as_compute(image, theta, flow)
    psi = compose(th, fl, align_corners, padding_mode)
    return warp(img, psi, "bilinear", padding_mode).to(image.dtype)


def box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-padded ``window``^3 window sum, as three separable 1-D passes."""
    C = x.shape[1]
    r = window // 2
    ones = torch.ones(C, 1, window, dtype=x.dtype, device=x.device)
    for axis in range(3):
        shape = [C, 1, 1, 1, 1]
        shape[2 + axis] = window
        pad = [0, 0, 0]
        pad[axis] = r
        x = F.conv3d(x, ones.reshape(shape), padding=tuple(pad), groups=C)
    return x


def lncc_map(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5,
             preset: str = "gvsl", smooth_nr: float = 0.0) -> torch.Tensor:
    """Local squared correlation ``cc`` at every voxel, in the compute dtype.

    gvsl / voxelmorph: ``cross^2 / (Ivar * Jvar + eps)``;
    monai: ``(cross^2 + smooth_nr) / (max(Ivar, eps) * max(Jvar, eps))`` (MONAI's rectangular LNCC).
    """
    I, J = _as_compute(a, b)
    n = window ** 3
    SI, SJ = box_sum(I, window), box_sum(J, window)
    SII, SJJ, SIJ = box_sum(I * I, window), box_sum(J * J, window), box_sum(I * J, window)
    cross = SIJ - SI * SJ / n
    Ivar = SII - SI * SI / n
    Jvar = SJJ - SJ * SJ / n
    if preset == "monai":
        Ivar, Jvar = Ivar.clamp_min(eps), Jvar.clamp_min(eps)
        return (cross * cross + smooth_nr) / (Ivar * Jvar)
    return cross * cross / (Ivar * Jvar + eps)


def lncc(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5,
         reduction: str = "mean", preset: str = "gvsl", *, smooth_nr: float = 0.0) -> torch.Tensor:
    """Local normalized cross-correlation loss.

    ``reduction="none"`` returns the ``cc`` map in the input dtype. ``mean``/``sum`` return a
    float32 (float64 for float64 input) scalar: the reduction of ``1 - cc`` for ``gvsl`` (so the
    mean is GVSL's ``1 - mean(cc)``) and of ``-cc`` for ``voxelmorph`` and ``monai``.
    ``smooth_nr`` is used by the ``monai`` preset only.
    """
    cc = lncc_map(a, b, window, eps, preset, smooth_nr)
    if reduction == "none":
        return cc.to(a.dtype)
    loss = (1 - cc) if preset == "gvsl" else -cc
    return loss.mean() if reduction == "mean" else loss.sum()


def smooth_loss(flow: torch.Tensor) -> torch.Tensor:
    """Mean squared forward differences of ``flow`` along D, H and W, averaged over the axes."""
    f = flow.to(_compute_dtype(flow))
    dd = f[:, :, 1:] - f[:, :, :-1]
    dh = f[:, :, :, 1:] - f[:, :, :, :-1]
    dw = f[:, :, :, :, 1:] - f[:, :, :, :, :-1]
    return (dd.pow(2).mean() + dh.pow(2).mean() + dw.pow(2).mean()) / 3
