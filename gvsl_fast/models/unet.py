"""The 3D U-Net backbone of GVSL (DESIGN §4)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gvsl_fast.models import official

DOWN = (32, 64, 128, 256, 512)
UP = (256, 128, 64, 32)


class ConvBlock(nn.Sequential):
    """2 x [Conv3d 3^3 (padding 1) -> GroupNorm(C // 8 groups) -> LeakyReLU(0.2)]."""

    def __init__(self, cin: int, cout: int) -> None:
        layers = []
        for c in (cin, cout):
            layers += [nn.Conv3d(c, cout, 3, padding=1), nn.GroupNorm(max(cout // 8, 1), cout),
                       nn.LeakyReLU(0.2, inplace=True)]
        super().__init__(*layers)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions (for LeakyReLU(0.2)), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def deterministic_layers(x: torch.Tensor) -> bool:
    """Whether pooling and upsampling take their atomic-free forms: on the GPU under
    ``torch.use_deterministic_algorithms(True)``, where the backwards of PyTorch's CUDA
    ``max_pool3d`` and trilinear ``interpolate`` (atomic scatters) raise."""
    return x.is_cuda and torch.are_deterministic_algorithms_enabled()


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool3d(x, 2)`` of even-sized ``x`` with an elementwise backward: each 2^3
    window's first maximum (in (d, h, w) order, as ``max_pool3d``'s) gets the gradient."""
    B, C, D, H, W = x.shape
    win = x.reshape(B, C, D // 2, 2, H // 2, 2, W // 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
    win = win.reshape(B, C, D // 2, H // 2, W // 2, 8)
    slots = torch.arange(8, device=x.device)
    first = slots == win.detach().argmax(-1, keepdim=True)
    return win.masked_fill(~first, 0).sum(-1)  # one value plus zeros: exact


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)`` as one
    product per axis with its (2n, n) interpolation matrix (weights computed as PyTorch's
    kernel does), so that the backward is products too; in float32, cast back. The matrices are
    built on x's device (no host copy, no sync)."""
    out = x.float()
    with torch.autocast(x.device.type, enabled=False):
        for axis in (2, 3, 4):
            n = out.shape[axis]
            # (n - 1) / (2n - 1) divided in float32 (a float32 value: exact as a Python float)
            scale = (torch.tensor(n - 1, dtype=torch.float32) / (2 * n - 1)).item()
            src = torch.arange(2 * n, dtype=torch.float32, device=x.device) * scale
            i0 = src.long().clamp_max(n - 1)
            lam = (src - i0)[:, None]
            i1 = (i0 + 1).clamp_max(n - 1)
            cols = torch.arange(n, device=x.device)
            m = (1 - lam) * (cols == i0[:, None]) + lam * (cols == i1[:, None])
            out = (out.movedim(axis, -1) @ m.T).movedim(-1, axis)
    return out.to(x.dtype)


class UNet3D(nn.Module):
    """3D U-Net returning global features (bottleneck, 512 ch at 1/16 resolution) and local
    features (last decoder output, 32 ch at full resolution).

    Args:
        in_channels: image channels.
        down: encoder widths (five levels).
        up: decoder widths (four levels).
        grad_checkpoint: recompute each block in the backward pass to save activation memory.

    Inputs of any size are zero-padded to a multiple of 16, centred (half of the padding before,
    the rest after, as the original GVSL code pads), and the local features cropped back; the
    original code's checkpoints therefore load with the same outputs (``from_pretrained``).
    """

    def __init__(self, in_channels: int = 1, down: tuple[int, ...] = DOWN,
                 up: tuple[int, ...] = UP, grad_checkpoint: bool = False) -> None:
        super().__init__()
        if len(down) != 5 or len(up) != 4:
            raise ValueError(f"UNet3D: `down` needs 5 widths and `up` 4, got {down}, {up}")
        self.config = {"in_channels": in_channels, "down": list(down), "up": list(up)}
        self.grad_checkpoint = grad_checkpoint
        self.encoder = nn.ModuleList(
            [ConvBlock(in_channels, down[0])]
            + [ConvBlock(down[i], down[i + 1]) for i in range(4)]
        )
        skips = down[3::-1]
        prev = (down[4],) + tuple(up[:3])
        self.decoder = nn.ModuleList(
            [ConvBlock(p + s, u) for p, s, u in zip(prev, skips, up, strict=True)]
        )
        init_weights(self)

    @property
    def out_channels(self) -> int:
        """Channels of the local features ``f_l``."""
        return self.config["up"][-1]

    @property
    def global_channels(self) -> int:
        """Channels of the global features ``f_g``."""
        return self.config["down"][-1]

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(f_g, f_l)`` for ``x`` of shape (B, C, D, H, W)."""
        size = x.shape[2:]
        pad = [(-s) % 16 for s in size]
        lo = [p // 2 for p in pad]
        if any(pad):
            x = F.pad(x, [n for i in (2, 1, 0) for n in (lo[i], pad[i] - lo[i])])
        skips = []
        for i, block in enumerate(self.encoder):
            if i:
                x = max_pool2(x) if deterministic_layers(x) else F.max_pool3d(x, 2)
            x = self._run(block, x)
            skips.append(x)
        f_g = x
        for block, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            x = (upsample2(x) if deterministic_layers(x) else
                 F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True))
            x = self._run(block, torch.cat([x, skip], dim=1))
        return f_g, x[(..., *(slice(a, a + n) for a, n in zip(lo, size, strict=True)))]

    def save_pretrained(self, path: str | Path) -> None:
        """Write the state_dict to ``path`` and its configuration to ``path`` + ``.json``."""
        from gvsl_fast.train import checkpoint  # here, not above: the trainer imports the models

        path = Path(path)
        state, config = self.state_dict(), json.dumps(self.config, indent=2).encode()
        checkpoint.write_atomic(path, lambda f: torch.save(state, f))
        checkpoint.write_atomic(path.with_suffix(path.suffix + ".json"), lambda f: f.write(config))

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu",
                        **kwargs) -> UNet3D:
        """Load a backbone written by ``gvsl-fast export`` (or ``save_pretrained``: ``path`` with
        its configuration in ``path`` + ``.json``), or the U-Net of a checkpoint of the original
        GVSL code, such as its released ``GVSL_epoch_1000.pth`` (no configuration file: the
        widths are read from the weights; see ``gvsl_fast.models.official``)."""
        path = Path(path)
        cfg_path = path.with_suffix(path.suffix + ".json")
        if not path.is_file():
            raise FileNotFoundError(f"UNet3D.from_pretrained: no weights at {path}")
        from gvsl_fast.train import checkpoint  # here, not above: the trainer imports the models

        if checkpoint.is_checkpoint(path):
            raise ValueError(f"UNet3D.from_pretrained: {path} is a gvsl-fast training checkpoint; "
                             f"write its backbone with `gvsl-fast export {path} OUT.pt` and load "
                             "that")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises several types for a truncated or foreign file
            raise ValueError(f"UNet3D.from_pretrained: {path} cannot be read as weights "
                             f"({type(exc).__name__}: {exc})") from exc
        has_cfg = cfg_path.is_file()  # else the original code's layout
        if not has_cfg and not official.holds_backbone(state):
            raise FileNotFoundError(
                f"UNet3D.from_pretrained: no configuration at {cfg_path}, and {path} holds no "
                "U-Net of the original GVSL code")
        layout = f"configuration {cfg_path}" if has_cfg else "original GVSL layout"
        try:
            if has_cfg:
                cfg = json.loads(cfg_path.read_text())
            else:
                state, cfg = official.backbone_from_official(state)
            model = cls(cfg["in_channels"], tuple(cfg["down"]), tuple(cfg["up"]), **kwargs)
            model.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # the files' fault
            raise ValueError(f"UNet3D.from_pretrained: {path} ({layout}): "
                             f"{type(exc).__name__}: {exc}") from exc
        return model
