"""GVSL heads (DESIGN §4): affine and deformable Z-matching heads, restoration head."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gvsl_fast.affine import affine_matrix
from gvsl_fast.models.unet import ConvBlock, init_weights


class AffineHead(nn.Module):
    """cat(f_g(A), f_g(B)) -> ConvBlock(2C -> 256) -> global average pool -> four Linear layers
    (rotation 3, scale 3, translation 3, shear 6) -> theta (B, 3, 4), F.affine_grid convention.
    Starts near the identity transform."""

    def __init__(self, in_channels: int = 512, hidden: int = 256) -> None:
        super().__init__()
        self.conv = ConvBlock(2 * in_channels, hidden)
        self.rotation = nn.Linear(hidden, 3)
        self.scale = nn.Linear(hidden, 3)
        self.translation = nn.Linear(hidden, 3)
        self.shear = nn.Linear(hidden, 6)
        init_weights(self.conv)
        # start at the identity transform, as spatial transformers do; small (not zero) weights
        # keep gradients flowing into the convolution from the first step
        for layer in (self.rotation, self.scale, self.translation, self.shear):
            nn.init.normal_(layer.weight, std=1e-3)
            nn.init.zeros_(layer.bias)

    def forward(self, fg_a: torch.Tensor, fg_b: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.cat([fg_a, fg_b], dim=1)).mean(dim=(2, 3, 4))
        rotation = self.rotation(x).clamp(-1, 1) * (math.pi / 9)
        scale = self.scale(x).clamp(-1, 1) * 0.25 + 1
        shear = torch.tan(self.shear(x).clamp(-1, 1) * (math.pi / 18))
        return affine_matrix(rotation.float(), scale.float(), self.translation(x).float(),
                             shear.float())


class DeformableHead(nn.Module):
    """cat(moving local features in the fixed frame, fixed local features) -> ConvBlock(2C -> 16)
    -> Conv3d(16 -> 3, 3^3) = flow in voxels, initialised near zero (VoxelMorph's N(0, 1e-5))."""

    def __init__(self, in_channels: int = 32, hidden: int = 16) -> None:
        super().__init__()
        self.conv = ConvBlock(2 * in_channels, hidden)
        self.flow = nn.Conv3d(hidden, 3, 3, padding=1)
        init_weights(self.conv)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, fl_a_in_b: torch.Tensor, fl_b: torch.Tensor) -> torch.Tensor:
        return self.flow(self.conv(torch.cat([fl_a_in_b, fl_b], dim=1)))


class RestorationHead(nn.Sequential):
    """Conv3d(C -> 16, 3^3) -> GroupNorm(4) -> LeakyReLU(0.2) -> Conv3d(16 -> 1, 1^3)."""

    def __init__(self, in_channels: int = 32, hidden: int = 16, out_channels: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, hidden, 3, padding=1), nn.GroupNorm(4, hidden),
            nn.LeakyReLU(0.2, inplace=True), nn.Conv3d(hidden, out_channels, 1),
        )
        init_weights(self)
