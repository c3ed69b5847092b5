"""Loss history (CSV, TensorBoard when installed) and the two pictures of a run."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

LOSSES = ("loss", "ncc", "smooth", "mse")
TRAIN_COLUMNS = ("step", *LOSSES, "pairs_per_s", "seconds")
EVAL_COLUMNS = ("step", *LOSSES)


class History:
    """One CSV of the run folder (``train``: history.csv, per step; ``eval``: eval.csv, the fixed
    evaluation batch at each save). On resume, rows past the resumed step are dropped so the file
    matches the checkpoint it continues from. With ``tensorboard`` the same scalars also go to
    ``tensorboard/<name>/`` as ``<name>/<column>``."""

    def __init__(self, out_dir: Path, start_step: int, name: str = "train",
                 tensorboard: bool = False) -> None:
        self.name = name
        self.columns = TRAIN_COLUMNS if name == "train" else EVAL_COLUMNS
        self.path = Path(out_dir) / ("history.csv" if name == "train" else f"{name}.csv")
        self.rows: list[dict] = []
        if start_step and self.path.is_file():
            with self.path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.columns)
            w.writeheader()
            w.writerows(self.rows)
        self.tb = _summary_writer(Path(out_dir) / "tensorboard" / name) if tensorboard else None

    def append(self, row: dict) -> None:
        row = {k: row[k] for k in self.columns}
        self.rows.append(row)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)
        if self.tb is not None:
            for k in self.columns[1:]:
                self.tb.add_scalar(f"{self.name}/{k}", float(row[k]), int(row["step"]))

    def column(self, name: str) -> list[float]:
        return [float(r[name]) for r in self.rows]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def tensorboard_error() -> str | None:
    """Why TensorBoard logging is unavailable, or None when it is (tensorboard is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception as exc:  # ImportError when absent; a broken install must not stop training
        return f"{type(exc).__name__}: {exc}"
    return None


def _summary_writer(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: History, evaluation: History, path: Path) -> None:
    """Total, NCC, smoothness and restoration losses against the step: per training batch, their
    running mean, and on the fixed evaluation batch."""
    plt = _pyplot()
    steps = history.column("step")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, name in zip(axes, LOSSES, strict=True):
        values = history.column(name)
        ax.plot(steps, values, lw=0.8, alpha=0.5)
        if len(values) >= 10:  # a running mean shows the trend through per-batch noise
            k = max(len(values) // 10, 2)
            kernel = torch.ones(k) / k
            smooth = torch.nn.functional.conv1d(torch.tensor(values).view(1, 1, -1),
                                                kernel.view(1, 1, -1)).flatten()
            ax.plot(steps[k - 1:], smooth.tolist(), lw=1.6)
        ax.plot(evaluation.column("step"), evaluation.column(name), "o-", ms=4, label="eval")
        ax.legend(loc="upper right")
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_preview(fixed: torch.Tensor, moving: torch.Tensor, warped: torch.Tensor,
                 restored: torch.Tensor, path: Path) -> None:
    """Middle slices (three planes) of fixed B, moving A, A warped onto B, and restored A."""
    plt = _pyplot()
    vols = {"fixed B": fixed, "moving A": moving, "warped A": warped, "restored A": restored}
    fig, axes = plt.subplots(3, 4, figsize=(10, 7.5))
    for col, (name, v) in enumerate(vols.items()):
        v = v[0, 0].detach().float().cpu()
        d, h, w = (s // 2 for s in v.shape)
        for row, sl in enumerate((v[d], v[:, h], v[:, :, w])):
            ax = axes[row, col]
            ax.imshow(sl.numpy(), cmap="gray", vmin=0, vmax=1, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
