"""Helpers shared by the op tests: tolerances of DESIGN §6 and the backends to check here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from gvsl_fast import ops
from gvsl_fast.ops import _backend, reference

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


def upstream_grads(out: torch.Tensor, inputs, seed: int = 0,
                   layout: torch.memory_format = torch.contiguous_format):
    """Gradients of `out` for those of `inputs` that require grad, under a fixed random upstream
    gradient in `layout`."""
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    go = go.to(out.device, out.dtype).contiguous(memory_format=layout)
    return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], go)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, device, dtype: torch.dtype) -> None:
    """Same shape and dtype as `ref`, within DESIGN §6's tolerance for `device` and `dtype`."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) <= tolerance(device, dtype), rel_err(out, ref)


# A channel count that the CPU's channel-vector loops (channels_last images from 8 channels on)
# split into whole vectors (8 float or 4 double channels) plus a remainder, on 1 and 2 threads.
VECTOR_CHANNELS = 19


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block: the CPU kernels split work
    (channels among them) by it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def channel_vector_cases(backend: str) -> list[tuple[int, torch.dtype]]:
    """(threads, dtype) pairs for the many-channel tests: the CPU kernels on 1 and 2 threads in
    float32 and float64; the other backends once, in float32."""
    if backend != "cpu":
        return [(torch.get_num_threads(), torch.float32)]
    return [(t, dt) for t in (1, 2) for dt in (torch.float32, torch.float64)]


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


def volumes(shape, device="cpu", dtype=torch.float32, seed=0):
    """Two correlated random volumes (lncc's inputs), drawn in float64 and then cast."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    b = (0.6 * a + 0.4 * torch.rand(shape, generator=g, dtype=torch.float64))  # correlated
    return a.to(device, dtype), b.to(device, dtype)


# ---- every op on small float64-drawn inputs (autodiff and autocast tests) -------------------

OPS = ["warp", "grid_sample", "affine_warp", "compose", "affine_flow_warp", "lncc"]
OP_SIZE = (3, 4, 5)


def op_inputs(name: str, device, dtype, image_grad: bool, seed: int = 0) -> list[torch.Tensor]:
    """Small inputs of op `name`, positions off the integer grid and partly outside the volume;
    which require grad: every position (flow, grid, theta), lncc's two volumes, and the image
    as `image_grad` says."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    theta = torch.eye(3, 4, dtype=torch.float64).unsqueeze(0) + rand(1, 3, 4, scale=0.1)
    image = rand(1, 2, *OP_SIZE)
    tensors = {
        "warp": [image, rand(1, 3, *OP_SIZE, scale=1.3)],
        "grid_sample": [image, rand(1, 2, 3, 4, 3, scale=0.7)],
        "affine_warp": [image, theta],
        "compose": [theta, rand(1, 3, *OP_SIZE, scale=1.3)],
        "affine_flow_warp": [image, theta, rand(1, 3, *OP_SIZE, scale=1.3)],
        "lncc": [image, 0.5 * image + rand(1, 2, *OP_SIZE, scale=0.5)],
    }[name]
    has_image = name not in ("compose", "lncc")
    out = []
    for i, t in enumerate(tensors):
        grad = image_grad if has_image and i == 0 else True
        out.append(t.to(device, dtype).requires_grad_(grad))
    return out


def op_call(name: str, backend: str, padding: str | None = None):
    """Op `name` on `backend`, taking op_inputs's tensors positionally; the sampling ops with
    `padding` (by default zeros, compose border)."""
    pad = padding or ("border" if name == "compose" else "zeros")
    call = {
        "warp": lambda x, f: ops.warp(x, f, padding_mode=pad, backend=backend),
        "grid_sample": lambda x, g: ops.grid_sample(x, g, padding_mode=pad, align_corners=True,
                                                    backend=backend),
        "affine_warp": lambda x, t: ops.affine_warp(x, t, padding_mode=pad, backend=backend),
        "compose": lambda t, f: ops.compose(t, f, padding_mode=pad, backend=backend),
        "affine_flow_warp": lambda x, t, f: ops.affine_flow_warp(x, t, f, padding_mode=pad,
                                                                 backend=backend),
        "lncc": lambda a, b: ops.lncc(a, b, window=3, backend=backend),
    }
    return call[name]


def affine_grid_composition(theta, flow, align_corners, padding, image=None):
    """psi and, given an image, the image warped by it, built only from F.affine_grid and
    F.grid_sample (an oracle outside gvsl_fast for compose and affine_flow_warp): flow is sampled
    at the affine grid, positions converted between normalized and index units explicitly."""
    size = flow.shape[2:]
    grid = F.affine_grid(theta, list(flow.shape), align_corners=align_corners)  # (x, y, z)
    sizes = torch.tensor(size[::-1], dtype=flow.dtype)  # W, H, D
    if align_corners:
        to_index = lambda x: (x + 1) / 2 * (sizes - 1)
        to_norm = lambda i: 2 * i / (sizes - 1) - 1
    else:
        to_index = lambda x: ((x + 1) * sizes - 1) / 2
        to_norm = lambda i: (2 * i + 1) / sizes - 1
    sampled = F.grid_sample(flow, grid, "bilinear", padding, align_corners)  # (B, 3, D, H, W)
    p_hat = to_index(grid).flip(-1).permute(0, 4, 1, 2, 3)  # (B, 3, D, H, W) in (d, h, w)
    psi = sampled + p_hat - reference.identity_grid(size, flow)
    if image is None:
        return psi, None
    q = (sampled + p_hat).permute(0, 2, 3, 4, 1).flip(-1)  # (B, D, H, W, 3) in (w, h, d)
    return psi, F.grid_sample(image, to_norm(q), "bilinear", padding, align_corners)
