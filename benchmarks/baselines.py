"""Baselines in the original GVSL code's style, for the benchmarks to compare against.

Registration: the NCC loss as five dense win^3 convolutions, the SpatialTransformer built on
``F.grid_sample`` of an identity-plus-flow grid, and the affine and deformable parts applied as
two successive resamplings.

Appearance transforms: per-sample numpy on the CPU, as the GVSL repository's data loader runs
them (a Python loop writing the shuffle blocks one by one, a 100000-point Bezier curve applied
with ``np.interp``, boxes painted one at a time). Same transforms and settings as
``gvsl_fast.data.transforms.AppearanceTransform``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def local_pixel_shuffling(x: np.ndarray, rng: np.random.Generator, prob: float = 0.8,
                          n_blocks: int = 5000) -> np.ndarray:
    """``x`` (C, D, H, W): blocks of S // 20 voxels per axis permuted by one permutation."""
    if rng.random() >= prob:
        return x
    out = x.copy()
    size = x.shape[1:]
    block = [max(1, s // 20) for s in size]
    corners = [rng.integers(0, max(1, s - b), size=n_blocks)
               for s, b in zip(size, block, strict=True)]
    windows = np.stack([x[:, d:d + block[0], h:h + block[1], w:w + block[2]]
                        for d, h, w in zip(*corners, strict=True)])      # (N, C, bd, bh, bw)
    flat = windows.reshape(n_blocks, x.shape[0], -1)
    flat = flat[:, :, rng.permutation(flat.shape[-1])].reshape(windows.shape)
    for i, (d, h, w) in enumerate(zip(*corners, strict=True)):
        out[:, d:d + block[0], h:h + block[1], w:w + block[2]] = flat[i]
    return out


def bezier_curve(points, n_times: int = 100000) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0.0, 1.0, n_times)
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = points
    b = [(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3]
    return x0 * b[0] + x1 * b[1] + x2 * b[2] + x3 * b[3], y0 * b[0] + y1 * b[1] + y2 * b[2] \
        + y3 * b[3]


def nonlinear_transformation(x: np.ndarray, rng: np.random.Generator,
                             prob: float = 0.9) -> np.ndarray:
    """Monotone cubic Bezier intensity curve (sorted inner control values), via ``np.interp``."""
    if rng.random() >= prob:
        return x
    xs = np.sort(rng.random(2))
    ys = np.sort(rng.random(2))
    xvals, yvals = bezier_curve([(0, 0), (xs[0], ys[0]), (xs[1], ys[1]), (1, 1)])
    return np.interp(x, np.sort(xvals), np.sort(yvals)).astype(x.dtype)


def image_in_painting(x: np.ndarray, rng: np.random.Generator, keep_going: float = 0.95,
                      max_boxes: int = 30) -> np.ndarray:
    """While U < 0.95 (at most 30 times) fill a box of randint(S//10, S//5) with U[0, 1)."""
    size = x.shape[1:]
    for _ in range(max_boxes):
        if rng.random() >= keep_going:
            break
        length = [rng.integers(max(1, s // 10), max(s // 5, max(1, s // 10) + 1)) for s in size]
        corner = [rng.integers(min(3, s - n), max(s - n - 3, min(3, s - n) + 1))
                  for s, n in zip(size, length, strict=True)]
        box = tuple(slice(c, c + n) for c, n in zip(corner, length, strict=True))
        x[(slice(None), *box)] = rng.random(length)
    return x


def appearance_numpy(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The three appearance transforms on one sample ``x`` (C, D, H, W) float32."""
    x = local_pixel_shuffling(x, rng)
    x = nonlinear_transformation(x, rng)
    return image_in_painting(x, rng)


# ---- the original GVSL code's registration pieces (for the training-step baseline) ----------


def original_ncc(I: torch.Tensor, J: torch.Tensor, win: int = 9) -> torch.Tensor:
    """GVSL/VoxelMorph NCC loss as the original code computes it: five dense win^3 convolutions."""
    filt = torch.ones(1, 1, win, win, win, device=I.device, dtype=I.dtype)
    pad = win // 2
    n = win ** 3

    def conv(x):
        return F.conv3d(x, filt, padding=pad)

    I_sum, J_sum = conv(I), conv(J)
    I2_sum, J2_sum, IJ_sum = conv(I * I), conv(J * J), conv(I * J)
    u_I, u_J = I_sum / n, J_sum / n
    cross = IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * n
    I_var = I2_sum - 2 * u_I * I_sum + u_I * u_I * n
    J_var = J2_sum - 2 * u_J * J_sum + u_J * u_J * n
    cc = cross * cross / (I_var * J_var + 1e-5)
    return 1.0 - torch.mean(cc)


def original_spatial_transformer(src: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """The original SpatialTransformer: identity grid + flow, normalized, then F.grid_sample."""
    size = flow.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, device=flow.device, dtype=flow.dtype)
                                        for s in size], indexing="ij")).unsqueeze(0)
    locs = grid + flow
    locs = torch.stack([2 * (locs[:, i] / (s - 1) - 0.5) for i, s in enumerate(size)], dim=1)
    locs = locs.permute(0, 2, 3, 4, 1).flip(-1)
    return F.grid_sample(src, locs, align_corners=True, mode="bilinear")


def original_affine_then_deform(image: torch.Tensor, theta: torch.Tensor,
                                flow: torch.Tensor) -> torch.Tensor:
    """The original code's two resamplings: image(M(p + u(p)))."""
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return original_spatial_transformer(F.grid_sample(image, grid, align_corners=False), flow)
