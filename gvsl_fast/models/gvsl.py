"""The GVSL model: shared U-Net, Z-matching heads and restoration head (DESIGN §4, Alg. 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gvsl_fast import ops
from gvsl_fast.models.heads import AffineHead, DeformableHead, RestorationHead
from gvsl_fast.models.unet import UNet3D
from gvsl_fast.ops import reference

FUSIONS = ("paper", "code")


@dataclass
class GVSLOutput:
    """Losses (float32 scalars) and the tensors a preview needs."""

    loss: torch.Tensor
    ncc: torch.Tensor
    smooth: torch.Tensor
    mse: torch.Tensor
    warped: torch.Tensor
    restored: torch.Tensor
    theta: torch.Tensor
    flow: torch.Tensor


class GVSL(nn.Module):
    """Geometric Visual Similarity Learning with self-restoration.

    Args:
        backbone: the shared U-Net (a fresh ``UNet3D()`` by default).
        fusion: ``"paper"`` warps A once by the fused DVF of supplementary Eq. 9,
            ``image(p_hat + flow(p_hat))``; ``"code"`` reproduces the original code's two
            resamplings, ``image(M(p + flow(p)))``.
        ops_backend: backend of the registration ops (``"auto"``, ``"cuda"``, ``"triton"``,
            ``"cpu"``) or ``"reference"`` for the plain-PyTorch path.
        align_corners: the affine convention of theta (``F.affine_grid``).
        ncc_window: LNCC window.
        weights: weights of the NCC, smoothness and restoration terms.
    """

    def __init__(self, backbone: UNet3D | None = None, fusion: str = "paper",
                 ops_backend: str = "auto", align_corners: bool = False, ncc_window: int = 9,
                 weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"GVSL: `fusion` must be one of {FUSIONS}, got {fusion!r}")
        self.backbone = backbone if backbone is not None else UNet3D()
        self.affine_head = AffineHead(self.backbone.global_channels)
        self.deformable_head = DeformableHead(self.backbone.out_channels)
        self.restoration_head = RestorationHead(self.backbone.out_channels)
        self.fusion = fusion
        self.ops_backend = ops_backend
        self.align_corners = align_corners
        self.ncc_window = ncc_window
        self.weights = weights

    def _op(self, name: str):
        if self.ops_backend == "reference":
            return getattr(reference, name)
        fn = getattr(ops, name)
        return lambda *args, **kw: fn(*args, backend=self.ops_backend, **kw)

    def register(self, a_t: torch.Tensor,
                 b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features of both images through the shared U-Net (one batched pass) and the
        predictions: ``(theta, flow, local features of A_t)``."""
        n = a_t.shape[0]
        f_g, f_l = self.backbone(torch.cat([a_t, b]))
        theta = self.affine_head(f_g[:n], f_g[n:])
        # the registration ops run in float32: theta in half precision misplaces voxels
        with torch.autocast(a_t.device.type, enabled=False):
            fl_a = f_l[:n].float()
            fl_a_in_b = self._op("affine_warp")(fl_a, theta, align_corners=self.align_corners)
        flow = self.deformable_head(fl_a_in_b, f_l[n:])
        return theta, flow.float(), f_l[:n]

    def warp_moving(self, a: torch.Tensor, theta: torch.Tensor,
                    flow: torch.Tensor) -> torch.Tensor:
        """A brought onto B by theta and flow, in the configured fusion order."""
        ac = self.align_corners
        if self.fusion == "paper":
            return self._op("affine_flow_warp")(a, theta, flow, align_corners=ac)
        moved = self._op("affine_warp")(a, theta, align_corners=ac)
        return self._op("warp")(moved, flow)

    def forward(self, a: torch.Tensor, a_t: torch.Tensor, b: torch.Tensor) -> GVSLOutput:
        """One GVSL step's losses for clean A, transformed A_t and B, each (N, 1, D, H, W)."""
        theta, flow, fl_a = self.register(a_t, b)
        restored = self.restoration_head(fl_a)
        with torch.autocast(a.device.type, enabled=False):
            a32, b32 = a.float(), b.float()
            warped = self.warp_moving(a32, theta, flow)
            ncc = self._op("lncc")(warped, b32, window=self.ncc_window)
            smooth = ops.smooth_loss(flow)
            mse = F.mse_loss(restored.float(), a32)
            w_ncc, w_smooth, w_mse = self.weights
            loss = w_ncc * ncc + w_smooth * smooth + w_mse * mse
        return GVSLOutput(loss, ncc, smooth, mse, warped.detach(), restored.detach(),
                          theta.detach(), flow.detach())
