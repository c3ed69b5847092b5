"""Autodiff beyond first-order reverse mode, for every op: double backward (create_graph=True),
forward-mode AD, torch.func's gradient transforms and vmap. The kernels compute first-order
gradients only; these calls must still be right (through the reference, said once), never
silently zero or missing as PyTorch leaves them for a custom op."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from common import OPS, backend_ids, fast_backends, op_call, op_inputs, rel_err

from gvsl_fast import ops
from gvsl_fast.ops import _backend

BACKENDS = fast_backends()
IDS = backend_ids(BACKENDS)
# (op, whether its image requires grad): with a data image the CPU takes the saved-derivative
# forwards of warp, grid_sample and affine_flow_warp, whose backward is registered separately.
CASES = [(n, g) for n in OPS for g in ((False, True) if n not in ("compose", "lncc") else (True,))]
CASE_IDS = [f"{n}-image_grad" if g and n not in ("compose", "lncc") else n for n, g in CASES]


def _wanted(inputs):
    return [t for t in inputs if t.requires_grad]


@pytest.mark.parametrize(("name", "image_grad"), CASES, ids=CASE_IDS)
def test_gradgradcheck_cpu_float64(name, image_grad):
    inputs = op_inputs(name, "cpu", torch.float64, image_grad)
    fn = op_call(name, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the once-per-op announcement
        assert torch.autograd.gradgradcheck(fn, tuple(inputs))


def _hessian_vector(name, backend, device, dtype, image_grad):
    """First-order gradients taken with create_graph=True, and the gradient of their dot product
    with a fixed random vector (a Hessian-vector product)."""
    inputs = op_inputs(name, device, dtype, image_grad)
    out = op_call(name, backend)(*inputs)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, _wanted(inputs), go.to(device, out.dtype),
                                create_graph=True)
    assert all(g.requires_grad for g in grads), "the gradients carry no graph"
    gen = torch.Generator().manual_seed(2)
    dot = sum((g * torch.randn(g.shape, generator=gen, dtype=torch.float64).to(device, g.dtype))
              .sum() for g in grads)
    return grads, torch.autograd.grad(dot, _wanted(inputs), allow_unused=True)


@pytest.mark.parametrize(("name", "image_grad"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("device", "backend"), BACKENDS, ids=IDS)
def test_double_backward_matches_reference(device, backend, name, image_grad):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        grads, hvp = _hessian_vector(name, backend, device, torch.float32, image_grad)
        ref_grads, ref_hvp = _hessian_vector(name, "reference", device, torch.float32,
                                             image_grad)
    for out, ref in zip((*grads, *hvp), (*ref_grads, *ref_hvp), strict=True):
        if ref is None:  # the second derivative of a linear map (the image) is zero
            assert out is None or not out.any()
        else:
            assert out is not None and rel_err(out, ref) <= 1e-5, rel_err(out, ref)


def test_double_backward_is_announced_once_per_op(monkeypatch):
    monkeypatch.setattr(_backend, "_announced", set())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            _hessian_vector("warp", "cpu", "cpu", torch.float64, False)
            _hessian_vector("lncc", "cpu", "cpu", torch.float64, True)
    said = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 2, said
    assert said[0].startswith("gvsl_fast.ops.warp: double backward (create_graph=True)")
    assert said[1].startswith("gvsl_fast.ops.lncc: double backward")


@pytest.mark.parametrize("name", ["warp", "grid_sample"])
@pytest.mark.parametrize(("device", "backend"), [*BACKENDS, ("cpu", "reference")],
                         ids=[*IDS, "reference"])
def test_nearest_positions_get_a_zero_gradient_to_any_order(device, backend, name):
    """Nearest mode is piecewise constant: as with F.grid_sample, the output stays on the
    positions' graph with a zero gradient, for .backward() and for create_graph=True (a label map
    warped by a trained flow), on every backend, the reference included."""
    image, pos = op_inputs(name, device, torch.float32, False)
    x = {"warp": ops.warp, "grid_sample": ops.grid_sample}[name]
    out = x(image, pos, mode="nearest", backend=backend)
    assert out.requires_grad
    out.sum().backward()
    assert pos.grad is not None and not pos.grad.any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first, = torch.autograd.grad(x(image, pos, mode="nearest", backend=backend).sum()
                                     + pos.square().sum(), pos, create_graph=True)
    second, = torch.autograd.grad(first.sum(), pos)
    torch.testing.assert_close(first, 2 * pos.detach(), rtol=0, atol=0)
    torch.testing.assert_close(second, torch.full_like(pos, 2.0), rtol=0, atol=0)


def _tangents(inputs, seed=3):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
                 for t in inputs)


@pytest.mark.parametrize("name", OPS)
def test_forward_mode_ad_gives_the_reference_tangent(name):
    inputs = tuple(t.detach() for t in op_inputs(name, "cpu", torch.float64, True))
    tangents = _tangents(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, tangent = torch.func.jvp(op_call(name, "auto"), inputs, tangents)
        with fwAD.dual_level():
            dual = fwAD.unpack_dual(op_call(name, "auto")(
                *(fwAD.make_dual(p, t) for p, t in zip(inputs, tangents, strict=True))))
    ref_out, ref_tangent = torch.func.jvp(op_call(name, "reference"), inputs, tangents)
    assert ref_tangent.abs().max() > 0
    for got in (tangent, dual.tangent):
        assert got is not None and rel_err(got, ref_tangent) <= 1e-12
    assert rel_err(out, ref_out) <= 1e-12 and rel_err(dual.primal, ref_out) <= 1e-12


def test_forward_mode_ad_with_a_kernel_backend_is_an_error():
    inputs = tuple(t.detach() for t in op_inputs("warp", "cpu", torch.float64, True))
    with pytest.raises(RuntimeError, match=r"warp: backend='cpu' is not available: "
                                           r"forward-mode AD"):
        torch.func.jvp(op_call("warp", "cpu"), inputs, _tangents(inputs))


@pytest.mark.parametrize("name", OPS)
def test_func_grad_matches_autograd(name):
    inputs = op_inputs(name, "cpu", torch.float64, True)
    fn = op_call(name, "cpu")
    expected = torch.autograd.grad(fn(*inputs).sum(), inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = torch.func.grad(lambda *x: op_call(name, "auto")(*x).sum(),
                              argnums=tuple(range(len(inputs))))(*(t.detach() for t in inputs))
    for g, e in zip(got, expected, strict=True):
        assert rel_err(g, e) <= 1e-10, rel_err(g, e)


def test_func_hessian_of_lncc_matches_the_reference():
    a, b = (t.detach() for t in op_inputs("lncc", "cpu", torch.float64, True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        h = torch.func.hessian(lambda x: ops.lncc(x, b, window=3))(a)
    ref = torch.autograd.functional.hessian(lambda x: ops.lncc(x, b, window=3,
                                                                backend="reference"), a)
    assert h.shape == (*a.shape, *a.shape) and ref.abs().max() > 0
    assert rel_err(h, ref) <= 1e-12


def test_vmap_runs_the_kernels():
    inputs = [t.detach() for t in op_inputs("warp", "cpu", torch.float32, False)]
    batched = [torch.stack([t, 0.5 * t]) for t in inputs]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="gvsl_fast", category=RuntimeWarning)
        got = torch.func.vmap(op_call("warp", "cpu"))(*batched)
    expected = torch.stack([op_call("warp", "cpu")(*(t[i] for t in batched)) for i in range(2)])
    assert torch.equal(got, expected)
