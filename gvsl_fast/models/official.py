"""The original GVSL code's checkpoint layout (github.com/YutingHe-list/GVSL, ``models/gvsl.py``),
so that its released weights (``GVSL_epoch_1000.pth``) load into ``UNet3D`` and our pre-trained
models drop into the scripts written for it (its ``UNet3D_GVSL`` fine-tuning model, and the
comparisons of self-supervised methods that load the released file through it).

The two layouts hold the same tensors under other names, with one difference: the original
decoder blocks concatenate ``[skip, upsampled]`` and ours ``[upsampled, skip]``, so the first
convolution of each decoder block has its input channels in the other order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# a key of the original U-Net's first block: finds the U-Net inside any state dict holding it
# (the GVSL model's ``unet.``, the fine-tuning model's ``unet_pre.unet.``, DataParallel's
# ``module.``)
_FIRST = "inc.double_conv.0.weight"


def _backbone_names() -> list[tuple[str, str]]:
    """(our UNet3D prefix, the original UNet_base prefix), block by block."""
    names = [("encoder.0.", "inc.double_conv.")]
    names += [(f"encoder.{k}.", f"down{k}.maxpool_conv.1.double_conv.") for k in range(1, 5)]
    names += [(f"decoder.{k}.", f"up{k + 1}.conv.double_conv.") for k in range(4)]
    return names


# our GVSL model's heads and the original GVSL module's
_HEAD_NAMES = [
    ("affine_head.conv.", "f_conv.double_conv."),
    ("affine_head.rotation.", "fc_rot."),
    ("affine_head.scale.", "fc_scl."),
    ("affine_head.translation.", "fc_trans."),
    ("affine_head.shear.", "fc_shear."),
    ("deformable_head.conv.", "sp_conv.double_conv."),
    ("deformable_head.flow.", "out_flow."),
    ("restoration_head.", "res_conv."),
]


class LayoutError(ValueError):
    """A state dict that is not in the layout it was taken for."""


def _rename(state: Mapping[str, torch.Tensor], names: list[tuple[str, str]],
            what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = next((dst + key[len(src):] for src, dst in names if key.startswith(src)), None)
        if new is None:
            raise LayoutError(f"{what}: unexpected key {key!r}")
        out[new] = value
    return out


def _swap_decoder_inputs(state: dict[str, torch.Tensor], to_official: bool) -> None:
    """Reorders the input channels of each decoder block's first convolution (in our names):
    ours take ``[upsampled, skip]``, the original ``[skip, upsampled]``."""
    for k in range(4):
        key, skip_key = f"decoder.{k}.0.weight", f"encoder.{3 - k}.3.weight"
        for name in (key, skip_key):
            if name not in state:
                raise LayoutError(f"UNet3D: missing key {name!r}")
        w = state[key]
        skip = state[skip_key].shape[0]
        first = w.shape[1] - skip if to_official else skip
        state[key] = torch.cat([w[:, first:], w[:, :first]], dim=1)


def holds_backbone(state: object) -> bool:
    """Whether ``state`` is a state dict holding the original code's U-Net."""
    return isinstance(state, Mapping) and any(
        isinstance(k, str) and k.endswith(_FIRST) for k in state)


def backbone_from_official(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """``(UNet3D state_dict, UNet3D configuration)`` of the original code's U-Net in ``state``:
    a state dict of its ``GVSL`` or ``UNet3D_GVSL`` model (the released ``GVSL_epoch_1000.pth``
    is the former) or of its bare ``UNet_base``, with or without DataParallel's ``module.``.
    Where the U-Net sits under several prefixes (``UNet3D_GVSL`` registers it twice) the
    shortest is read."""
    prefixes = [k[: -len(_FIRST)] for k in state if k.endswith(_FIRST)]
    if not prefixes:
        raise LayoutError("no U-Net of the original GVSL code (no key ending in "
                          f"{_FIRST!r})")
    prefix = min(prefixes, key=len)
    unet = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ours = _rename(unet, [(b, a) for a, b in _backbone_names()], "the original U-Net")
    _swap_decoder_inputs(ours, to_official=False)
    config = {
        "in_channels": ours["encoder.0.0.weight"].shape[1],
        "down": [ours[f"encoder.{k}.3.weight"].shape[0] for k in range(5)],
        "up": [ours[f"decoder.{k}.3.weight"].shape[0] for k in range(4)],
    }
    return ours, config


def model_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``GVSL`` model's state dict in the original ``GVSL`` module's layout: its U-Net under
    ``unet.`` and the heads under the original names, so that the file loads strictly wherever
    the released weights do (the original ``UNet3D_GVSL`` takes the U-Net from it).

    The heads come along so that strict loading succeeds; only the U-Net transfers as is. The
    original code reads the affine head's translation in other units (divided by the volume's
    size) and resamples twice, so its registration with these heads differs from ours."""
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    heads = _rename({k: v for k, v in state.items() if not k.startswith("backbone.")},
                    _HEAD_NAMES, "GVSL")
    _swap_decoder_inputs(backbone, to_official=True)
    out = {"unet." + k: v for k, v in _rename(backbone, _backbone_names(), "UNet3D").items()}
    return {**out, **heads}
