"""Triton: GVSL's appearance transforms in two launches, with no loop over blocks or samples.

Same semantics as ``csrc/cpu/appearance.cpp`` (read its header) and the plain-torch composition
in ``gvsl_fast.data.transforms``. Launch 1 marks each voxel of a shuffled sample with its last
covering block (``atomic_max`` of the block index, so the later block wins whatever the thread
order); launch 2 gathers the shuffled voxel, applies the Bezier lookup table and paints the
boxes, testing the K box slots per voxel in registers. Both are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gvsl_fast.kernels.warp import batch_launches, on_device

BLOCK = 1024


@triton.jit
def _owner_kernel(starts_ptr, shuffle_ptr, owner_ptr, N, P, H, W, V, bh, bw, b0,
                  BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64) + b0  # blocks on axis 0: axes 1 and 2 stop at 65535
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    active = tl.load(shuffle_ptr + b) != 0
    mask = (offs < N * P) & active
    i = offs // P
    j = offs % P
    base = starts_ptr + (b * N + i) * 3
    s0 = tl.load(base, mask=mask, other=0).to(tl.int64)
    s1 = tl.load(base + 1, mask=mask, other=0).to(tl.int64)
    s2 = tl.load(base + 2, mask=mask, other=0).to(tl.int64)
    lin = ((s0 + j // (bh * bw)) * H + s1 + (j // bw) % bh) * W + s2 + j % bw
    tl.atomic_max(owner_ptr + b * V + lin, i.to(tl.int32), mask=mask)


@triton.jit
def _fused_kernel(x_ptr, out_ptr, owner_ptr, starts_ptr, perm_ptr, nonlinear_ptr, lut_ptr,
                  boxes_ptr, noise_offset_ptr, noise_ptr, C, N, P, L, K, H, W, V, bh, bw, b0,
                  BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64) + b0
    v = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = v < V
    d = v // (H * W)
    h = (v // W) % H
    w = v % W
    # local shuffle: source voxel of v
    o = tl.load(owner_ptr + b * V + v, mask=mask, other=-1)
    covered = o >= 0
    oc = tl.where(covered, o, 0).to(tl.int64)
    base = starts_ptr + (b * N + oc) * 3
    cmask = mask & covered
    s0 = tl.load(base, mask=cmask, other=0).to(tl.int64)
    s1 = tl.load(base + 1, mask=cmask, other=0).to(tl.int64)
    s2 = tl.load(base + 2, mask=cmask, other=0).to(tl.int64)
    j = tl.where(covered, ((d - s0) * bh + h - s1) * bw + w - s2, 0)
    pj = tl.load(perm_ptr + b * P + j, mask=cmask, other=0).to(tl.int64)
    src = ((s0 + pj // (bh * bw)) * H + s1 + (pj // bw) % bh) * W + s2 + pj % bw
    src = tl.where(covered, src, v)
    # in-painting: noise index of the last box covering v, or -1
    nidx = tl.full([BLOCK], -1, tl.int64)
    for k in range(K):
        box = boxes_ptr + (b * K + k) * 6
        lo0 = tl.load(box).to(tl.int64)
        lo1 = tl.load(box + 1).to(tl.int64)
        lo2 = tl.load(box + 2).to(tl.int64)
        hi0 = tl.load(box + 3).to(tl.int64)
        hi1 = tl.load(box + 4).to(tl.int64)
        hi2 = tl.load(box + 5).to(tl.int64)
        inside = (d >= lo0) & (d < hi0) & (h >= lo1) & (h < hi1) & (w >= lo2) & (w < hi2)
        local = ((d - lo0) * (hi1 - lo1) + h - lo1) * (hi2 - lo2) + w - lo2
        nidx = tl.where(inside, tl.load(noise_offset_ptr + b * K + k) + local, nidx)
    painted = nidx >= 0
    fill = tl.load(noise_ptr + tl.where(painted, nidx, 0), mask=mask & painted, other=0.0)
    nl = tl.load(nonlinear_ptr + b) != 0
    for c in range(C):
        row = (b * C + c) * V
        val = tl.load(x_ptr + row + src, mask=mask, other=0.0).to(tl.float32)
        t = tl.minimum(tl.maximum(val, 0.0), 1.0) * (L - 1)
        i0 = tl.minimum(t.to(tl.int64), L - 2)
        wt = t - i0.to(tl.float32)
        y0 = tl.load(lut_ptr + b * L + i0, mask=mask & nl, other=0.0)
        y1 = tl.load(lut_ptr + b * L + i0 + 1, mask=mask & nl, other=0.0)
        val = tl.where(nl, y0 + wt * (y1 - y0), val)
        val = tl.where(painted, fill, val)
        tl.store(out_ptr + row + v, val.to(out_ptr.dtype.element_ty), mask=mask)


def appearance(x: torch.Tensor, starts: torch.Tensor, perm: torch.Tensor,
               block: tuple[int, int, int], shuffle: torch.Tensor, lut: torch.Tensor,
               nonlinear: torch.Tensor, boxes: torch.Tensor, noise_offset: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
    """The transformed copy of ``x`` (B, C, D, H, W); arguments as ``gvsl_fast::appearance``."""
    x = x.contiguous()
    B, C, D, H, W = x.shape
    V = D * H * W
    dev = x.device

    def as_(t, dtype):
        return t.to(device=dev, dtype=dtype).contiguous()

    starts, perm = as_(starts, torch.int32), as_(perm, torch.int32)
    shuffle, nonlinear = as_(shuffle, torch.int32), as_(nonlinear, torch.int32)
    lut, boxes = as_(lut, torch.float32), as_(boxes, torch.int32)
    noise_offset, noise = as_(noise_offset, torch.int64), as_(noise, torch.float32)
    N, P, L, K = starts.shape[1], perm.shape[1], lut.shape[1], boxes.shape[1]
    # empty tensors get a valid dummy pointer; no lane reads them (N, K = 0 or masked)
    starts, boxes, noise_offset, noise = (t if t.numel() else torch.zeros(1, dtype=t.dtype,
                                                                          device=dev)
                                          for t in (starts, boxes, noise_offset, noise))
    _, bh, bw = block
    owner = torch.full((B, V), -1, dtype=torch.int32, device=dev)
    out = torch.empty_like(x)
    with on_device(x):
        for b0, nb in batch_launches(B):
            if N > 0:
                _owner_kernel[(triton.cdiv(N * P, BLOCK), nb)](
                    starts, shuffle, owner, N, P, H, W, V, bh, bw, b0, BLOCK=BLOCK)
            _fused_kernel[(triton.cdiv(V, BLOCK), nb)](
                x, out, owner, starts, perm, nonlinear, lut, boxes, noise_offset, noise, C,
                max(N, 1), P, L, K, H, W, V, bh, bw, b0, BLOCK=BLOCK)
    return out
