"""Training configuration and its presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

# The paper's configuration (GPU) and a short CPU preset that finishes in 5-12 minutes on a
# 2-core machine (README): same model and losses, smaller patches at 2 mm, fewer steps.
PRESETS: dict[str, dict] = {
    "paper": {"steps": 200_000, "patch": (128, 128, 128), "spacing": 1.0, "save_every": 5000,
              "log_every": 50},
    "cpu-short": {"steps": 120, "patch": (48, 48, 48), "spacing": 2.0, "save_every": 60,
                  "log_every": 10},
}


@dataclass
class TrainConfig:
    """Everything `gvsl-fast pretrain` takes; None fields come from the preset."""

    data: str | None = None
    out: Path = Path("runs/gvsl")
    cache: str | None = None
    preset: str | None = None
    steps: int | None = None
    batch_size: int = 2
    patch: tuple[int, int, int] | None = None
    spacing: float | None = None
    intensity: str = "mr"
    lr: float = 1e-4
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    loader: str = "auto"
    workers: int = 2
    ops_backend: str = "auto"
    fusion: str = "paper"
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    save_every: int | None = None
    keep_last: int = 3
    log_every: int | None = None
    resume: str | None = None
    init_backbone: str | None = None
    compile: bool = False
    grad_checkpoint: bool = False
    channels_last: bool = True  # faster on the CPU too (U-Net convs, 32-channel feature warp)
    optimizer: str = "adam"
    deterministic: bool = False
    progress: bool = True

    def resolved(self, device_type: str) -> TrainConfig:
        """A copy with the preset (``paper`` on a GPU, ``cpu-short`` on the CPU) filled in."""
        preset = self.preset or ("paper" if device_type == "cuda" else "cpu-short")
        if preset not in PRESETS:
            raise ValueError(f"--preset must be one of {tuple(PRESETS)}, got {preset!r}")
        values = asdict(self)
        values["preset"] = preset
        for k, v in PRESETS[preset].items():
            if values[k] is None:
                values[k] = v
        values["patch"] = tuple(values["patch"])
        values["weights"] = tuple(values["weights"])
        values["out"] = Path(values["out"])
        if values["data"] is not None:  # absolute, so that a resume from elsewhere compares it
            values["data"] = str(Path(values["data"]).expanduser().resolve())
        return TrainConfig(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d
