"""The Triton kernels compile for an H100 (sm_90) with Triton's own compiler and ptxas, no GPU
needed. The interpreter that runs them in CI accepts code the compiler rejects (session 1 met
such an error only on the GPU), so every launch a small run of each op makes under the
interpreter is recorded and compiled in a fresh process without it: the kernel, its constexprs,
and its arguments specialized as Triton's launcher specializes them on a GPU (integers equal to 1
become constants; integers and pointers divisible by 16 carry that hint). On a GPU machine the
other tests compile every kernel for real instead."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from gvsl_fast import ops

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
    reason="runs where the Triton kernels are interpreted (no GPU)")

# Compiles one recorded launch per line of stdin for sm_90; prints how many compiled.
_COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
target = GPUTarget("cuda", 90, 32)
done = 0
for line in sys.stdin:
    spec = json.loads(line)
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    names = fn.arg_names
    sig = {n: spec["sig"].get(n, "constexpr") for n in names}
    const = {(names.index(n),): v for n, v in spec["const"].items()}
    attrs = {(names.index(n),): BaseBackend.parse_attr(a) for n, a in spec["attrs"].items()}
    try:
        triton.compile(ASTSource(fn, sig, const, attrs), target=target)
    except Exception as e:
        sys.exit(f"{spec['module']}.{spec['name']} {spec['const']}: {type(e).__name__}: {e}")
    done += 1
print(done)
"""


def _spec(fn, args, kwargs) -> dict:
    """Kernel name, argument types, constexprs and specialization hints of one launch, as
    Triton's launcher derives them (triton.runtime.jit: native_specialize_impl)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args, strict=False)) | kwargs
    sig, const, attrs = {}, {}, {}
    for name, p in params.items():
        value = bound[name]
        if "constexpr" in str(p.annotation):
            const[name] = value
            continue
        kind, hint = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":  # an integer equal to 1
            const[name] = value
            continue
        sig[name] = kind
        if hint:
            attrs[name] = hint
    return {"module": fn.__module__, "name": fn.__qualname__, "sig": sig, "const": const,
            "attrs": attrs}


def _exercise_samplers() -> None:
    """warp, grid_sample, affine_warp, compose and affine_flow_warp once per option that selects
    a different kernel specialization."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        image = torch.randn(2, 3, 5, 6, 7, dtype=dtype)
        flow = 2 * torch.randn(2, 3, 5, 6, 7, dtype=dtype)
        grid = torch.rand(2, 4, 5, 3, 3, dtype=dtype) * 2.2 - 1.1
        theta = (torch.eye(3, 4) + 0.1 * torch.randn(2, 3, 4)).to(dtype)
        for mode in ("bilinear", "nearest"):
            for padding in ("zeros", "border"):
                for det in (False, True):
                    i = image.clone().requires_grad_()
                    f = flow.clone().requires_grad_(mode == "bilinear")
                    ops.warp(i, f, mode, padding, deterministic=det,
                             backend="triton").float().sum().backward()
                i, g = image.clone().requires_grad_(), grid.clone().requires_grad_()
                ops.grid_sample(i, g, mode, padding, align_corners=mode == "nearest",
                                backend="triton").float().sum().backward()
        for padding in ("zeros", "border"):
            i, t = image.clone().requires_grad_(), theta.clone().requires_grad_()
            ops.affine_warp(i, t, padding_mode=padding,
                            backend="triton").float().sum().backward()
            for det in (False, True):
                t, f = theta.clone().requires_grad_(), flow.clone().requires_grad_()
                ops.compose(t, f, padding_mode=padding, deterministic=det,
                            backend="triton").float().sum().backward()
                for image_grad in (False, True):
                    i = image.clone().requires_grad_(image_grad)
                    t, f = theta.clone().requires_grad_(), flow.clone().requires_grad_()
                    ops.affine_flow_warp(i, t, f, padding_mode=padding, deterministic=det,
                                         backend="triton").float().sum().backward()


def _exercise_others() -> None:
    """lncc and the appearance transforms, likewise."""
    for dtype in (torch.float32, torch.float16):
        a, b = torch.rand(2, 2, 9, 8, 7, dtype=dtype), torch.rand(2, 2, 9, 8, 7, dtype=dtype)
        for preset in ("gvsl", "voxelmorph", "monai"):
            for reduction in ("mean", "none"):
                x, y = a.clone().requires_grad_(), b.clone().requires_grad_(preset == "gvsl")
                ops.lncc(x, y, window=5, preset=preset, reduction=reduction,
                         backend="triton").float().sum().backward()
    from gvsl_fast.data import transforms

    x = torch.rand(2, 1, 9, 10, 11)
    p = transforms.AppearanceTransform().params(x, torch.Generator().manual_seed(0))
    p["shuffle"] = torch.tensor([True, True])  # the local-shuffle kernel runs too
    transforms.appearance(x, p, "triton")


def test_triton_kernels_compile_for_sm90(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    specs: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = _spec(self.fn, args, kwargs)
        specs[json.dumps(spec, sort_keys=True)] = spec
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    _exercise_samplers()
    _exercise_others()
    from gvsl_fast.kernels import compose, warp

    for module in (compose, warp):  # the int64-offset variants, taken from 2^31 elements on
        monkeypatch.setattr(module, "wide_indices", lambda *tensors: True)
    _exercise_samplers()
    kernels = {(s["module"], s["name"]) for s in specs.values()}
    assert len(kernels) >= 10, kernels  # samplers, compose, lncc and appearance all recorded
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE], input="\n".join(specs),
                            capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    assert int(result.stdout.split()[-1]) == len(specs)
