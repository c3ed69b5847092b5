"""Triton affine_warp: the sampler of kernels/warp.py with SOURCE=AFFINE.

theta is folded per batch element into the index-space map of csrc/sampling.h
(``affine_index_map``): 12 fp32 numbers, so the kernel never holds a grid. The theta gradient
comes back as 12 moments per program (csrc/warp.h ``theta_moments``), summed in float64 over
programs in a fixed order and turned into d loss / d theta (``theta_grad_from_moments``).
"""

from __future__ import annotations

import torch

from gvsl_fast.kernels import warp as sampler


def _scale(size: int, align_corners: bool) -> float:
    """d index / d normalized coordinate (grid_sample's unnormalize)."""
    return 0.5 * (size - 1) if align_corners else 0.5 * size


def _slope(size: int, align_corners: bool) -> float:
    """d normalized coordinate / d index of affine_grid's base grid (0 on one voxel)."""
    if size <= 1:
        return 0.0
    return 2.0 / (size - 1) if align_corners else 2.0 / size


def index_maps(theta: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """(B, 12) fp32 rows [m_i0, m_i1, m_i2, t_i] for input axes i = d, h, w: input index =
    m @ (d, h, w) + t. Base coordinate n_j = a_j (p_j - centre_j), so m_ij = c_i theta_ij a_j and
    t_i = c_i (theta_i3 - sum_j theta_ij a_j centre_j) + centre_i."""
    th = theta.double().flip(1)  # rows (x, y, z) -> (d, h, w)
    lin = th[:, :, :3].flip(2)  # columns likewise
    c = torch.tensor([_scale(s, align_corners) for s in size], dtype=torch.float64,
                     device=theta.device)
    a = torch.tensor([_slope(s, align_corners) for s in size], dtype=torch.float64,
                     device=theta.device)
    centre = torch.tensor([0.5 * (s - 1) for s in size], dtype=torch.float64, device=theta.device)
    m = c[None, :, None] * lin * a[None, None, :]
    t = c[None, :] * (th[:, :, 3] - (lin * (a * centre)[None, None, :]).sum(2)) + centre[None, :]
    return torch.cat([m, t[:, :, None]], dim=2).reshape(-1, 12).float().contiguous()


def theta_grad(moments: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """d loss / d theta (B, 3, 4) in x/y/z order from the summed moments (B, 12)."""
    mo = moments.reshape(-1, 3, 4)
    c = torch.tensor([_scale(s, align_corners) for s in size], dtype=mo.dtype, device=mo.device)
    a = torch.tensor([_slope(s, align_corners) for s in size], dtype=mo.dtype, device=mo.device)
    lin = c[None, :, None] * a[None, None, :] * mo[:, :, :3]
    g = torch.cat([lin, c[None, :, None] * mo[:, :, 3:]], dim=2)  # rows/cols in (d, h, w)
    return torch.cat([g[:, :, :3].flip(2), g[:, :, 3:]], dim=2).flip(1)


def forward(image: torch.Tensor, theta: torch.Tensor, padding: int,
            align_corners: bool) -> torch.Tensor:
    size = tuple(image.shape[2:])
    maps = index_maps(theta, size, align_corners)
    return sampler.forward(image, maps, sampler.AFFINE, 0, padding, align_corners, size)


def backward(grad_out: torch.Tensor, image: torch.Tensor, theta: torch.Tensor, padding: int,
             align_corners: bool, deterministic: bool, image_grad: bool, theta_grad_: bool):
    """(d image or None, d theta or None)."""
    size = tuple(image.shape[2:])
    maps = index_maps(theta, size, align_corners)
    d_image, moments = sampler.backward(grad_out, image, maps, sampler.AFFINE, 0, padding,
                                        align_corners, deterministic, image_grad, theta_grad_)
    d_theta = None
    if theta_grad_:
        d_theta = theta_grad(moments, size, align_corners).to(theta.dtype)
    return d_image, d_theta
