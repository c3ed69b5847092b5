"""One forward + backward of an op at the GPU benchmark size, bracketed for a profiler.

Run under Nsight Compute with ``--profile-from-start off`` (``scripts/gpu_check.sh profile``):
the op runs once to warm up (module load, Triton compilation, allocator), then once between
``cudaProfilerStart`` and ``cudaProfilerStop``, so the report holds exactly the kernels of one
step. Inputs are random (never zeros: they hide wrong indexing and can run faster than data).

    python3 scripts/gpu_profile.py {lncc,warp,affine_flow_warp,affine_warp_32ch} [--backend B]

``--list`` prints the ops, ``--metrics`` the metrics that the summary reads; ``--summary``
turns ncu's raw CSV of them (``ncu -i REPORT --page raw --csv --metrics ...``) into one line per
kernel.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

from gvsl_fast import ops

SPATIAL = (160, 160, 128)  # the GPU benchmarks' sample (DESIGN §7)
OPS = ("lncc", "warp", "affine_flow_warp", "affine_warp_32ch")
METRICS = {  # ncu metric: its column in the summary
    "gpu__time_duration.sum": "time",
    "dram__bytes.sum": "DRAM bytes",
    "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed": "DRAM of peak",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM of peak",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy",
    "launch__registers_per_thread": "registers",
    # instructions issued (per warp): divided by the voxels, the cost a kernel pays per voxel;
    # with the issue slots' use, whether it is bound by issuing instructions
    "smsp__inst_executed.sum": "warp instructions",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue active",
}


class Case(NamedTuple):
    step: Callable[[str], None]  # forward + backward on the named backend
    what: str
    leaves: tuple[torch.Tensor, ...]  # the inputs that receive gradients


def case(op: str, device: torch.device, spatial: tuple[int, int, int] = SPATIAL) -> Case:
    """The GVSL use of op on random inputs of the given spatial size."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, grad=False):
        t = scale * torch.rand(*shape, generator=g, device=device)
        return t.requires_grad_(grad)

    def theta():
        eye = torch.eye(3, 4, device=device).unsqueeze(0)
        return (eye + 0.05 * (2 * rand(1, 3, 4) - 1)).requires_grad_(True)

    if op == "lncc":  # GVSL: only the warped image needs a gradient
        a, b = rand(1, 1, *spatial, grad=True), rand(1, 1, *spatial)
        fn, what, leaves = (lambda be: ops.lncc(a, b, window=9, backend=be),
                            "lncc window 9, d a", (a,))
    elif op == "warp":  # VoxelMorph/MONAI: the flow needs a gradient, the image is data
        image, flow = rand(1, 1, *spatial), rand(1, 3, *spatial, scale=4.0, grad=True)
        fn, what, leaves = (lambda be: ops.warp(image, flow, backend=be),
                            "warp 1 channel, d flow", (flow,))
    elif op == "affine_flow_warp":  # GVSL's moving image: theta and flow need gradients
        image, flow, th = rand(1, 1, *spatial), rand(1, 3, *spatial, scale=4.0, grad=True), theta()
        fn, what, leaves = (lambda be: ops.affine_flow_warp(image, th, flow, backend=be),
                            "affine_flow_warp 1 channel, d theta and d flow", (th, flow))
    elif op == "affine_warp_32ch":  # GVSL's features: image and theta need gradients
        image, th = rand(1, 32, *spatial, grad=True), theta()
        fn, what, leaves = (lambda be: ops.affine_warp(image, th, backend=be),
                            "affine_warp 32 channels, d image and d theta", (image, th))
    else:
        raise ValueError(f"gpu_profile: unknown op {op!r}")
    return Case(lambda be: fn(be).sum().backward(), what, leaves)


def summary(lines) -> str:
    """One line per kernel of ncu's raw CSV export (a header row, a units row, then a row per
    kernel launch): its name and the METRICS columns, with their units."""
    units, *rows = csv.DictReader(lines)
    out = [" | ".join(["kernel"] + [f"{col} [{units.get(m, '')}]".replace(" []", "")
                                    for m, col in METRICS.items()])]
    for r in rows:
        out.append(" | ".join([r["Kernel Name"][:60]] + [r.get(m, "?") for m in METRICS]))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", nargs="?", choices=OPS)
    parser.add_argument("--backend", default="cuda", choices=["cuda", "triton"])
    parser.add_argument("--list", action="store_true", help="print the ops, one a line")
    parser.add_argument("--metrics", action="store_true", help="print the summary's metrics")
    parser.add_argument("--summary", action="store_true", help="summarize ncu's CSV on stdin")
    args = parser.parse_args()
    if args.list:
        print("\n".join(OPS))
        return
    if args.metrics:
        print(",".join(METRICS))
        return
    if args.summary:
        print(summary(sys.stdin))
        return
    if args.op is None:
        parser.error("name an op, or --list / --metrics / --summary")
    device = torch.device("cuda")
    step, what, leaves = case(args.op, device)
    step(args.backend)  # warm-up, outside the profiled range
    for leaf in leaves:  # no gradient accumulation kernels in the profile
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step(args.backend)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled one step: {what}, {SPATIAL}, backend {args.backend}")


if __name__ == "__main__":
    main()
