"""Atomic, validated checkpoints (DESIGN §5): temp file + fsync + rename, keep-last-N."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

FORMAT = "gvsl-fast-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, or not from this model."""


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:08d}.pt"


def step_of(path: Path) -> int:
    """The step in a checkpoint's file name."""
    return int(_NAME.match(Path(path).name).group(1))


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoints in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if _NAME.match(p.name))


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file with ``write(f)`` so that ``path`` is either its old self or complete: a
    temporary file beside it, fsync, rename, fsync of the folder. Ctrl-C meanwhile is held until
    the file is in place (then raised), so an interrupted run keeps the file it was writing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with _hold_sigint():
        # mode 0o666 less the umask, as any other file the run writes (mkstemp would give 0o600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, Exception):  # a full disk, say: name the file; the old one stays
                raise CheckpointError(f"could not write {path} ({type(e).__name__}: {e})") from e
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


@contextlib.contextmanager
def _hold_sigint():
    """Defer SIGINT (Ctrl-C) to the end of the block, then hand it to the handler it would have
    met. Off the main thread (no handlers can be set there), or where SIGINT is ignored, nothing
    changes."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None)):
        yield
        return
    caught: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
    if caught:
        if callable(before):  # Python's default handler raises KeyboardInterrupt
            before(signal.SIGINT, None)
        else:  # SIG_DFL: the process would have ended
            raise KeyboardInterrupt


def save(state: dict, path: Path, keep_last: int | None = None) -> Path:
    """Write ``state`` to ``path`` atomically; then keep only the newest ``keep_last``."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    path = write_atomic(path, lambda f: torch.save(payload, f))
    if keep_last:
        for old in list_checkpoints(path.parent)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a gvsl-fast training checkpoint, judged without unpickling it: its
    format string in the pickle of torch's zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            return len(pickles) == 1 and FORMAT.encode() in archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile):
        return False


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint; one clear error naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for a cut-off zip/pickle
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read ({exc})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gvsl-fast checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state.get('version')}, expected {VERSION}"
        )
    return state


def resolve_resume(resume: str, out_dir: Path) -> Path | None:
    """``auto``: the newest checkpoint in ``out_dir`` (None if there is none); else a path."""
    if resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    return Path(resume)


def plain_keys(state_dict: dict) -> dict:
    """``state_dict`` with the ``_orig_mod.`` segments of a torch.compile wrapper removed, as
    written by compiled runs before the U-Net was compiled in place; other keys unchanged."""
    return {k.replace("._orig_mod.", ".").removeprefix("_orig_mod."): v
            for k, v in state_dict.items()}


def check_model_state(path: Path, model: torch.nn.Module, state_dict: dict) -> None:
    """Refuse a checkpoint written for another model, naming what differs."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
        raise CheckpointError(
            f"checkpoint {path} was written for another model ({'; '.join(parts)})"
        )
