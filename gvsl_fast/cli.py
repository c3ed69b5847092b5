"""The ``gvsl-fast`` command: pretrain, preprocess, export, info.

Runs as the console script or as ``python -m gvsl_fast.cli`` (which is what ``torchrun`` takes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

from gvsl_fast import __version__


def bounded(kind: type, low: float, strict: bool = False):
    """An argparse type: a finite `kind` value >= `low` (> with `strict`), so that a bad value
    is refused, naming its option, before anything runs."""

    def parse(text: str):
        value = kind(text)  # a ValueError reads "invalid int value: 'x'"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, "
                                             f"got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _triple(values: list[int]) -> tuple[int, int, int]:
    """--patch's one size (a cube) or three (D H W)."""
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) == 3:
        return tuple(values)
    raise ValueError(f"--patch: give one size or three (D H W), got {len(values)}")


def add_pretrain(sub) -> None:
    from gvsl_fast.train.config import PRESETS

    p = sub.add_parser(
        "pretrain", help="GVSL pre-training (embedded MNI152 cohort unless --data is given)",
        description="Pre-train a 3D U-Net with GVSL. With no --data, trains on the embedded "
        "cohort made from the MNI152 templates in the nilearn wheel. Presets: 'paper' (GPU "
        "default: 128^3 patches at 1 mm, 200k steps) and 'cpu-short' (CPU default: 48^3 at 2 mm, "
        "120 steps, 5-12 minutes on 2 cores; with --amp, bf16 where oneDNN has bf16 kernels "
        "(AVX-512 or AMX), else fp32).",
    )
    p.add_argument("--data", help="folder of .nii/.nii.gz images, or of preprocessed .npy")
    p.add_argument("--out", type=Path, default=Path("runs/gvsl"), help="run folder")
    p.add_argument("--cache", help="preprocessed-data cache (default $GVSL_FAST_CACHE or "
                   "~/.cache/gvsl-fast)")
    p.add_argument("--preset", choices=tuple(PRESETS), help="defaults for the options below")
    p.add_argument("--steps", type=bounded(int, 0), help="optimizer steps")
    p.add_argument("--batch-size", type=bounded(int, 1), default=2)
    p.add_argument("--patch", type=bounded(int, 1), nargs="+",
                   help="patch size: one value or D H W")
    p.add_argument("--spacing", type=bounded(float, 0, strict=True),
                   help="isotropic voxel size (mm) to resample to")
    p.add_argument("--intensity", choices=("ct", "mr"), default="mr",
                   help="normalization of --data images")
    p.add_argument("--lr", type=bounded(float, 0, strict=True), default=1e-4)
    p.add_argument("--seed", type=bounded(int, 0), default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 where supported; elsewhere fp16 with a "
                   "GradScaler on GPUs, fp32 on CPUs")
    p.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto")
    p.add_argument("--workers", type=bounded(int, 0), default=2, help="loader worker threads")
    p.add_argument("--ops-backend", default="auto",
                   choices=("auto", "cuda", "triton", "cpu", "reference"))
    p.add_argument("--fusion", choices=("paper", "code"), default="paper",
                   help="affine+deformable order: paper (Eq. 9, one resampling) or the "
                   "original code's two resamplings")
    p.add_argument("--weights", type=bounded(float, 0), nargs=3, default=(1.0, 1.0, 1.0),
                   metavar=("NCC", "SMOOTH", "MSE"))
    p.add_argument("--save-every", type=bounded(int, 1),
                   help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep-last", type=bounded(int, 1), default=3, help="checkpoints to keep")
    p.add_argument("--resume", help="checkpoint path, or 'auto' for the newest in --out")
    p.add_argument("--init-backbone", metavar="PATH",
                   help="start the U-Net from these weights: a `gvsl-fast export` file or a "
                   "checkpoint of the original GVSL code (its released GVSL_epoch_1000.pth)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing of the U-Net blocks")
    p.add_argument("--optimizer", choices=("adam", "apex-fused-adam"), default="adam")
    p.add_argument("--deterministic", action="store_true",
                   help="bit-reproducible GPU runs (torch.use_deterministic_algorithms: "
                        "fixed-point scatters, deterministic cuDNN and U-Net layers; slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from gvsl_fast.train.config import TrainConfig
    from gvsl_fast.train.host_memory import keep_freed_memory
    from gvsl_fast.train.loop import choose_device, pretrain

    # this process is the run: on the CPU, spare each step the page faults of fresh activations
    if choose_device(args.device, int(os.environ.get("LOCAL_RANK", "0"))).type == "cpu":
        note = keep_freed_memory()
        if os.environ.get("RANK", "0") == "0":
            print(f"gvsl-fast: CPU training: {note}", file=sys.stderr)
    cfg = TrainConfig(
        data=args.data, out=args.out, cache=args.cache, preset=args.preset, steps=args.steps,
        batch_size=args.batch_size, patch=_triple(args.patch) if args.patch else None,
        spacing=args.spacing, intensity=args.intensity, lr=args.lr, seed=args.seed,
        device=args.device, amp=args.amp, loader=args.loader, workers=args.workers,
        ops_backend=args.ops_backend, fusion=args.fusion, weights=tuple(args.weights),
        save_every=args.save_every, keep_last=args.keep_last, resume=args.resume,
        init_backbone=args.init_backbone,
        compile=args.compile, grad_checkpoint=args.grad_checkpoint, optimizer=args.optimizer,
        deterministic=args.deterministic, progress=not args.no_progress,
    )
    result = pretrain(cfg)
    if result.get("step") is not None:
        print(json.dumps(result))
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export",
                       help="write the backbone UNet3D of a checkpoint for downstream use")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("output", type=Path,
                   help="OUT.pt (with --layout gvsl-fast its configuration goes to OUT.pt.json)")
    p.add_argument("--layout", choices=("gvsl-fast", "official"), default="gvsl-fast",
                   help="gvsl-fast: the backbone for UNet3D.from_pretrained; official: the whole "
                        "model as the original GVSL code's state dict, loadable wherever its "
                        "released GVSL_epoch_1000.pth is (e.g. its UNet3D_GVSL)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    import torch

    from gvsl_fast.models import GVSL, UNet3D, official
    from gvsl_fast.train import checkpoint

    state = checkpoint.load(args.checkpoint)
    out = args.output
    if out.is_dir():
        raise ValueError(f"OUT {out} is a folder; give the file to write, e.g. {out / 'unet.pt'}")
    if out.exists() and (out.resolve() == args.checkpoint.resolve()
                         or checkpoint.is_checkpoint(out)):
        raise ValueError(f"OUT {out} is a training checkpoint; export writes a new file and "
                         "never replaces one")
    cfg = state.get("backbone_config")
    if cfg is None:
        raise checkpoint.CheckpointError(f"checkpoint {args.checkpoint} holds no backbone")
    backbone = UNet3D(cfg["in_channels"], tuple(cfg["down"]), tuple(cfg["up"]))
    weights = checkpoint.plain_keys(state["model"])
    if args.layout == "official":
        checkpoint.check_model_state(args.checkpoint, GVSL(backbone), weights)
        official_state = official.model_to_official(weights)
        checkpoint.write_atomic(args.output, lambda f: torch.save(official_state, f))
        print(f"wrote {args.output} in the original GVSL code's layout (step {state['step']})")
        return 0
    prefix = "backbone."
    weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    checkpoint.check_model_state(args.checkpoint, backbone, weights)
    backbone.load_state_dict(weights)
    backbone.save_pretrained(args.output)
    print(f"wrote {args.output} and {args.output}.json (step {state['step']})")
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and which op backends are available")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    import torch

    from gvsl_fast.ops import _backend

    print(f"gvsl-fast {__version__}, python {platform.python_version()}, torch {torch.__version__}")
    for name in ("triton", "numpy", "nibabel", "nilearn", "nvidia.dali", "monai", "apex"):
        try:
            mod = __import__(name, fromlist=["__version__"])
            print(f"  {name}: {getattr(mod, '__version__', 'installed')}")
        except Exception as exc:  # report, never fail: this command diagnoses installs
            print(f"  {name}: not available ({type(exc).__name__}: {exc})")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"devices: cpu ({torch.get_num_threads()} threads)" + "".join(f", {g}" for g in gpus))
    checks = {
        "cpu": _backend.extension_error(),
        "cuda": (_backend.cuda_kernels_error(torch.device("cuda", 0) if gpus else None)
                 or (None if gpus else "no CUDA device")),
        "triton": _backend.triton_error(torch.device("cuda" if gpus else "cpu")),
        "reference": None,
    }
    built = _backend.build_info()
    if built is not None:
        print(f"gvsl_fast._C compiled for: CPU features {' '.join(built.CPU_FEATURES) or '(base)'}"
              f"; CUDA {' '.join(built.CUDA_CODES) or '(none)'}")
    print("op backends:")
    for name, why in checks.items():
        print(f"  {name}: {'available' if why is None else 'unavailable: ' + why}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvsl-fast", description="GVSL pre-training of 3D U-Nets, and its tools.")
    parser.add_argument("--version", action="version", version=f"gvsl-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_pretrain(sub)
    from gvsl_fast.data.preprocess import add_parser as add_preprocess

    add_preprocess(sub)
    add_export(sub)
    add_info(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RuntimeError, ValueError, OSError, FloatingPointError) as exc:
        # one clear line for bad input, a file or folder the OS refuses, or a diverged run;
        # tracebacks stay for real bugs (other exception types)
        print(f"gvsl-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(f"gvsl-fast {args.command}: interrupted" + _resume_hint(args), file=sys.stderr)
        return 130


def _resume_hint(args: argparse.Namespace) -> str:
    """After an interrupted pretrain: where its last checkpoint is, and how to continue."""
    if args.command != "pretrain":
        return ""
    from gvsl_fast.train import checkpoint

    found = checkpoint.list_checkpoints(args.out)
    if not found:
        return f"; no checkpoint in {args.out} yet"
    return (f"; the last checkpoint is {found[-1]}: add --resume auto to the same command to "
            "continue from it")


if __name__ == "__main__":
    sys.exit(main())
