"""compose and affine_flow_warp: every backend against the reference (values and gradients), an
independent construction from F.affine_grid + F.grid_sample, exact identity, gradcheck, the CPU's
saved-derivative affine_flow_warp, torch.compile and bad input."""

from __future__ import annotations

import inspect

import pytest
import torch
from common import (
    HALF,
    affine_grid_composition,
    backend_ids,
    fast_backends,
    rel_err,
    tolerance,
    upstream_grads,
)

from gvsl_fast.ops import _sampler, affine_flow_warp, compose
from gvsl_fast.ops import reference as R
from gvsl_fast.ops._backend import deterministic_algorithms

BACKENDS = fast_backends()
IDS = backend_ids(BACKENDS)
SIZE = (7, 9, 11)


def make_inputs(device, dtype=torch.float32, batch=2, channels=2, size=SIZE, flow_scale=2.0,
                seed=0):
    """theta near the identity (rotation, scale, shear, translation up to ~0.2 in normalized
    units) and a flow of a few voxels, so samples leave the volume at the borders."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.eye(3, 4).repeat(batch, 1, 1) + 0.15 * torch.randn(batch, 3, 4, generator=g)
    flow = flow_scale * torch.randn(batch, 3, *size, generator=g)
    image = torch.randn(batch, channels, *size, generator=g)
    image[:, :, :2] = 0.5  # a constant region
    return [t.to(device=device, dtype=dtype) for t in (theta, flow, image)]


def check_close(outs, refs, tol):
    for out, ref in zip(outs, refs, strict=True):
        assert rel_err(out, ref) <= tol, rel_err(out, ref)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize(("device", "backend"), BACKENDS, ids=IDS)
def test_compose_matches_reference(device, backend, padding, align_corners):
    theta, flow, _ = make_inputs(device)
    theta.requires_grad_()
    flow.requires_grad_()
    out = compose(theta, flow, align_corners, padding, backend=backend)
    ref = R.compose(theta, flow, align_corners, padding)
    tol = tolerance(device, torch.float32)
    assert out.shape == flow.shape and out.dtype == flow.dtype
    check_close([out], [ref], tol)
    check_close(upstream_grads(out, [theta, flow]), upstream_grads(ref, [theta, flow]), tol)


@pytest.mark.parametrize("image_grad", [False, True])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize(("device", "backend"), BACKENDS, ids=IDS)
def test_affine_flow_warp_matches_reference(device, backend, padding, align_corners,
                                            image_grad):
    theta, flow, image = make_inputs(device, channels=3, flow_scale=3.0)
    for t in (theta, flow):
        t.requires_grad_()
    image.requires_grad_(image_grad)
    inputs = [image, theta, flow]
    out = affine_flow_warp(image, theta, flow, align_corners, padding, backend=backend)
    ref = R.affine_flow_warp(image, theta, flow, align_corners, padding)
    tol = tolerance(device, torch.float32)
    assert out.shape == image.shape
    check_close([out], [ref], tol)
    got = upstream_grads(out, inputs)
    assert len(got) == (3 if image_grad else 2)
    check_close(got, upstream_grads(ref, inputs), tol)


@pytest.mark.parametrize(("device", "backend"), BACKENDS, ids=IDS)
def test_only_requested_gradients(device, backend):
    theta, flow, image = make_inputs(device)
    flow.requires_grad_()
    out = affine_flow_warp(image, theta, flow, backend=backend)
    out.sum().backward()  # an expanded (stride 0) incoming gradient
    ref_flow = flow.detach().clone().requires_grad_()
    R.affine_flow_warp(image, theta, ref_flow).sum().backward()
    assert theta.grad is None and image.grad is None
    assert rel_err(flow.grad, ref_flow.grad) <= tolerance(device, torch.float32)
    theta.requires_grad_()
    flow.requires_grad_(False)
    (dtheta,) = torch.autograd.grad(compose(theta, flow, backend=backend).sum(), [theta])
    (ref,) = torch.autograd.grad(R.compose(theta, flow).sum(), [theta])
    assert rel_err(dtheta, ref) <= tolerance(device, torch.float32)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_matches_affine_grid_construction(padding, align_corners):
    theta, flow, image = make_inputs("cpu", torch.float64, flow_scale=1.5)
    psi_ref, warped_ref = affine_grid_composition(theta, flow, align_corners, padding, image)
    psi = compose(theta, flow, align_corners, padding, backend="cpu")
    warped = affine_flow_warp(image, theta, flow, align_corners, padding, backend="cpu")
    assert rel_err(psi, psi_ref) <= 1e-12
    assert rel_err(warped, warped_ref) <= 1e-12


@pytest.mark.parametrize("size", [SIZE, (1, 5, 6)])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(("device", "backend"), BACKENDS, ids=IDS)
def test_identity_is_exact(device, backend, align_corners, size):
    _, flow, image = make_inputs(device, size=size)
    theta = torch.eye(3, 4, device=device).repeat(2, 1, 1)
    for padding in ("zeros", "border"):
        psi = compose(theta, torch.zeros_like(flow), align_corners, padding, backend=backend)
        assert torch.equal(psi, torch.zeros_like(psi))
        out = affine_flow_warp(image, theta, torch.zeros_like(flow), align_corners, padding,
                               backend=backend)
        assert torch.equal(out, image)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("device", "backend"), BACKENDS, ids=IDS)
def test_half_inputs(device, backend, dtype):
    theta, flow, image = make_inputs(device, dtype)
    for t in (theta, flow, image):
        t.requires_grad_()
    ref_in = [t.detach().float().requires_grad_() for t in (image, theta, flow)]
    psi = compose(theta, flow, backend=backend)
    out = affine_flow_warp(image, theta, flow, padding_mode="border", backend=backend)
    assert psi.dtype == dtype and out.dtype == dtype
    psi_ref = R.compose(*ref_in[1:])
    out_ref = R.affine_flow_warp(*ref_in, padding_mode="border")
    check_close([psi, out], [psi_ref, out_ref], 1e-2)
    check_close(upstream_grads(psi, [theta, flow]), upstream_grads(psi_ref, ref_in[1:]), 1e-2)
    got = upstream_grads(out, [image, theta, flow])
    assert all(g.dtype == dtype for g in got)
    check_close(got, upstream_grads(out_ref, ref_in), 1e-2)


@pytest.mark.skipif(not any(b == "triton" for _, b in BACKENDS), reason="Triton does not run here")
@pytest.mark.parametrize("variant", ("wide", "batch_split"))
def test_triton_launch_variants_give_the_same_results(monkeypatch, variant):
    """Int64 offsets (WIDE, taken from 2^31 elements on) and one launch per batch element (the
    split that keeps grid axis 1 within CUDA's 65535), forced on small inputs: the same
    addresses, hence the same psi, warped image and gradients."""
    from gvsl_fast.kernels import compose as K
    from gvsl_fast.kernels import warp as W

    device = "cuda" if ("cuda", "triton") in BACKENDS else "cpu"
    theta, flow, image = make_inputs(device, channels=3)
    runs = []
    for forced in (False, True):
        if forced and variant == "wide":
            monkeypatch.setattr(K, "wide_indices", lambda *tensors: True)
        elif forced:
            monkeypatch.setattr(W, "MAX_GRID_Y", 1)  # read by batch_launches
        run = []
        for op in ("compose", "affine_flow_warp"):
            args = [t.clone().requires_grad_() for t in (image, theta, flow)]
            out = (compose(*args[1:], backend="triton") if op == "compose"
                   else affine_flow_warp(*args, backend="triton"))
            run += [out, *upstream_grads(out, args if op != "compose" else args[1:])]
        runs.append(run)
    for a, b in zip(*runs, strict=True):  # the GPU's float atomics may add in another order
        assert torch.equal(a, b) if device == "cpu" else rel_err(a, b) <= 1e-6


@pytest.mark.parametrize(("device", "backend"), BACKENDS, ids=IDS)
def test_channels_last_and_batch_one(device, backend):
    theta, flow, image = make_inputs(device, batch=1, channels=4)
    flow = flow.to(memory_format=torch.channels_last_3d)
    image = image.to(memory_format=torch.channels_last_3d)
    tol = tolerance(device, torch.float32)
    check_close([compose(theta, flow, backend=backend),
                 affine_flow_warp(image, theta, flow, backend=backend)],
                [R.compose(theta, flow), R.affine_flow_warp(image, theta, flow)], tol)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_gradcheck_cpu_float64(padding):
    theta, flow, image = make_inputs("cpu", torch.float64, batch=2, channels=2, size=(3, 4, 5),
                                     flow_scale=0.7)
    for t in (theta, flow, image):
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda th, fl: compose(th, fl, True, padding, backend="cpu"), (theta, flow))
    assert torch.autograd.gradcheck(
        lambda im, th, fl: affine_flow_warp(im, th, fl, False, padding, backend="cpu"),
        (image, theta, flow))


def test_theta_gradient_is_reproducible():
    theta, flow, image = make_inputs("cpu", size=(17, 23, 29))
    theta.requires_grad_()
    runs = [upstream_grads(affine_flow_warp(image, theta, flow, backend="cpu"), [theta])[0]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(("device", "backend"), BACKENDS, ids=IDS)
def test_deterministic_gradients(device, backend):
    """deterministic=True (fixed-point scatters on the GPU backends): the same bits run to run,
    the float path's gradients to rounding and the reference's within the usual tolerance.
    theta shrinks the volume to a third, so about 27 voxels scatter to each flow corner; the
    image is large (1e6), so a fixed-point scale bound that left out its size overflows."""
    theta, flow, image = make_inputs(device, flow_scale=0.5)
    theta[:, :, :3] *= 0.33
    image *= 1e6
    for t in (theta, flow, image):
        t.requires_grad_()
    for fn, ref, inputs in (
        (lambda det: compose(theta, flow, deterministic=det, backend=backend),
         lambda: R.compose(theta, flow), [theta, flow]),
        (lambda det: affine_flow_warp(image, theta, flow, deterministic=det, backend=backend),
         lambda: R.affine_flow_warp(image, theta, flow), [image, theta, flow]),
    ):
        runs = [upstream_grads(fn(True), inputs) for _ in range(3)]
        for run in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))
        check_close(runs[0], upstream_grads(fn(False), inputs), 1e-5)
        check_close(runs[0], upstream_grads(ref(), inputs), tolerance(device, torch.float32))


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_deterministic_gradients_at_float32_extremes(device, backend):
    """deterministic=True with a scale bound past float32's range (an incoming gradient near its
    largest values, or affine_flow_warp's product of two maxima) still gives the float path's
    gradients; an inf or NaN in the incoming gradient is not lost (a GradScaler must see it)."""
    theta, flow, image = make_inputs(device, flow_scale=0.5)
    theta[:, :, :3] *= 0.5
    for t in (theta, flow, image):
        t.requires_grad_()
    for fn, inputs, big in (
        (lambda det: compose(theta, flow, deterministic=det, backend=backend), [flow], 1e36),
        (lambda det: affine_flow_warp(1e6 * image, theta, flow, deterministic=det,
                                      backend=backend), [image, flow], 1e29),
    ):
        up = big * torch.randn_like(fn(False))
        fixed = torch.autograd.grad(fn(True), inputs, up)
        check_close(fixed, torch.autograd.grad(fn(False), inputs, up), 1e-5)
        for bad in (float("inf"), float("nan")):
            up[1, 0, 2, 3, 4] = bad
            for g in torch.autograd.grad(fn(True), inputs, up):
                assert not torch.isfinite(g).all()


@pytest.mark.skipif(("cpu", "triton") not in BACKENDS, reason="needs Triton (TRITON_INTERPRET=1)")
def test_deterministic_follows_torch_setting(monkeypatch):
    """deterministic=None takes torch.are_deterministic_algorithms_enabled(); an explicit bool
    wins. Seen at the Triton host functions that take the flag, for all five sampling ops
    (affine_warp's goes through the samplers' backward)."""
    from gvsl_fast.kernels import compose as compose_kernels
    from gvsl_fast.kernels import warp as warp_kernels
    from gvsl_fast.ops import affine_warp, grid_sample, warp

    seen = []
    for module in (compose_kernels, warp_kernels):
        real = module.backward
        signature = inspect.signature(real)

        def spy(*args, real=real, signature=signature, **kwargs):
            seen.append(signature.bind(*args, **kwargs).arguments["deterministic"])
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "backward", spy)
    theta, flow, image = make_inputs("cpu")
    grid = torch.rand(2, *SIZE, 3) * 2 - 1

    def flags(deterministic):
        seen.clear()
        th, fl, im, gr = (t.clone().requires_grad_() for t in (theta, flow, image, grid))
        outs = [compose(th, fl, deterministic=deterministic, backend="triton"),
                affine_flow_warp(im, th, fl, deterministic=deterministic, backend="triton"),
                warp(im, fl, deterministic=deterministic, backend="triton"),
                grid_sample(im, gr, deterministic=deterministic, backend="triton"),
                affine_warp(im, th, deterministic=deterministic, backend="triton")]
        sum(o.float().sum() for o in outs).backward()
        return seen[:]

    with deterministic_algorithms(False):
        assert flags(None) == [False] * 5
        assert flags(True) == [True] * 5
    with deterministic_algorithms(True):
        assert flags(None) == [True] * 5
        assert flags(False) == [False] * 5


def test_deterministic_algorithms_setting_runs_on_cpu():
    """Under torch.use_deterministic_algorithms(True) the CPU ops run (nothing they call
    raises) and give the gradients they give without it."""
    theta, flow, image = make_inputs("cpu")
    for t in (theta, flow, image):
        t.requires_grad_()
    runs = []
    for enabled in (True, False):
        with deterministic_algorithms(enabled):
            out = affine_flow_warp(image, theta, flow, backend="cpu")
            runs.append(upstream_grads(out, [image, theta, flow]))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_cpu_thread_count_does_not_change_results():
    theta, flow, image = make_inputs("cpu", size=(17, 23, 29))
    for t in (theta, flow, image):
        t.requires_grad_()
    threads = torch.get_num_threads()
    runs = []
    for n in (1, max(threads, 2)):
        torch.set_num_threads(n)
        try:
            out = affine_flow_warp(image, theta, flow, backend="cpu")
            runs.append(upstream_grads(out, [image, theta, flow]))
        finally:
            torch.set_num_threads(threads)
    check_close(runs[1], runs[0], 1e-6)


def test_torch_compile_fullgraph_cpu():
    theta, flow, image = make_inputs("cpu")
    theta.requires_grad_()
    flow.requires_grad_()

    def step(image, theta, flow):
        psi = compose(theta, flow, backend="cpu")
        return affine_flow_warp(image, theta, flow, backend="cpu").square().mean() + psi.mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(image, theta, flow), [theta, flow])
    want = torch.autograd.grad(step(image, theta, flow), [theta, flow])
    check_close(got, want, 1e-6)


# ---- the CPU's saved-derivative affine_flow_warp: theta and flow want grad, the image not ----


def _saved_path(out: torch.Tensor) -> bool:
    return out.grad_fn is not None and "fwd_saved" in out.grad_fn.name()


@pytest.mark.parametrize("layout", (torch.contiguous_format, torch.channels_last_3d),
                         ids=("contiguous", "channels_last"))
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("channels,dtype", [(1, torch.float32), (3, torch.float32),
                                            (1, torch.float64), (2, torch.bfloat16),
                                            (1, torch.float16)], ids=str)
@pytest.mark.parametrize("need", ["both", "theta", "flow"])
def test_saved_derivative_matches_recompute(monkeypatch, need, channels, dtype, padding,
                                            align_corners, layout):
    """The forward saves d out / d q and d out / d p_hat; the backward needs only the flow's
    stencil weights. Values and the requested gradients equal the recomputing backward's up to
    the order of the sums, and the reference's; a retained graph's second backward is equal."""
    theta, flow, image = make_inputs("cpu", dtype, channels=channels, flow_scale=3.0)
    flow, image = flow.contiguous(memory_format=layout), image.contiguous(memory_format=layout)
    theta.requires_grad_(need != "flow")
    flow.requires_grad_(need != "theta")
    inputs = [theta, flow]
    out = affine_flow_warp(image, theta, flow, align_corners, padding, backend="cpu")
    assert _saved_path(out)
    wanted = [t for t in inputs if t.requires_grad]
    first, second = (torch.autograd.grad(out, wanted, torch.ones_like(out), retain_graph=True)
                     for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    got = upstream_grads(out, inputs)
    assert len(got) == (2 if need == "both" else 1)
    monkeypatch.setattr(_sampler, "SAVED_DERIVATIVE_CHANNELS", 0)
    plain = affine_flow_warp(image, theta, flow, align_corners, padding, backend="cpu")
    assert not _saved_path(plain)
    assert torch.equal(out, plain)
    close = 1e-12 if dtype == torch.float64 else 1e-6  # one sum reassociated: (I + J)^T sum go s
    check_close(got, upstream_grads(plain, inputs), close)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    ref_inputs = [t.detach().to(wide).requires_grad_(t.requires_grad) for t in inputs]
    ref = R.affine_flow_warp(image.to(wide), *ref_inputs, align_corners, padding)
    assert out.dtype == dtype and all(g.dtype == dtype for g in got)
    tol = 1e-12 if dtype == torch.float64 else tolerance("cpu", dtype)  # a few thousand roundings
    check_close([out], [ref], tol)
    check_close(got, upstream_grads(ref, ref_inputs), tol)


def test_saved_derivative_only_when_it_serves():
    """Taken on the CPU with grad enabled, theta or flow requiring grad, the image not, and at
    most SAVED_DERIVATIVE_CHANNELS channels."""
    theta, flow, image = make_inputs("cpu", channels=_sampler.SAVED_DERIVATIVE_CHANNELS)
    assert not _saved_path(affine_flow_warp(image, theta, flow, backend="cpu"))  # no grad
    flow.requires_grad_()
    assert _saved_path(affine_flow_warp(image, theta, flow, backend="cpu"))
    wide = torch.randn(2, image.shape[1] + 1, *SIZE)
    assert not _saved_path(affine_flow_warp(wide, theta, flow, backend="cpu"))
    assert not _saved_path(affine_flow_warp(image.requires_grad_(), theta, flow, backend="cpu"))
    assert not _saved_path(affine_flow_warp(image.detach(), theta, flow, backend="reference"))
    with torch.no_grad():
        assert affine_flow_warp(image.detach(), theta, flow, backend="cpu").grad_fn is None


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_saved_derivative_gradcheck_cpu_float64(padding):
    theta, flow, image = make_inputs("cpu", torch.float64, batch=2, channels=2, size=(3, 4, 5),
                                     flow_scale=0.7)
    theta.requires_grad_()
    flow.requires_grad_()
    for align_corners in (False, True):
        def fn(th, fl, ac=align_corners):
            return affine_flow_warp(image, th, fl, ac, padding, backend="cpu")

        assert _saved_path(fn(theta, flow))
        assert torch.autograd.gradcheck(fn, (theta, flow))


def test_bad_inputs():
    theta, flow, image = make_inputs("cpu")
    cases = [
        (lambda: compose(theta, flow[:, :2]), ValueError, "`flow` must have 3 channels"),
        (lambda: compose(theta, flow[0]), ValueError, "`flow` must be 5-D"),
        (lambda: compose(theta[:, :2], flow), ValueError, "`theta` must be (B, 3, 4)"),
        (lambda: compose(theta[:1], flow), ValueError, "`theta` has batch 1"),
        (lambda: compose(theta, flow.int()), TypeError, "`flow` must be a floating tensor"),
        (lambda: compose(theta.double(), flow), TypeError, "`theta` has dtype torch.float64"),
        (lambda: compose(theta.to("meta"), flow), ValueError, "`theta` is on meta"),
        (lambda: compose(theta, flow, padding_mode="reflection"), ValueError, "`padding_mode`"),
        (lambda: compose(theta, flow, align_corners=1), TypeError, "`align_corners`"),
        (lambda: compose(theta, flow, deterministic=1), TypeError,
         "compose: `deterministic` must be a bool or None"),
        (lambda: compose(theta, flow[:, :, :0]), ValueError, "`flow` is empty"),
        (lambda: compose(theta, flow, backend="gpu"), ValueError, "backend must be one of"),
        (lambda: compose(theta, flow, backend="cuda"), RuntimeError, "needs CUDA tensors"),
        (lambda: affine_flow_warp(image[:, :, 1:], theta, flow), ValueError,
         "must share batch and spatial size"),
        (lambda: affine_flow_warp(image[:1], theta, flow), ValueError,
         "must share batch and spatial size"),
        (lambda: affine_flow_warp(image.half(), theta, flow), TypeError, "has dtype"),
        (lambda: affine_flow_warp(image[0], theta, flow), ValueError, "`image` must be 5-D"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc) as info:
            fn()
        assert match in str(info.value), (match, str(info.value))
