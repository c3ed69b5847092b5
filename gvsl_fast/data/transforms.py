"""GVSL's transforms (DESIGN §4), batched on the training device and seeded by a generator.

:class:`AppearanceTransform` builds ``A_t = t(A)``: local pixel shuffling, a monotone Bezier
intensity curve and in-painting, with the GVSL repository's settings. :class:`SpatialTransform`
applies one random affine + smooth elastic warp per sample, identically to every volume passed.

Random parameters are drawn with ``generator`` on the generator's device (the default generator
of the data's device when None) and moved to the data; pass a generator on the data's device to
keep everything there. The appearance transforms run as one fused kernel (Triton on CUDA, C++ on
the CPU; plain torch ops are the reference and the last resort), the spatial one as a single
resampling; nothing loops over samples or blocks in Python.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from gvsl_fast.affine import affine_matrix
from gvsl_fast.ops import _backend
from gvsl_fast.ops.compose import affine_flow_warp  # affine + elastic in one resampling

BACKENDS = ("auto", "triton", "cpu", "torch")
_announced: set[tuple[str, str]] = set()

if _backend.extension_error() is None:
    @torch.library.register_fake("gvsl_fast::appearance")
    def _appearance_fake(x, *args):
        return torch.empty_like(x)


def _gen_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def _rand(shape, generator, like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) float32 of ``shape`` drawn from ``generator``, on ``like``'s device."""
    dev = _gen_device(generator, like)
    return torch.rand(shape, generator=generator, device=dev).to(like.device)


def _randint(lo: torch.Tensor, hi: torch.Tensor, generator, like) -> torch.Tensor:
    """Integers in ``[lo, hi)`` elementwise (``hi > lo``), int64."""
    u = _rand(torch.broadcast_shapes(lo.shape, hi.shape), generator, like)
    # truncation (not torch.floor, which stalls on small CPU tensors with several threads)
    return (lo + (u * (hi - lo).to(u.dtype)).long()).minimum(hi - 1)


def _check(x: torch.Tensor, name: str = "x") -> None:
    _backend.check_volume("transforms", name, x)


# ---- plain-torch appearance ops (the reference of the fused C++ and Triton kernels) ---------


def local_shuffle_torch(x: torch.Tensor, starts: torch.Tensor, perm: torch.Tensor,
                        block: tuple[int, int, int]) -> torch.Tensor:
    """Local pixel shuffling of every sample (semantics in ``csrc/cpu/appearance.cpp``).

    Work is proportional to the N*P block voxels, not the volume: the last block covering each
    voxel is found by ``scatter_reduce(amax)``, then only the block voxels that won are copied.
    """
    B, C, D, H, W = x.shape
    V = D * H * W
    starts, perm = starts.to(x.device).long(), perm.to(x.device).long()
    n_blocks = starts.shape[1]
    bd, bh, bw = block
    if n_blocks == 0:
        return x.clone()
    j = torch.arange(bd * bh * bw, device=x.device)
    offset = ((j // (bh * bw)) * H + (j // bw) % bh) * W + j % bw           # (P,)
    base = (starts[..., 0] * H + starts[..., 1]) * W + starts[..., 2]      # (B, N)
    sample = torch.arange(B, device=x.device).view(B, 1, 1) * V
    dst = (base.unsqueeze(-1) + offset + sample).reshape(-1)              # (B*N*P,)
    src = (base.unsqueeze(-1) + offset[perm].unsqueeze(1) + sample).reshape(-1)
    ids = torch.arange(n_blocks, device=x.device).view(1, -1, 1).expand(B, -1, offset.numel())
    ids = ids.reshape(-1)
    owner = torch.full((B * V,), -1, dtype=torch.long, device=x.device)
    owner.scatter_reduce_(0, dst, ids, "amax")
    won = owner[dst] == ids
    dst, src = dst[won], src[won]
    out = x.clone()
    out.view(B, C, V)[dst // V, :, dst % V] = x.reshape(B, C, V)[src // V, :, src % V]
    return out


def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``y(x)`` per sample by linear interpolation in ``lut`` (B, L); x clamped to [0, 1]."""
    B, L = lut.shape
    v = x.reshape(B, -1).float().clamp(0, 1).mul_(L - 1)
    i0 = v.long().clamp_(max=L - 2)
    w = v.sub_(i0)
    i0 += torch.arange(B, device=x.device).view(B, 1) * L
    i0 = i0.view(-1)
    step = torch.diff(lut, dim=1, append=lut[:, -1:]).reshape(-1)
    y = lut.reshape(-1).index_select(0, i0).addcmul_(w.view(-1), step.index_select(0, i0))
    return y.view(x.shape).to(x.dtype)


def paint_boxes_torch(x: torch.Tensor, boxes: torch.Tensor, noise_offset: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
    """In-painting: box k of sample b takes ``noise[noise_offset[b, k] + box-local index]``,
    later boxes winning; one batched pass per box slot (K <= 30)."""
    B, C, D, H, W = x.shape
    boxes, noise_offset = boxes.to(x.device).long(), noise_offset.to(x.device).long()
    axes = [torch.arange(n, device=x.device) for n in (D, H, W)]
    idx = torch.full((B, D, H, W), -1, dtype=torch.long, device=x.device)
    for k in range(boxes.shape[1]):
        lo, length = boxes[:, k, :3], boxes[:, k, 3:] - boxes[:, k, :3]
        rel = [a - lo[:, i, None] for i, a in enumerate(axes)]                 # (B, n)
        m = [(r >= 0) & (r < length[:, i, None]) for i, r in enumerate(rel)]
        inside = m[0][:, :, None, None] & m[1][:, None, :, None] & m[2][:, None, None, :]
        local = ((rel[0][:, :, None, None] * length[:, 1, None, None, None]
                  + rel[1][:, None, :, None]) * length[:, 2, None, None, None]
                 + rel[2][:, None, None, :])
        idx = torch.where(inside, noise_offset[:, k, None, None, None] + local, idx)
    painted = idx >= 0
    if not painted.any():
        return x.clone()
    fill = noise.to(x.device)[idx.clamp_min(0)].to(x.dtype)
    return torch.where(painted.unsqueeze(1), fill.unsqueeze(1), x)


def appearance_torch(x: torch.Tensor, p: dict) -> torch.Tensor:
    """The appearance transforms with plain torch ops, from the parameters ``p``."""
    shuffled = local_shuffle_torch(x, p["starts"], p["perm"], p["block"])
    out = torch.where(p["shuffle"].to(x.device).view(-1, 1, 1, 1, 1), shuffled, x)
    curved = apply_lut(out, p["lut"].to(x.device))
    out = torch.where(p["nonlinear"].to(x.device).view(-1, 1, 1, 1, 1), curved, out)
    return paint_boxes_torch(out, p["boxes"], p["noise_offset"], p["noise"])


def _fused_args(x: torch.Tensor, p: dict):
    return (x, p["starts"], p["perm"], list(p["block"]), p["shuffle"], p["lut"], p["nonlinear"],
            p["boxes"], p["noise_offset"], p["noise"])


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """``auto``: Triton for CUDA tensors, the C++ kernel for CPU tensors, else plain torch."""
    _backend.check_choice("AppearanceTransform", "backend", backend, BACKENDS)
    if backend == "auto":
        fast = "triton" if x.is_cuda else "cpu"
        why = _backend.triton_error(x.device) if x.is_cuda else _backend.extension_error()
        if why is None:
            return fast
        if (fast, why) not in _announced:
            _announced.add((fast, why))
            warnings.warn(f"AppearanceTransform: backend='auto' uses plain torch ops: {why}",
                          RuntimeWarning, stacklevel=3)
        return "torch"
    why = {"triton": _backend.triton_error(x.device),
           "cpu": _backend.extension_error() or (None if x.device.type == "cpu"
                                                 else "backend 'cpu' needs CPU tensors")}
    if why.get(backend):
        raise RuntimeError(f"AppearanceTransform: backend={backend!r} is not available: "
                           f"{why[backend]}")
    return backend


def appearance(x: torch.Tensor, p: dict, backend: str = "auto") -> torch.Tensor:
    """Apply the appearance transforms with parameters ``p`` (``AppearanceTransform.params``)."""
    be = resolve_backend(backend, x)
    if be == "triton":
        from gvsl_fast.kernels.appearance import appearance as kernel

        return kernel(*_fused_args(x, p))
    if be == "cpu":
        return torch.ops.gvsl_fast.appearance(*_fused_args(x, p))
    return appearance_torch(x, p)


def bezier_lut(ctrl: torch.Tensor, size: int = 1024, steps: int = 4096) -> torch.Tensor:
    """Lookup tables ``(B, size)`` of the curves through (0,0), (x1,y1), (x2,y2), (1,1) with
    ``ctrl`` (B, 4) = (x1, y1, x2, y2) sorted so x1 <= x2 and y1 <= y2: then x(t) and y(t) are
    monotone and the curve is the graph of y(x). Entry k is y at x = k / (size - 1)."""
    t = torch.linspace(0, 1, steps, device=ctrl.device, dtype=torch.float64)
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
    c = ctrl.double()
    xs = c[:, 0:1] * b1 + c[:, 2:3] * b2 + b3                                # (B, steps)
    ys = c[:, 1:2] * b1 + c[:, 3:4] * b2 + b3
    B = ctrl.shape[0]
    u = torch.linspace(0, 1, size, device=ctrl.device, dtype=torch.float64).expand(B, -1)
    # hi[k] = #{xs < u_k} (searchsorted, which stalls on small inputs with several threads):
    # each curve point counts for every grid index k > its x * (size - 1)
    first = ((xs * (size - 1)).long() + 1).clamp(max=size)     # x >= 0: truncation is floor
    first = first + torch.arange(B, device=ctrl.device).view(B, 1) * (size + 1)
    count = torch.bincount(first.flatten(), minlength=B * (size + 1)).view(B, size + 1)
    hi = count[:, :size].cumsum(1).clamp(1, steps - 1)
    x0, x1 = xs.gather(1, hi - 1), xs.gather(1, hi)
    y0, y1 = ys.gather(1, hi - 1), ys.gather(1, hi)
    w = ((u - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1)
    return (y0 + w * (y1 - y0)).float()


# ---- the transforms --------------------------------------------------------------------------


class AppearanceTransform:
    """``A_t = t(A)``, GVSL's appearance transforms on a batch (B, C, D, H, W), per sample:

    1. local pixel shuffling with probability ``shuffle_p``: ``n_blocks`` blocks of
       ``S // 20`` voxels per axis at random corners, the block voxels permuted by one random
       permutation per sample (as the GVSL repository), reading the original image;
    2. non-linear intensity with probability ``nonlinear_p``: a monotone cubic Bezier curve
       (inner control values U[0, 1), sorted), applied as a lookup table;
    3. in-painting, always: while U[0, 1) < ``paint_continue`` (at most ``max_boxes`` times) a
       box of ``randint(S // 10, S // 5)`` voxels per axis is filled with U[0, 1) noise.

    Args:
        backend: ``"auto"`` (Triton for CUDA tensors, the fused C++ kernel for CPU tensors),
            ``"triton"``, ``"cpu"`` or ``"torch"`` (plain torch ops, the reference).
    """

    def __init__(self, shuffle_p: float = 0.8, n_blocks: int = 5000, nonlinear_p: float = 0.9,
                 paint_continue: float = 0.95, max_boxes: int = 30, backend: str = "auto"):
        _backend.check_choice("AppearanceTransform", "backend", backend, BACKENDS)
        self.shuffle_p, self.n_blocks, self.nonlinear_p = shuffle_p, n_blocks, nonlinear_p
        self.paint_continue, self.max_boxes, self.backend = paint_continue, max_boxes, backend

    def params(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """All random choices for a batch shaped like ``x``, drawn in a fixed order."""
        B = x.shape[0]
        block = tuple(max(1, s // 20) for s in x.shape[2:])
        gdev = _gen_device(generator, x)
        starts = [torch.randint(max(1, s - b), (B, self.n_blocks), generator=generator,
                                device=gdev, dtype=torch.int32)
                  for s, b in zip(x.shape[2:], block, strict=True)]
        p = {
            "block": block,
            "shuffle": _rand(B, generator, x) < self.shuffle_p,
            "starts": torch.stack(starts, -1).to(x.device),
            "perm": torch.argsort(_rand((B, math.prod(block)), generator, x), dim=1),
            "nonlinear": _rand(B, generator, x) < self.nonlinear_p,
        }
        # rows (x1, y1), (x2, y2); sorting down the rows gives x1 <= x2 and y1 <= y2
        p["lut"] = bezier_lut(_rand((B, 2, 2), generator, x).sort(dim=1).values.reshape(B, 4))
        p["boxes"] = self._boxes(x, generator)
        volume = (p["boxes"][..., 3:] - p["boxes"][..., :3]).prod(-1).flatten()   # (B*K,)
        p["noise_offset"] = (volume.cumsum(0) - volume).view(B, -1)
        p["noise"] = _rand(int(volume.sum()), generator, x)
        return p

    def _boxes(self, x: torch.Tensor, generator) -> torch.Tensor:
        B, K = x.shape[0], self.max_boxes
        size = torch.tensor(x.shape[2:], device=x.device)
        count = torch.cumprod((_rand((B, K), generator, x) < self.paint_continue).long(), 1)
        lo_len = (size // 10).clamp_min(1)
        hi_len = torch.maximum(size // 5, lo_len + 1)
        length = _randint(lo_len, hi_len.expand(B, K, 3), generator, x).minimum(size)
        room = size - length                          # corners in [3, room - 3) as the repo,
        lo = room.clamp(max=3)                        # narrowed for small patches
        corner = _randint(lo, torch.maximum(room - 3, lo + 1), generator, x).minimum(room)
        length = length * count.unsqueeze(-1)                             # unused slots: empty
        return torch.cat([corner, corner + length], dim=-1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 params: dict | None = None) -> torch.Tensor:
        """The transformed batch, same shape and dtype as ``x``."""
        _check(x)
        p = params if params is not None else self.params(x, generator)
        return appearance(x, p, self.backend)


class SpatialTransform:
    """One random spatial augmentation per sample, applied identically to every volume passed:
    ``SpatialTransform()(A, A_t, B, generator=g)`` returns the three warped alike.

    Affine (in voxel-centred coordinates, so rotations stay rotations on non-cubic patches):
    ``Shear . Scale . Rz . Ry . Rx``, rotations U(+-``rotate`` deg), scales U(``scale``), shears
    U(+-``shear`` deg) through tan, translation U(+-``translate``) in normalized units. Elastic:
    U(-1, 1) noise smoothed by a Gaussian of sigma U(``sigma``) voxels, times U(``alpha``)
    (the GVSL repository's field), computed on a grid ``sigma[0]`` times coarser (the variance
    rescaled to match) and upsampled. Resampling: trilinear, zero padding, one pass
    (``affine_flow_warp``).
    """

    def __init__(self, rotate: float = 20.0, scale: tuple[float, float] = (0.75, 1.25),
                 shear: float = 10.0, translate: float = 0.1,
                 alpha: tuple[float, float] = (0.0, 512.0),
                 sigma: tuple[float, float] = (4.0, 10.0)) -> None:
        self.rotate, self.scale, self.shear, self.translate = rotate, scale, shear, translate
        self.alpha, self.sigma = alpha, sigma

    def params(self, x: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta (B, 3, 4), flow (B, 3, D, H, W))`` for a batch shaped like ``x``."""
        B = x.shape[0]

        def uniform(shape, lo, hi):
            return lo + (hi - lo) * _rand(shape, generator, x).double()

        ang = torch.deg2rad(uniform((B, 3), -self.rotate, self.rotate))
        scl = uniform((B, 3), *self.scale)
        shr = torch.tan(torch.deg2rad(uniform((B, 6), -self.shear, self.shear)))
        trans = uniform((B, 3), -self.translate, self.translate)
        alpha = uniform((B,), *self.alpha)
        sigma = uniform((B,), *self.sigma)
        mat = affine_matrix(ang, scl, torch.zeros_like(trans), shr)[..., :3]
        # centred voxel units -> normalized (x, y, z) = (W, H, D), align_corners=False
        half = torch.tensor(x.shape[2:][::-1], dtype=torch.float64, device=x.device) / 2
        theta = torch.cat([mat * half.view(1, 1, 3) / half.view(1, 3, 1), trans[..., None]], 2)
        flow = self._elastic(x, alpha, sigma, generator)
        return theta.float(), flow

    def _elastic(self, x, alpha, sigma, generator) -> torch.Tensor:
        """U(-1, 1) noise on a grid ``f = sigma[0]`` times coarser, smoothed by a Gaussian of
        ``sigma / f`` grid steps (zero padding: a banded matrix per axis and sample), scaled by
        ``alpha * f**-1.5`` (the std a full-resolution smoothing would give) and upsampled."""
        B = x.shape[0]
        size = x.shape[2:]
        f = max(1, int(self.sigma[0]))
        coarse = [(s - 1 + f - 1) // f + 1 for s in size]
        field = _rand((B, 3, *coarse), generator, x) * 2 - 1
        sig = (sigma / f).float().view(B, 1, 1)
        for axis, n in enumerate(coarse):
            i = torch.arange(n, device=x.device, dtype=torch.float32)
            g = torch.exp(-0.5 * ((i[:, None] - i[None, :]) / sig) ** 2)        # (B, n, n)
            g = g * (g > 1e-4)                      # ~3.7 sigma, as a truncated kernel
            full = torch.exp(-0.5 * (torch.arange(-n, n + 1, device=x.device) / sig) ** 2)
            g = g / (full * (full > 1e-4)).sum(-1, keepdim=True)
            field = torch.movedim(torch.einsum("bij,bcj...->bci...",
                                               g, torch.movedim(field, 2 + axis, 2)), 2, 2 + axis)
        field = field * (alpha.float() * f ** -1.5).view(B, 1, 1, 1, 1)
        return F.interpolate(field, size=tuple(size), mode="trilinear", align_corners=True)

    def __call__(self, *volumes: torch.Tensor, generator: torch.Generator | None = None,
                 params: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, ...]:
        """The volumes (each (B, C_i, D, H, W), same B and size) warped by the same per-sample
        transform, in their dtypes."""
        if not volumes:
            raise ValueError("SpatialTransform: pass at least one volume")
        for i, v in enumerate(volumes):
            _check(v, f"volumes[{i}]")
            if v.shape[0] != volumes[0].shape[0] or v.shape[2:] != volumes[0].shape[2:]:
                raise ValueError(f"SpatialTransform: volumes[{i}] has shape {tuple(v.shape)}, "
                                 f"volumes[0] {tuple(volumes[0].shape)}: batch and size differ")
        ref = volumes[0]
        theta, flow = params if params is not None else self.params(ref, generator)
        x = torch.cat([v.float() for v in volumes], 1)
        warped = affine_flow_warp(x, theta.to(ref.device), flow.to(ref.device),
                                  align_corners=False, padding_mode="zeros")
        chans = [v.shape[1] for v in volumes]
        return tuple(w.to(v.dtype) for w, v in zip(warped.split(chans, 1), volumes, strict=True))
