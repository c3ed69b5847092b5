"""The GVSL affine matrix (supplementary Eq. 8), shared by the affine head and the spatial
augmentation."""

from __future__ import annotations

import torch


def affine_matrix(rotation: torch.Tensor, scale: torch.Tensor, translation: torch.Tensor,
                  shear: torch.Tensor) -> torch.Tensor:
    """``theta = [Shear . Scale . Rz . Ry . Rx | t]`` as (B, 3, 4) (GVSL supplementary Eq. 8).

    ``rotation`` (B, 3) angles about x, y, z in radians; ``scale`` (B, 3); ``translation`` (B, 3)
    in normalized units; ``shear`` (B, 6) shear factors (already through tan). Built with
    ``torch.stack`` so gradients reach every input (the original code cut autograd here).
    """
    cx, cy, cz = torch.cos(rotation).unbind(1)
    sx, sy, sz = torch.sin(rotation).unbind(1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)

    def mat(rows):
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    rx = mat([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
    ry = mat([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = mat([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
    s = torch.diag_embed(scale)
    h = shear.unbind(1)
    sh = mat([[one, h[0], h[1]], [h[2], one, h[3]], [h[4], h[5], one]])
    lin = sh @ s @ rz @ ry @ rx
    return torch.cat([lin, translation.unsqueeze(-1)], dim=-1)
