"""Triton affine_warp: the sampler of kernels/warp.py with SOURCE=AFFINE.

theta is folded per batch element into the index-space map of csrc/sampling.h
(``affine_index_map``): 12 fp32 numbers (``warp.affine_maps``), so the kernel never holds a
grid. The theta gradient comes back as 12 moments per program (csrc/warp.h ``theta_moments``),
summed in float64 over programs in a fixed order and turned into d loss / d theta
(``warp.theta_grad``, as ``theta_grad_from_moments``).
"""

from __future__ import annotations

import torch

from gvsl_fast.kernels import warp as sampler


def forward(image: torch.Tensor, theta: torch.Tensor, padding: int,
            align_corners: bool) -> torch.Tensor:
    size = tuple(image.shape[2:])
    maps = sampler.affine_maps(theta, size, size, align_corners)
    return sampler.forward(image, maps, sampler.AFFINE, 0, padding, align_corners, size)


def backward(grad_out: torch.Tensor, image: torch.Tensor, theta: torch.Tensor, padding: int,
             align_corners: bool, deterministic: bool, image_grad: bool, theta_grad_: bool):
    """(d image or None, d theta or None)."""
    size = tuple(image.shape[2:])
    maps = sampler.affine_maps(theta, size, size, align_corners)
    d_image, moments = sampler.backward(grad_out, image, maps, sampler.AFFINE, 0, padding,
                                        align_corners, deterministic, image_grad, theta_grad_)
    d_theta = None
    if theta_grad_:
        d_theta = sampler.theta_grad(moments, size, size, align_corners).to(theta.dtype)
    return d_image, d_theta
