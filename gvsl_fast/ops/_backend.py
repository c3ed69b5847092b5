"""Backend choice and input checks shared by every op (DESIGN §2).

``backend="auto"`` takes the CUDA extension for CUDA tensors, else Triton, else the reference;
for CPU tensors the C++ extension, else the reference. A fallback is announced once per op and
reason, never silent. Asking for a backend that cannot run raises an error naming what is missing.
Forward-mode AD and ``torch.func``'s gradient transforms need the reference too
(:func:`autodiff_error`): the kernels have first-order reverse-mode gradients only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.autograd.forward_ad as fwAD
from torch._C import _functorch

F = TypeVar("F", bound=Callable)

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = FAST_DTYPES + (torch.float64,)


def host_cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags as /proc/cpuinfo lists them, or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def cpu_build_error(features: Sequence[str], host: frozenset[str] | None) -> str | None:
    """Why an extension compiled to use CPU `features` cannot run on a CPU with flags `host`
    (None: unknown, so no objection), or None."""
    missing = sorted(set(features) - host) if host is not None else []
    if not missing:
        return None
    return (f"gvsl_fast._C uses CPU features this CPU lacks ({', '.join(missing)}), built "
            "with -march=native on another machine, say; rebuild it on this machine, or build "
            "with GVSL_FAST_PORTABLE=1")


def cuda_arch_error(codes: Sequence[str], capability: tuple[int, int], gpu: str) -> str | None:
    """Why CUDA kernels compiled for `codes` (nvcc's sm_XY binaries and compute_XY PTX) cannot run
    on a GPU of compute `capability`, or None. A binary runs on its major version from its minor
    up (an arch-specific sm_XYa on X.Y only); PTX is compiled at load for any later GPU."""
    for code in codes:
        kind, _, arch = code.partition("_")
        digits = arch.rstrip("abcdefghijklmnopqrstuvwxyz")
        if not digits.isdigit() or len(digits) < 2:
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "compute" and built <= capability:
            return None
        if kind == "sm" and built[0] == capability[0] and (
                built[1] == capability[1] if arch.endswith("a") else built[1] <= capability[1]):
            return None
    major, minor = capability
    return (f"gvsl_fast._C's CUDA kernels were built for {', '.join(codes)}; {gpu} is "
            f"sm_{major}{minor}: rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")


try:  # what setup.py compiled the extension for (absent where it was built by other means)
    from gvsl_fast import _build_info
except ImportError:  # pragma: no cover - depends on the build
    _build_info = None

# Checked before loading: code for CPU features this CPU lacks dies of an illegal instruction.
_C_ERROR: str | None = (cpu_build_error(_build_info.CPU_FEATURES, host_cpu_flags())
                        if _build_info else None)
if _C_ERROR is None:
    try:
        from gvsl_fast import _C  # noqa: F401  (registers torch.ops.gvsl_fast.*)
    except ImportError as exc:  # pragma: no cover - depends on the build
        _C_ERROR = (
            f"the compiled extension gvsl_fast._C is not importable ({exc}); "
            "build it with `pip install --no-build-isolation -e .`"
        )

try:
    import triton  # noqa: F401

    _TRITON_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the install
    _TRITON_ERROR = f"triton is not importable ({exc})"

_announced: set[tuple[str, str]] = set()


def extension_error() -> str | None:
    """Why the C++ extension cannot be used, or None."""
    return _C_ERROR


def build_info() -> types.ModuleType | None:
    """What setup.py compiled gvsl_fast._C for (``CPU_FEATURES``, ``CUDA_CODES``), or None where
    that was not recorded."""
    return _build_info


def cuda_kernels_error(device: torch.device | None = None) -> str | None:
    """Why the CUDA kernels of the extension cannot be used (on CUDA `device`, when given), or
    None."""
    if _C_ERROR:
        return _C_ERROR
    if not torch.ops.gvsl_fast.cuda_built():
        return (
            "gvsl_fast._C was built without CUDA kernels (torch without CUDA, no nvcc, "
            "or GVSL_FAST_CUDA=0 at build time)"
        )
    if device is not None and _build_info and _build_info.CUDA_CODES:
        return _gpu_arch_error(device.index if device.index is not None
                               else torch.cuda.current_device())
    return None


@functools.cache
def _gpu_arch_error(index: int) -> str | None:
    """cuda_arch_error for GPU `index`, asked once per GPU (every op call resolves its backend)."""
    return cuda_arch_error(_build_info.CUDA_CODES, torch.cuda.get_device_capability(index),
                           f"cuda:{index} ({torch.cuda.get_device_name(index)})")


def triton_error(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on `device`, or None."""
    if _TRITON_ERROR:
        return _TRITON_ERROR
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"


def why_not(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run on ``device`` and ``dtype``, or None when it can."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got {device}"
        if dtype not in CPU_DTYPES:
            return f"backend 'cpu' supports {CPU_DTYPES}, got {dtype}"
        return _C_ERROR
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {device}"
        if dtype not in FAST_DTYPES:
            return f"backend 'cuda' supports {FAST_DTYPES}, got {dtype}"
        return cuda_kernels_error(device)
    if backend == "triton":
        if dtype not in FAST_DTYPES:
            return f"backend 'triton' supports {FAST_DTYPES}, got {dtype}"
        return triton_error(device)
    raise AssertionError(backend)


FORWARD_AD = ("forward-mode AD (torch.func.jvp, jacfwd, forward_ad dual tensors) needs the "
              "reference: the kernels have no forward derivative")
FUNC_GRAD = ("torch.func's gradient transforms (grad, vjp, jacrev, hessian) need the reference: "
             "the kernels' autograd does not run under torch.func")


def autodiff_error(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why the kernels cannot differentiate a call on `tensors`, or None. PyTorch would not
    refuse it but get it wrong in silence: a custom op drops forward-mode tangents (a zero
    ``torch.func.jvp``), and under ``torch.func.grad`` its autograd does not run."""
    if torch.compiler.is_compiling():  # traced graphs carry no tangents or torch.func wrappers
        return None
    if fwAD._current_level < 0 and _functorch.peek_interpreter_stack() is None:
        return None  # no dual level and no torch.func transform is active: the usual call
    for t in tensors:
        while True:
            if fwAD.unpack_dual(t).tangent is not None:
                return FORWARD_AD
            if not _functorch.is_functorch_wrapped_tensor(t):
                break
            if _functorch.is_gradtrackingtensor(t):
                return FUNC_GRAD
            t = _functorch.get_unwrapped(t)  # e.g. vmap's batched tensor: look beneath it
    return None


def resolve(op: str, backend: str, tensors: Sequence[torch.Tensor]) -> str:
    """The concrete backend that runs `op` on `tensors` for the requested `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    device, dtype = tensors[0].device, tensors[0].dtype
    autodiff = autodiff_error(tensors) if backend != "reference" else None
    if backend != "auto":
        why = why_not(backend, device, dtype) or autodiff
        if why:
            raise RuntimeError(f"{op}: backend={backend!r} is not available: {why}")
        return backend
    if autodiff:
        return fallback(op, autodiff)
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    reasons = []
    for cand in order:
        why = why_not(cand, device, dtype)
        if why is None:
            return cand
        reasons.append(why)
    return fallback(op, "; ".join(reasons))


def announce(op: str, what: str, stacklevel: int = 3) -> None:
    """Warn ``gvsl_fast.ops.<op>: <what>`` once per (op, what)."""
    if (op, what) not in _announced:
        _announced.add((op, what))
        warnings.warn(f"gvsl_fast.ops.{op}: {what}", RuntimeWarning, stacklevel=stacklevel)


def fallback(op: str, why: str) -> str:
    """``"reference"``, saying once per (op, reason) that backend='auto' falls back to it."""
    announce(op, f"backend='auto' falls back to the PyTorch reference: {why}", stacklevel=5)
    return "reference"


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """``torch.use_deterministic_algorithms(enabled)`` inside, the previous setting (warn_only
    included) afterwards."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def deterministic(op: str, flag: bool | None) -> bool:
    """An op's ``deterministic`` argument: ``None`` follows
    ``torch.are_deterministic_algorithms_enabled()``, as PyTorch's own scatters do."""
    if flag is None:
        return torch.are_deterministic_algorithms_enabled()
    if not isinstance(flag, bool):
        raise TypeError(f"{op}: `deterministic` must be a bool or None, got {flag!r}")
    return flag


def promotes_under_autocast(op: F) -> F:
    """Decorates a public op: under ``torch.autocast`` its floating tensor arguments are cast to
    their widest dtype, as CUDA autocast treats ``F.grid_sample`` (a flow from a bf16 convolution
    warps a float32 image in float32), and the op runs with autocast off, so that the reference
    path's convolutions and matmuls stay in that dtype too. Outside autocast, mixed dtypes
    remain an error (``check_same``)."""

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        if not torch._C._is_any_autocast_enabled():  # the usual call: one C check, ~0.1 us
            return op(*args, **kwargs)
        floats = [t for t in (*args, *kwargs.values())
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
        device = floats[0].device.type if floats else None
        if (device is None or not torch.amp.is_autocast_available(device)
                or not torch.is_autocast_enabled(device)):
            return op(*args, **kwargs)
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in floats))

        def cast(t):
            return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        with torch.autocast(device, enabled=False):
            return op(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


# ---- input checks --------------------------------------------------------------------------


def check_volume(op: str, name: str, t: torch.Tensor, channels: int | None = None) -> None:
    """A (B, C, D, H, W) floating, non-empty tensor (with `channels` channels if given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 5:
        raise ValueError(
            f"{op}: `{name}` must be 5-D (B, C, D, H, W), got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{op}: `{name}` must be a floating tensor, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{op}: `{name}` is empty, shape {tuple(t.shape)}")
    if channels is not None and t.shape[1] != channels:
        raise ValueError(
            f"{op}: `{name}` must have {channels} channels, got shape {tuple(t.shape)}"
        )


def check_same(op: str, **tensors: torch.Tensor) -> None:
    """All tensors on one device with one dtype."""
    items = list(tensors.items())
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{op}: `{n}` is on {t.device} but `{n0}` is on {t0.device}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{op}: `{n}` has dtype {t.dtype} but `{n0}` has {t0.dtype}")


def check_flag(op: str, name: str, value: bool) -> None:
    """A bool: a string in its place is a slip that Python's truthiness would hide
    (``affine_warp(image, theta, "border")`` puts ``padding_mode`` where ``align_corners`` is)."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: `{name}` must be a bool, got {value!r}")


def check_choice(op: str, name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{op}: `{name}` must be one of {tuple(choices)}, got {value!r}")


def layout(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when contiguous or channels_last_3d (kernels take strides), else a
    contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last_3d):
        return t
    return t.contiguous()
