"""Helpers shared by the op tests: tolerances of DESIGN §6 and the backends to check here."""

from __future__ import annotations

import os

import torch

from gvsl_fast.ops import _backend

HALF = (torch.float16, torch.bfloat16)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, computed in float64 (0 when both are zero)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all(), "non-finite values in the result"
    den = ref.norm()
    num = (x - ref).norm()
    return 0.0 if num == 0 else (num / den.clamp_min(1e-30)).item()


def tolerance(device: str | torch.device, dtype: torch.dtype) -> float:
    if dtype in HALF:
        return 1e-2
    return 1e-4 if torch.device(device).type == "cuda" else 1e-5


def fast_backends() -> list[tuple[str, str]]:
    """(device, backend) pairs runnable on this machine: CPU C++ always; Triton on the GPU, or
    under TRITON_INTERPRET=1 on CPU tensors; the CUDA kernels where a GPU exists."""
    pairs = [("cpu", "cpu")]
    if _backend.triton_error(torch.device("cpu")) is None and os.environ.get("TRITON_INTERPRET"):
        pairs.append(("cpu", "triton"))
    if torch.cuda.is_available():
        pairs.append(("cuda", "cuda"))
        pairs.append(("cuda", "triton"))
    return pairs


def backend_ids(pairs) -> list[str]:
    return [f"{d}-{b}" for d, b in pairs]
