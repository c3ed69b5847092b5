"""The GVSL pre-training loop (DESIGN §5): fast step, AMP, checkpoints, DDP, logs."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from gvsl_fast.data import make_loader, prepare_dataset
from gvsl_fast.data.loader import TorchPairLoader
from gvsl_fast.data.transforms import AppearanceTransform, SpatialTransform
from gvsl_fast.models import GVSL, UNet3D
from gvsl_fast.ops._backend import deterministic_algorithms
from gvsl_fast.train import checkpoint, distributed, host_memory
from gvsl_fast.train.config import TrainConfig
from gvsl_fast.train.logs import LOSSES, History, plot_losses, plot_preview, tensorboard_error

# The fixed evaluation pair: a batch of the loader's stream (a pure function of the step index)
# that training never reaches, scored without augmentation at the start and at every save.
EVAL_STEP = 2**40
# set (to anything but "" or "0") to start a CPU run that the memory check would refuse
NO_MEMORY_CHECK = "GVSL_FAST_NO_MEMORY_CHECK"


def default_cache() -> Path:
    """Where preprocessed data is cached: $GVSL_FAST_CACHE, else ~/.cache/gvsl-fast."""
    return Path(os.environ.get("GVSL_FAST_CACHE", Path.home() / ".cache" / "gvsl-fast"))


def choose_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:  # torch's message lists every device type but not the option
        raise ValueError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: no CUDA device is available")
    return device


def use_device(device: torch.device, dist: distributed.DistInfo) -> None:
    """Makes a single process's ``--device cuda:N`` the current device, as distributed.setup
    does a DDP rank's: kernels launch and ``"cuda"`` allocations go to the current device, which
    would otherwise stay cuda:0."""
    if device.type == "cuda" and device.index is not None and not dist.enabled:
        torch.cuda.set_device(device)


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN runs bf16 on this CPU (what routes bf16 convolutions to it)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amp_dtype(device: torch.device) -> tuple[torch.dtype | None, str | None]:
    """The autocast dtype of ``--amp`` on ``device``, and why AMP is off where it is.

    bf16 on GPUs that support it (Ampere and newer), else fp16 with a GradScaler. On a CPU,
    bf16 where oneDNN has bf16 kernels (AVX-512 or AMX); elsewhere PyTorch's bf16 convolutions
    fall back to a generic GEMM about 10x slower than fp32, so ``--amp`` trains in fp32 there.
    """
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), None
    if device.type == "cpu" and not cpu_has_bf16_kernels():
        isa = torch.backends.cpu.get_cpu_capability()
        return None, (f"this CPU ({isa}) has no bf16 kernels in oneDNN, and bf16 convolutions "
                      "without them run about 10x slower than fp32")
    return torch.bfloat16, None


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The transforms' random stream of one step: a pure function of (seed, rank, step), so a
    resumed run draws exactly what the uninterrupted run drew."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "apex-fused-adam":
        try:
            from apex.optimizers import FusedAdam
        except ImportError as exc:
            raise RuntimeError(
                f"--optimizer apex-fused-adam: apex is not importable ({exc}); "
                "use --optimizer adam (torch's fused Adam on CUDA)"
            ) from exc
        return FusedAdam(params, lr=cfg.lr)
    if cfg.optimizer != "adam":
        raise ValueError(f"--optimizer must be 'adam' or 'apex-fused-adam', got {cfg.optimizer!r}")
    return torch.optim.Adam(params, lr=cfg.lr, fused=device.type == "cuda")


def build_backbone(cfg: TrainConfig) -> UNet3D:
    """A fresh U-Net, or with ``cfg.init_backbone`` the one in that file (a ``gvsl-fast export``
    or a checkpoint of the original GVSL code, such as its released weights)."""
    if cfg.init_backbone is None:
        return UNet3D(grad_checkpoint=cfg.grad_checkpoint)
    try:
        return UNet3D.from_pretrained(cfg.init_backbone, grad_checkpoint=cfg.grad_checkpoint)
    except Exception as exc:  # whatever the file's fault, one line naming the option
        raise ValueError(f"--init-backbone {cfg.init_backbone}: {exc}") from exc


def build_model(cfg: TrainConfig, device: torch.device) -> GVSL:
    model = GVSL(build_backbone(cfg), fusion=cfg.fusion, ops_backend=cfg.ops_backend,
                 weights=cfg.weights).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


class Trainer:
    """Owns the model, optimizer, scaler, loader and transforms of one run."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.device = choose_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = distributed.setup(self.device.type)
        use_device(self.device, self.dist)
        self.cfg = cfg = cfg.resolved(self.device.type)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build_model(cfg, self.device)
        if cfg.compile:
            # in place (nn.Module.compile): the module tree and its state_dict keys stay those
            # of the plain U-Net, so checkpoints of compiled and eager runs are interchangeable
            # (torch.compile's wrapper would insert `_orig_mod.` into every backbone key)
            self.model.backbone.compile()
        self.forward = DistributedDataParallel(self.model) if self.dist.enabled else self.model
        self.optimizer = make_optimizer(self.model.parameters(), cfg, self.device)
        self.amp_dtype, amp_off = amp_dtype(self.device) if cfg.amp else (None, None)
        if amp_off is not None and self.dist.is_main:
            print(f"gvsl-fast: --amp off: {amp_off}; training in float32", file=sys.stderr)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16)
        self.appearance = AppearanceTransform()
        self.spatial = SpatialTransform()
        self.step = 0
        self.loader = None
        self.last = None

    # -- data ---------------------------------------------------------------------------------
    def open_data(self) -> None:
        cfg = self.cfg
        cache = Path(cfg.cache) if cfg.cache else default_cache()
        data_dir = prepare_dataset(cfg.data, cache, spacing=(cfg.spacing,) * 3,
                                   intensity=cfg.intensity, seed=cfg.seed, progress=cfg.progress)
        self.loader = make_loader(data_dir, patch=cfg.patch, batch_size=cfg.batch_size,
                                  seed=cfg.seed, kind=cfg.loader, device=self.device,
                                  rank=self.dist.rank, world_size=self.dist.world_size,
                                  workers=cfg.workers)
        if self.dist.is_main:
            print(f"gvsl-fast: data {data_dir} via the {self.loader.kind} loader "
                  f"({self.loader.reason})", file=sys.stderr)

    # -- one step -----------------------------------------------------------------------------
    def prepare_batch(self, a: torch.Tensor, b: torch.Tensor, step: int):
        """Appearance transform of A, then the same spatial augmentation of A, A_t and B."""
        g = step_generator(self.cfg.seed, self.dist.rank, step, self.device)
        a, b = a.to(self.device, non_blocking=True), b.to(self.device, non_blocking=True)
        a_t = self.appearance(a, generator=g)
        a, a_t, b = self.spatial(a, a_t, b, generator=g)
        if self.cfg.channels_last:
            a, a_t, b = (x.contiguous(memory_format=torch.channels_last_3d) for x in (a, a_t, b))
        return a, a_t, b

    def autocast(self) -> torch.autocast:
        """The step's autocast: ``--amp``'s dtype, or off."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def train_step(self, a: torch.Tensor, a_t: torch.Tensor, b: torch.Tensor):
        """Forward, backward and optimizer update; returns the model output."""
        with self.autocast():
            out = self.forward(a, a_t, b)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Losses of the model on the fixed evaluation pair (clean A as A_t, no augmentation).
        Eager under --compile: one batch per save does not pay for compiling a second (no-grad)
        graph of the U-Net (on 2 CPU cores about 30 s more than the training graph's compile)."""
        a, b = (x.to(self.device) for x in self.loader.batch(EVAL_STEP))
        with _eager(), self.autocast():
            out = self.model(a, a, b)
        return {k: getattr(out, k).item() for k in LOSSES}

    # -- memory -------------------------------------------------------------------------------
    def step_memory(self) -> dict[str, int]:
        """Bytes one training step needs beyond what is allocated now, by part: ``"step"``, the
        peak of its tensors, counted by running the model's forward and backward on fake tensors
        of the configured batch (``FakeTensorMode``: shapes only, nothing allocated, about a
        second; eager under ``--compile``); ``"adam"``, the optimizer's two moments;
        ``"loader"``, the batches the loader keeps ready."""
        cfg = self.cfg
        shape = (cfg.batch_size, 1, *cfg.patch)
        layout = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format
        # real buffers and the ops' real constants are taken as they are (allow_non_fake_inputs)
        with _eager(), FakeTensorMode(allow_non_fake_inputs=True) as fake:
            params = {k: fake.from_tensor(p).requires_grad_(p.requires_grad)
                      for k, p in self.model.named_parameters()}
            with host_memory.TensorBytes() as counted:
                batch = tuple(torch.empty(shape).contiguous(memory_format=layout)
                              for _ in range(3))
                with self.autocast():
                    out = functional_call(self.model, params, batch)
                torch.autograd.grad(out.loss, [p for p in params.values() if p.requires_grad])
        trained = (p for p in self.model.parameters() if p.requires_grad)
        # the loader is not opened yet (that prepares data): its rule, from the configuration
        return {"step": counted.peak,
                "adam": 2 * sum(p.numel() * p.element_size() for p in trained),
                "loader": TorchPairLoader.held_bytes(cfg.workers, cfg.batch_size, cfg.patch)}

    def check_host_memory(self) -> None:
        """On the CPU, refuse a run whose step does not fit in the memory available, before any
        data is prepared or anything is written: the kernel would kill it at its first step,
        with no message; a run that fits says in one line what it needs. Every process on this
        machine (torchrun's LOCAL_WORLD_SIZE) needs its own. The estimate is a lower bound (see
        :meth:`step_memory`); on a GPU, PyTorch raises its own out-of-memory error at the first
        step.

        Raises:
            RuntimeError: naming --patch and --batch-size, with the bytes needed and available.
        """
        if self.device.type != "cpu" or os.environ.get(NO_MEMORY_CHECK, "") not in ("", "0"):
            return
        available = host_memory.available_bytes()
        if available is None:
            return
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        need = sum(self.step_memory().values()) * processes
        each = f" ({processes} processes on this machine)" if processes > 1 else ""
        cfg = self.cfg
        if need > available:
            also = "" if cfg.grad_checkpoint else ", or add --grad-checkpoint"
            raise RuntimeError(
                f"--patch {' '.join(map(str, cfg.patch))} with --batch-size {cfg.batch_size}: "
                f"training needs at least {_size(need)} of memory{each}, and {_size(available)} "
                f"is available. Choose a smaller --patch or --batch-size{also}; "
                f"{NO_MEMORY_CHECK}=1 starts it anyway")
        if self.dist.is_main:
            print(f"gvsl-fast: memory: training needs at least {_size(need)}{each}; "
                  f"{_size(available)} is available", file=sys.stderr)

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "backbone_config": self.model.backbone.config,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loader": self.loader.state_dict() if self.loader is not None else None,
            "config": self.cfg.to_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def check_resume(self, path: Path, state: dict) -> None:
        """Refuse to resume a checkpoint under options that define another run, naming the
        option."""
        cfg, saved = self.cfg, state.get("config", {})
        for key in RUN_OPTIONS:
            if key in saved and _same(saved[key]) != _same(getattr(cfg, key)):
                flag = "--" + key.replace("_", "-")
                raise ValueError(
                    f"--resume {path}: its run used {flag} {_shown(saved[key])}, this command "
                    f"gives {flag} {_shown(getattr(cfg, key))}; resume with the run's options, "
                    "or start a new run in another --out")

    def load_state(self, path: Path, state: dict) -> None:
        """Continue from ``state``, a checkpoint read from ``path``."""
        weights = checkpoint.plain_keys(state["model"])
        checkpoint.check_model_state(path, self.model, weights)
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if state.get("loader") is not None and self.loader is not None:
            self.loader.load_state_dict(state["loader"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.step = int(state["step"])

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        path = checkpoint.checkpoint_path(self.cfg.out, self.step)
        return checkpoint.save(self.state(), path, keep_last=self.cfg.keep_last)


    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train from the current (or resumed) step to ``cfg.steps``."""
        cfg, is_main = self.cfg, self.dist.is_main
        self.check_host_memory()
        # the checkpoint is read and checked before any data is prepared or anything written
        path = state = resumed = None
        if cfg.resume is not None:
            path = checkpoint.resolve_resume(cfg.resume, cfg.out)
            if path is None:
                if is_main:
                    print(f"gvsl-fast: --resume auto: no checkpoint in {cfg.out} yet, starting "
                          "at step 0", file=sys.stderr)
            else:
                state = checkpoint.load(path, map_location=self.device)
                self.check_resume(path, state)
                resumed = (path, int(state["step"]))
        _check_out_dir(cfg, resumed)
        made = False
        if is_main:
            made = not cfg.out.exists()
            cfg.out.mkdir(parents=True, exist_ok=True)  # now: an unwritable --out fails early
        try:
            self.open_data()
        except BaseException:
            if is_main and made and not any(cfg.out.iterdir()):
                cfg.out.rmdir()  # a run that never started leaves no empty folder behind
            raise
        if state is not None:
            self.load_state(path, state)
            if is_main:
                print(f"gvsl-fast: resumed from {path} at step {self.step}"
                      + ("" if self.step < cfg.steps else
                         f"; --steps {cfg.steps} is reached, nothing to train"), file=sys.stderr)
        history = evaluation = None
        if is_main:
            tb_error = tensorboard_error()
            if tb_error is not None:
                print(f"gvsl-fast: TensorBoard logging off ({tb_error}); the losses go to "
                      "history.csv and eval.csv only", file=sys.stderr)
            history = History(cfg.out, self.step, tensorboard=tb_error is None)
            evaluation = History(cfg.out, self.step, "eval", tensorboard=tb_error is None)
        if is_main and self.step == 0:
            evaluation.append({"step": 0, **self.evaluate()})
        bar = _progress(cfg, self.step) if is_main else None
        out = batch = rate = None
        batches = iter(self.loader)  # prefetches from the loader's position (self.step)
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                a, b = next(batches)
                batch = self.prepare_batch(a, b, self.step)
                out = self.train_step(*batch)
                self.step += 1
                losses = {k: getattr(out, k).item() for k in LOSSES}
                if not all(math.isfinite(v) for v in losses.values()):
                    raise FloatingPointError(f"non-finite loss at step {self.step}: {losses}; "
                                             "a lower --lr may help")
                dt = time.perf_counter() - t0
                pairs = cfg.batch_size * self.dist.world_size / dt
                rate = pairs if rate is None else 0.9 * rate + 0.1 * pairs
                if is_main:
                    history.append({"step": self.step, **losses, "pairs_per_s": round(pairs, 3),
                                    "seconds": round(dt, 4)})
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses['loss']:.4f}", ncc=f"{losses['ncc']:.4f}",
                                    pairs_s=f"{rate:.2f}")
                    if self.step % cfg.log_every == 0:
                        bar.write(f"step {self.step}/{cfg.steps}  " + "  ".join(
                            f"{k} {v:.4f}" for k, v in losses.items()) + f"  pairs/s {rate:.2f}",
                            file=sys.stderr)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                    if is_main:
                        evaluation.append({"step": self.step, **self.evaluate()})
                        _pictures(cfg.out, history, evaluation, batch, out)
        finally:
            if bar is not None:
                bar.close()
            for h in (history, evaluation):
                if h is not None:
                    h.close()
            distributed.cleanup()
        self.last = (batch, out)
        result = {"step": self.step, "out": str(cfg.out), "preset": cfg.preset,
                  "device": str(self.device), "loader": self.loader.kind}
        if out is not None:
            result.update({k: getattr(out, k).item() for k in LOSSES})
        return result


def _size(n: float) -> str:
    """Bytes in binary units: '9.4 TiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    unit = 0
    while n >= 1024 and unit < len(units) - 1:
        n, unit = n / 1024, unit + 1
    return f"{n:.1f} {units[unit]}"


def _eager():
    """A context in which compiled modules run eagerly (torch >= 2.6; nothing before)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


# Options that define a run: resuming under other values would silently train another run
# (the optimizer keeps its learning rate; the checkpoint would record the new one).
RUN_OPTIONS = ("data", "spacing", "intensity", "lr", "seed", "batch_size", "patch", "fusion",
               "weights", "optimizer")


def _same(value):
    """A config value as compared on resume: lists and tuples alike."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _check_out_dir(cfg: TrainConfig, resumed: tuple[Path, int] | None) -> None:
    """Refuse an --out that is a file, or that holds checkpoints after the step the run starts
    from (``resumed``: the checkpoint and its step; None for a fresh run): keep-last would prune
    them, and the run's history.csv would be cut."""
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ValueError(f"--out {cfg.out} is a file; the run needs a folder")
    start = resumed[1] if resumed else -1  # a fresh run: any checkpoint
    later = [p for p in checkpoint.list_checkpoints(cfg.out) if checkpoint.step_of(p) > start]
    if not later:
        return
    if resumed is None:
        raise RuntimeError(
            f"--out {cfg.out} already holds checkpoints of a run; pass --resume auto to continue "
            "it or choose another --out"
        )
    raise RuntimeError(
        f"--out {cfg.out} holds checkpoints after step {start} ({later[-1].name}): resuming "
        f"{resumed[0]} there would prune them and cut its history; move them away or choose "
        "another --out")


def pretrain(cfg: TrainConfig) -> dict:
    """Run GVSL pre-training as configured; returns the last losses and where they were written."""
    with determinism(cfg.deterministic):
        return Trainer(cfg).fit()


@contextlib.contextmanager
def determinism(enabled: bool):
    """With ``enabled``, ``torch.use_deterministic_algorithms(True)`` for the run (and the cuBLAS
    workspace setting it requires on the GPU); the previous setting afterwards. Under it the
    gvsl_fast scatters take fixed-point atomics, cuDNN deterministic algorithms and the U-Net its
    atomic-free pooling and upsampling; an op with no deterministic form raises."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with deterministic_algorithms(True):
        yield


def _pictures(out_dir: Path, history: History, evaluation: History, batch, out) -> None:
    plot_losses(history, evaluation, out_dir / "loss_curves.png")
    if batch is not None and out is not None:
        a, _, b = batch
        plot_preview(b, a, out.warped, out.restored, out_dir / "registration_preview.png")


def _progress(cfg: TrainConfig, start: int):
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="gvsl-fast pretrain", unit="step",
                disable=not cfg.progress, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
