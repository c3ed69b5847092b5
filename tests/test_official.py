"""The original GVSL code's checkpoint layout (gvsl_fast.models.official): its weights load into
UNet3D with the same outputs, and `gvsl-fast export --layout official` writes a file that loads
strictly into modules named and wired as the original's.

`OriginalUNet` and `original_gvsl` below rebuild the original modules' names and wiring (as
documented in gvsl_fast.models.official): blocks `inc`, `down1..4` (`maxpool_conv` = pool, then
`double_conv`), `up1..4` (`conv`, input `[skip, upsampled]`), input padded to a multiple of 16
with the odd voxel after."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gvsl_fast.cli import main
from gvsl_fast.models import GVSL, UNet3D, official
from gvsl_fast.train import checkpoint
from gvsl_fast.train.config import TrainConfig
from gvsl_fast.train.loop import build_model

DOWN, UP = (8, 16, 16, 16, 32), (16, 16, 16, 8)


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1), nn.GroupNorm(cout // 8, cout), nn.LeakyReLU(0.2),
            nn.Conv3d(cout, cout, 3, padding=1), nn.GroupNorm(cout // 8, cout), nn.LeakyReLU(0.2))

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool3d(2), DoubleConv(cin, cout))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = DoubleConv(cin, cout)

    def forward(self, x, skip):
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class OriginalUNet(nn.Module):
    def __init__(self, cin: int = 1) -> None:
        super().__init__()
        self.inc = DoubleConv(cin, DOWN[0])
        for k in range(1, 5):
            setattr(self, f"down{k}", Down(DOWN[k - 1], DOWN[k]))
        prev = (DOWN[4],) + UP[:3]
        for k in range(4):
            setattr(self, f"up{k + 1}", Up(prev[k] + DOWN[3 - k], UP[k]))

    def forward(self, x):
        size = x.shape[2:]
        pad = [(-s) % 16 for s in size]
        x = F.pad(x, [n for i in (2, 1, 0) for n in (pad[i] // 2, pad[i] - pad[i] // 2)])
        skips = [self.inc(x)]
        for k in range(1, 5):
            skips.append(getattr(self, f"down{k}")(skips[-1]))
        x = skips[4]
        for k in range(4):
            x = getattr(self, f"up{k + 1}")(x, skips[3 - k])
        crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, size, strict=True))
        return skips[4], x[(..., *crop)]


def original_gvsl() -> nn.Module:
    """The original GVSL module's parameters (its forward is not needed here)."""
    m = nn.Module()
    m.unet = OriginalUNet()
    m.f_conv = DoubleConv(2 * DOWN[4], 256)
    m.sp_conv = DoubleConv(2 * UP[3], 16)
    m.res_conv = nn.Sequential(nn.Conv3d(UP[3], 16, 3, padding=1), nn.GroupNorm(4, 16),
                               nn.LeakyReLU(0.2), nn.Conv3d(16, 1, 1))
    m.out_flow = nn.Conv3d(16, 3, 3, padding=1)
    for name, k in (("fc_rot", 3), ("fc_scl", 3), ("fc_trans", 3), ("fc_shear", 6)):
        setattr(m, name, nn.Linear(256, k))
    return m


def randomized(module: nn.Module) -> nn.Module:
    """Every parameter random (GroupNorm's affine too, so a swapped one shows)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module.double()


# sizes that pad by 12, 8 and 13 voxels: uneven halves on two axes
X = torch.rand(2, 1, 20, 24, 19, dtype=torch.float64)


@pytest.mark.parametrize("layout", ["gvsl", "finetune", "data_parallel", "bare_unet"])
def test_original_checkpoints_load_with_the_same_outputs(tmp_path, layout):
    orig = randomized(original_gvsl())
    state = orig.state_dict()
    if layout == "finetune":  # UNet3D_GVSL: the GVSL model and its U-Net registered again
        unet = {"unet." + k: v for k, v in orig.unet.state_dict().items()}
        state = {**{"unet_pre." + k: v for k, v in state.items()}, **unet,
                 "out_conv.weight": torch.zeros(5, 8, 3, 3, 3)}
    elif layout == "data_parallel":
        state = {"module." + k: v for k, v in state.items()}
    elif layout == "bare_unet":
        state = orig.unet.state_dict()
    torch.save(state, tmp_path / "GVSL_epoch_1000.pth")
    net = UNet3D.from_pretrained(tmp_path / "GVSL_epoch_1000.pth").double()
    assert net.config == {"in_channels": 1, "down": list(DOWN), "up": list(UP)}
    with torch.no_grad():
        for ours, theirs in zip(net(X), orig.unet(X), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_export_in_the_original_layout_loads_strictly(tmp_path, capsys):
    torch.manual_seed(1)
    model = randomized(GVSL(UNet3D(down=DOWN, up=UP))).float()
    ckpt = checkpoint.save({"step": 7, "model": model.state_dict(),
                            "backbone_config": model.backbone.config}, tmp_path / "ckpt.pt")
    out = tmp_path / "GVSL_epoch_7.pth"
    assert main(["export", str(ckpt), str(out), "--layout", "official"]) == 0
    assert "original GVSL code's layout (step 7)" in capsys.readouterr().out
    orig = original_gvsl()
    orig.load_state_dict(torch.load(out, weights_only=True))  # strict
    orig, net = orig.double(), model.backbone.double()
    with torch.no_grad():
        for ours, theirs in zip(net(X), orig.unet(X), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert torch.equal(orig.fc_trans.weight, model.affine_head.translation.weight)
    assert torch.equal(orig.res_conv[3].bias, model.restoration_head[3].bias)
    # and back: the same backbone, bit for bit
    again = UNet3D.from_pretrained(out).double()
    for k, v in net.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_files_of_neither_layout_are_refused(tmp_path, capsys):
    torch.save({"encoder.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="holds no U-Net of the original GVSL code"):
        UNet3D.from_pretrained(tmp_path / "other.pt")
    # a cut-off file, a configuration of other widths, a damaged configuration: each named
    UNet3D(down=DOWN, up=UP).save_pretrained(tmp_path / "bb.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "bb.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"from_pretrained: {tmp_path / 'cut.pt'} cannot be read"):
        UNet3D.from_pretrained(tmp_path / "cut.pt")
    cfg = tmp_path / "bb.pt.json"
    cfg.write_text(cfg.read_text().replace("32", "64"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'bb.pt'} \\(configuration {cfg}\\): "
                       "RuntimeError: Error\\(s\\) in loading state_dict"):
        UNet3D.from_pretrained(tmp_path / "bb.pt")
    cfg.write_text("{")
    with pytest.raises(ValueError, match="JSONDecodeError"):
        UNet3D.from_pretrained(tmp_path / "bb.pt")
    # a training checkpoint (numpy RNG state inside, as pretrain writes): pointed to export
    checkpoint.save({"step": 1, "rng": np.random.get_state()}, tmp_path / "ckpt_00000001.pt")
    with pytest.raises(ValueError, match="is a gvsl-fast training checkpoint; write its backbone "
                       "with `gvsl-fast export"):
        UNet3D.from_pretrained(tmp_path / "ckpt_00000001.pt")
    torch.save({"unet.inc.double_conv.0.weight": torch.zeros(8, 1, 3, 3, 3)}, tmp_path / "o.pth")
    with pytest.raises(ValueError, match=f"{tmp_path / 'o.pth'} \\(original GVSL layout\\)"):
        UNet3D.from_pretrained(tmp_path / "o.pth")
    with pytest.raises(official.LayoutError, match="unexpected key 'extra.weight'"):
        official.model_to_official({"extra.weight": torch.zeros(1)})
    model = GVSL(UNet3D(down=DOWN, up=UP))
    ckpt = checkpoint.save({"step": 1, "model": model.state_dict(),
                            "backbone_config": {"in_channels": 1, "down": [8, 16, 16, 16, 64],
                                                "up": list(UP)}}, tmp_path / "ckpt.pt")
    assert main(["export", str(ckpt), str(tmp_path / "x.pth"), "--layout", "official"]) == 2
    assert "written for another model" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def test_pretraining_starts_from_the_original_weights(tmp_path, capsys):
    orig = randomized(original_gvsl()).float()
    torch.save(orig.state_dict(), tmp_path / "GVSL_epoch_1000.pth")
    cfg = TrainConfig(init_backbone=str(tmp_path / "GVSL_epoch_1000.pth")).resolved("cpu")
    model = build_model(cfg, torch.device("cpu"))
    released = UNet3D.from_pretrained(tmp_path / "GVSL_epoch_1000.pth")
    assert model.backbone.config == released.config
    for k, v in released.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    missing = tmp_path / "nope.pth"
    assert main(["pretrain", "--init-backbone", str(missing), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    assert f"--init-backbone {missing}: UNet3D.from_pretrained: no weights at" in (
        capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
