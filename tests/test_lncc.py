"""lncc: every backend against gvsl_fast.ops.reference (values and both gradients), presets,
reductions, windows, dtypes, layouts, gradcheck, torch.compile, bad input, drop-in modules."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from common import HALF, backend_ids, fast_backends, rel_err, tolerance, volumes

from gvsl_fast.ops import NCC, LocalNormalizedCrossCorrelationLoss, _backend, lncc, reference

BACKENDS = fast_backends()
PRESETS = ("gvsl", "voxelmorph", "monai")
REDUCTIONS = ("mean", "sum", "none")


def run(fn, a, b, reduction, need_b=True, seed=1):
    """Value and gradients of fn(a, b); a random upstream map for reduction none."""
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(need_b)
    out = fn(a, b)
    if reduction == "none":
        g = torch.Generator().manual_seed(seed)
        up = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
        (out.double() * up.double()).sum().backward()
    else:
        out.backward()
    return out.detach(), a.grad, (b.grad if need_b else None)


def check_against_reference(device, backend, shape, window, preset, reduction, dtype, need_b=True,
                            tol=None, **kw):
    """The fast backend against the reference run in float64 on the same (upcast) inputs. A
    float32 reference is not exact enough on a GPU: cuDNN may run float32 convolutions in TF32
    (PyTorch's default), and on an H100 the cuda and triton backends both differed from it by the
    same 4.4e-4 (one channel) and 1.4e-3 (channels_last), the reference's own error."""
    a, b = volumes(shape, device, dtype)
    got = run(lambda x, y: lncc(x, y, window, reduction=reduction, preset=preset,
                                backend=backend, **kw), a, b, reduction, need_b)
    ref = run(lambda x, y: reference.lncc(x, y, window, reduction=reduction, preset=preset, **kw),
              a.double(), b.double(), reduction, need_b)
    tol = tol or tolerance(device, dtype)
    scalar_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == (dtype if reduction == "none" else scalar_dtype)
    for name, x, r in zip(("value", "grad a", "grad b"), got, ref, strict=True):
        if r is None:
            assert x is None, f"{name} should not be computed"
            continue
        err = rel_err(x, r)
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol}"


def check_map_and_mean(a, b, preset, device, backend):
    """Window-5 cc map and mean loss of given float32 volumes, with both gradients, against the
    float64 reference (rel_err also asserts that everything is finite)."""
    for reduction in ("none", "mean"):
        out = run(lambda x, y, r=reduction: lncc(x, y, 5, reduction=r, preset=preset,
                                                 backend=backend), a, b, reduction)
        ref = run(lambda x, y, r=reduction: reference.lncc(x, y, 5, reduction=r, preset=preset),
                  a.double(), b.double(), reduction)
        for name, x, r in zip(("value", "grad a", "grad b"), out, ref, strict=True):
            err = rel_err(x, r)
            assert err <= tolerance(device, torch.float32), f"{reduction} {name}: {err:.3g}"


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(device, backend, preset, reduction):
    check_against_reference(device, backend, (2, 3, 7, 9, 11), 5, preset, reduction,
                            torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("window", [3, 7, 9, 15])
def test_windows(device, backend, window):
    check_against_reference(device, backend, (1, 2, 9, 11, 13), window, "gvsl", "none",
                            torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
def test_only_a_requires_grad(device, backend):
    check_against_reference(device, backend, (2, 1, 8, 7, 9), 9, "gvsl", "mean", torch.float32,
                            need_b=False)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
def test_monai_smooth_nr(device, backend):
    check_against_reference(device, backend, (1, 2, 7, 8, 9), 3, "monai", "mean", torch.float32,
                            smooth_nr=1e-3)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("dtype", HALF)
def test_half_dtypes(device, backend, dtype):
    check_against_reference(device, backend, (1, 2, 7, 9, 11), 5, "gvsl", "none", dtype)
    check_against_reference(device, backend, (1, 2, 7, 9, 11), 5, "gvsl", "mean", dtype)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("preset", PRESETS)
def test_constant_regions(device, backend, preset):
    """Zero-variance windows (constant blocks, an all-constant channel) give finite values. The
    constants are powers of two (or 0) so that their products with the other image, which every
    backend forms in float32, are exact; with the window sums and the statistics in double, cc
    and its gradient there then match the float64 reference. (With other constants, cross is
    float32 rounding noise divided by eps: any code with float32 products is noisy there. So it
    is with float32 statistics and FMA contraction, as on a GPU: the cuda and triton backends
    computed SIJ - SI * muJ in float32 and were off by up to 0.12 here on an H100.)"""
    a, b = volumes((1, 2, 9, 10, 11), device)
    a[:, :, :5] = 0.25
    b[:, :, 3:7, :6] = 0.0
    b[:, 1] = 0.5
    check_map_and_mean(a, b, preset, device, backend)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("preset", ["gvsl", "monai"])
def test_constant_after_variation(device, backend, preset):
    """Constant blocks at the far end of every axis, which the running sums reach only after
    varying data. There a float32 running sum has drifted (what it added and later subtracts
    does not cancel exactly): a constant window gets rounding noise for its variance and its
    cross term, and the gradient, about cross / eps there, goes wrong (the Triton backend under
    TRITON_INTERPRET=1 with float32 running sums: gradient relative error 3.3 here, 8e2 at
    24x28x32)."""
    a, b = volumes((1, 2, 12, 14, 16), device)
    a[:, :, 7:] = 0.25
    a[:, :, :, 8:] = 0.25
    a[:, :, :, :, 9:] = 0.25
    b[:, 1, :, :, 10:] = 0.5
    check_map_and_mean(a, b, preset, device, backend)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("offset", [10.0, 100.0])
def test_intensity_offset(device, backend, offset):
    """Unit-range images offset by +10 / +100 (raw scanner intensities): the variances lose
    about log10(offset^2 / var) digits to cancellation in any float32 code, so the float64
    reference is met only to ~1e-5 / ~1e-3 here. The fast backends must be no less accurate
    than the float32 reference (MONAI's loss matches that), which they beat 3-4x on the CPU.
    (Subtracting a per-volume level on load was tried and rejected: it changes the zero padding,
    and it makes zero-background windows, exact now, products of rounded values.)"""
    a, b = volumes((1, 2, 12, 13, 14), device)
    a, b = a + offset, b + offset
    got = run(lambda x, y: lncc(x, y, 9, backend=backend), a, b, "mean")
    ref32 = run(lambda x, y: reference.lncc(x, y, 9), a, b, "mean")
    ref = run(lambda x, y: reference.lncc(x, y, 9), a.double(), b.double(), "mean")
    for name, x, x32, r in zip(("value", "grad a", "grad b"), got, ref32, ref, strict=True):
        err, err32 = rel_err(x, r), rel_err(x32, r)
        assert err <= max(err32, tolerance(device, torch.float32)), \
            f"{name}: rel err {err:.3g}, float32 reference {err32:.3g}"


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("preset", PRESETS)
def test_window_one(device, backend, preset):
    """A one-voxel window has no variance and no cross term: cc is exactly 0 and the gradients
    are exactly 0, as the reference (and MONAI's loss) give, here at raw-scanner-like intensities.
    (From float32 squares and double sums it had been a rounding residue: MONAI's cc, which
    divides it by eps^2, reached 1e2 near intensity 100.)"""
    a, b = (x + 100.0 for x in volumes((1, 2, 5, 6, 7), device))
    cc, ga, gb = run(lambda x, y: lncc(x, y, 1, reduction="none", preset=preset,
                                       backend=backend), a, b, "none")
    ref = reference.lncc(a, b, 1, reduction="none", preset=preset)
    assert torch.equal(ref, torch.zeros_like(ref))  # what the statistics must be
    assert torch.equal(cc, ref)
    assert not ga.any() and not gb.any()


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
def test_channels_last(device, backend):
    a, b = volumes((2, 3, 7, 8, 9), device)
    a, b = a.to(memory_format=torch.channels_last_3d), b.to(memory_format=torch.channels_last_3d)
    got = run(lambda x, y: lncc(x, y, 3, reduction="none", backend=backend), a, b, "none")
    # float64 reference: see check_against_reference
    ref = run(lambda x, y: reference.lncc(x, y, 3, reduction="none"), a.double(), b.double(),
              "none")
    for x, r in zip(got, ref, strict=True):
        assert rel_err(x, r) <= tolerance(device, torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
def test_reduction_is_reproducible(device, backend):
    a, b = volumes((2, 2, 12, 13, 14), device)
    first = lncc(a, b, 5, backend=backend)
    assert all(torch.equal(first, lncc(a, b, 5, backend=backend)) for _ in range(3))


@pytest.mark.parametrize("device,backend",
                         [p for p in BACKENDS if p[0] == "cuda"] + [("cpu", "cpu")],
                         ids=lambda x: str(x))
def test_no_drift_at_moderate_size(device, backend):
    """Running sums along long lines stay within tolerance of the float64 reference."""
    size = (1, 1, 128, 128, 128) if device == "cuda" else (1, 1, 48, 64, 80)
    a, b = volumes(size, device)
    got = run(lambda x, y: lncc(x, y, 9, backend=backend), a, b, "mean")
    ref = run(lambda x, y: reference.lncc(x, y, 9), a.double(), b.double(), "mean")
    for x, r in zip(got, ref, strict=True):
        assert rel_err(x, r) <= tolerance(device, torch.float32)


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p[0] == "cuda"],
                         ids=backend_ids([p for p in BACKENDS if p[0] == "cuda"]))
@pytest.mark.parametrize("window", [3, 9, 15])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_partial_tiles_and_depth_chunks_gpu(device, backend, window, reduction):
    """W and H not multiples of the CUDA tile (partial tiles past the first), and a depth that
    the launch splits into uneven chunks for the smaller windows (2K-deep chunks of 41 slices)."""
    check_against_reference(device, backend, (1, 2, 41, 19, 45), window, "gvsl", reduction,
                            torch.float32)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_cpu(preset, reduction):
    a, b = volumes((1, 2, 4, 5, 6), "cpu", torch.float64)
    a.requires_grad_(True)
    b.requires_grad_(True)
    fn = lambda x, y: lncc(x, y, 3, reduction=reduction, preset=preset, backend="cpu")
    assert torch.autograd.gradcheck(fn, (a, b))


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
def test_forward_leaves_maps_only_when_needed(device, backend):
    """A reduced loss whose input needs a gradient leaves the backward's coefficient maps (1 + 3
    per such input), so the backward box-sums only them; without grad or for the cc map, none.
    Both backward paths (saved maps for mean, recomputed maps for none) give one gradient."""
    op = torch.ops.gvsl_fast.lncc_forward
    if backend == "triton":
        from gvsl_fast.kernels import lncc as triton_lncc

        op = triton_lncc.lncc_forward
    a, b = volumes((2, 3, 6, 7, 8), device)
    for reduction, need, maps in ((1, (True, False), 4), (2, (True, True), 7),
                                  (1, (False, False), 0), (0, (True, True), 0)):
        _, coef = op(a, b, 3, 1e-5, 0, 0.0, reduction, *need)
        assert coef.shape == ((maps, 6, 6, 7, 8) if maps else (0,))
    mean = run(lambda x, y: lncc(x, y, 3, backend=backend), a, b, "mean")
    up = torch.full_like(a, 1.0 / a.numel())
    x, y = (t.detach().clone().requires_grad_() for t in (a, b))
    (-lncc(x, y, 3, reduction="none", backend=backend) * up).sum().backward()
    for got, want in zip(mean[1:], (x.grad, y.grad), strict=True):
        assert rel_err(got, want) <= 1e-6


def saved_tensors(out: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor that the autograd graph of ``out`` saved for backward: the ctx tensors of the
    custom ops' nodes, the ``_saved_*`` tensors of built-in ones (the reference)."""
    found, seen, todo = [], set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found += list(getattr(node, "saved_tensors", ()))
        found += [t for t in (getattr(node, k) for k in dir(node) if k.startswith("_saved_"))
                  if isinstance(t, torch.Tensor)]
        todo += [next_node for next_node, _ in node.next_functions]
    return found


@pytest.mark.parametrize("device,backend", BACKENDS + [("cpu", "reference")],
                         ids=backend_ids(BACKENDS + [("cpu", "reference")]))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_twice(device, backend, reduction):
    """Two backwards over one retained graph give one gradient and leave what the forward saved
    as it was. (The Triton backward box-summed the forward's saved coefficient maps in place: a
    second one summed the sums, off by 0.05 for gradients of at most 0.005 here.)"""
    a, b = volumes((1, 1, 9, 10, 11), device)
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = lncc(a, b, 3, reduction=reduction, backend=backend)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    saved = saved_tensors(out)
    assert saved
    before = [t.clone() for t in saved]
    first = torch.autograd.grad(out, (a, b), up, retain_graph=True)
    second = torch.autograd.grad(out, (a, b), up)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert all(torch.equal(t, t0) for t, t0 in zip(saved, before, strict=True))


def test_torch_compile_cpu():
    a, b = volumes((1, 2, 6, 7, 8), "cpu")
    a.requires_grad_(True)

    def loss(x, y):
        return lncc(x, y, 3, backend="cpu") + lncc(x, y, 3, reduction="none", backend="cpu").sum()

    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(a, b)
    (ga,) = torch.autograd.grad(got, a)
    ref = loss(a, b)
    (ra,) = torch.autograd.grad(ref, a)
    assert rel_err(got, ref) <= 1e-5
    assert rel_err(ga, ra) <= 1e-5


@pytest.mark.parametrize("device,backend", BACKENDS, ids=backend_ids(BACKENDS))
def test_torch_compile_channels_last_map(device, backend):
    """The cc map of channels_last input under torch.compile(fullgraph=True): every op returns
    the layout its fake promises, the input's. (The Triton op returned a contiguous map: compile
    failed with "incorrect fake kernel".)"""
    a, b = (t.to(memory_format=torch.channels_last_3d) for t in volumes((1, 3, 5, 6, 7), device))
    fn = lambda x, y: lncc(x, y, 3, reduction="none", backend=backend)
    got = torch.compile(fn, fullgraph=True)(a, b)
    want = fn(a, b)
    assert want.stride() == a.stride()
    assert rel_err(got, want) <= 1e-6


def test_auto_matches_reference():
    a, b = volumes((1, 1, 5, 6, 7), "cpu")
    assert rel_err(lncc(a, b), reference.lncc(a, b)) <= 1e-5


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_errors(backend):
    a, b = volumes((1, 1, 5, 6, 7), "cpu")
    with pytest.raises(ValueError, match="window"):
        lncc(a, b, 4, backend=backend)
    with pytest.raises(ValueError, match="window"):
        lncc(a, b, 0, backend=backend)
    with pytest.raises(ValueError, match="shape"):
        lncc(a, b[..., :-1], backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        lncc(a, b.double(), backend=backend)
    for bad in (0.0, -1e-5, math.nan, math.inf, "x"):
        with pytest.raises(ValueError, match=f"`eps` must be a finite number > 0, got "
                           f"{re.escape(repr(bad))}"):
            lncc(a, b, eps=bad, backend=backend)
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="`smooth_nr` must be a finite number >= 0"):
            lncc(a, b, smooth_nr=bad, preset="monai", backend=backend)
    with pytest.raises(ValueError, match="is on meta"):
        lncc(a, b.to("meta"), backend=backend)
    with pytest.raises(TypeError, match="floating"):
        lncc(a, (b * 10).long(), backend=backend)
    with pytest.raises(ValueError, match="5-D"):
        lncc(a[0], b[0], backend=backend)
    with pytest.raises(ValueError, match="empty"):
        lncc(a[:, :, :0], b[:, :, :0], backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        lncc(a, b, reduction="max", backend=backend)
    with pytest.raises(ValueError, match="preset"):
        lncc(a, b, preset="ants", backend=backend)


def test_unavailable_backend():
    a, b = volumes((1, 1, 5, 6, 7), "cpu")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        lncc(a, b, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        lncc(a, b, backend="fast")


def _pretend_cuda(monkeypatch) -> None:
    """backend='auto' picks the CUDA kernels (for CPU tensors: the window check comes first),
    with a fresh record of what lncc has announced."""
    monkeypatch.setattr(_backend, "resolve", lambda op, backend, tensors: "cuda")
    monkeypatch.setattr(_backend, "_announced", set())


def test_large_window_without_triton_falls_back_to_reference(monkeypatch):
    """backend='auto' takes windows over the CUDA kernels' limit (15) to Triton; without Triton,
    to the reference, said once."""
    _pretend_cuda(monkeypatch)
    monkeypatch.setattr(_backend, "triton_error", lambda device: "triton is not importable (test)")
    a, b = volumes((1, 1, 5, 6, 7), "cpu")
    with pytest.warns(RuntimeWarning, match="reference: windows over 15.*not importable"):
        got = lncc(a, b, 17)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = lncc(a, b, 17)
    want = reference.lncc(a, b, 17)
    assert torch.equal(got, want) and torch.equal(again, want)


@pytest.mark.skipif(("cpu", "triton") not in BACKENDS, reason="needs Triton under the interpreter")
def test_large_window_goes_to_triton(monkeypatch):
    _pretend_cuda(monkeypatch)
    a, b = volumes((1, 1, 5, 6, 7), "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = lncc(a, b, 17)
    assert rel_err(got, reference.lncc(a.double(), b.double(), 17)) <= tolerance("cpu", a.dtype)


# ---- drop-in modules -------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kernel_size,smooth_nr", [(1, 0.0), (3, 0.0), (7, 1e-4)])
def test_monai_module(reduction, kernel_size, smooth_nr):
    monai_losses = pytest.importorskip("monai.losses")
    pred, target = volumes((2, 2, 9, 10, 11), "cpu")
    kw = dict(spatial_dims=3, kernel_size=kernel_size, reduction=reduction, smooth_nr=smooth_nr,
              smooth_dr=1e-5)
    ours = run(LocalNormalizedCrossCorrelationLoss(**kw), pred, target, reduction)
    theirs = run(monai_losses.LocalNormalizedCrossCorrelationLoss(**kw), pred, target, reduction)
    for x, r in zip(ours, theirs, strict=True):
        assert rel_err(x, r) <= 1e-5


def test_monai_module_rejects_other_kernels():
    with pytest.raises(ValueError, match="rectangular"):
        LocalNormalizedCrossCorrelationLoss(kernel_type="gaussian")
    for bad in (4, -1, 3.0, "3"):
        with pytest.raises(ValueError, match=f"`kernel_size` must be an odd positive int, got "
                           f"{re.escape(repr(bad))}"):
            LocalNormalizedCrossCorrelationLoss(kernel_size=bad)
    with pytest.raises(ValueError, match="`smooth_dr` must be a finite number > 0, got 0.0"):
        LocalNormalizedCrossCorrelationLoss(smooth_dr=0.0)
    with pytest.raises(ValueError, match="`smooth_nr` must be a finite number >= 0, got -1"):
        LocalNormalizedCrossCorrelationLoss(smooth_nr=-1)
    with pytest.raises(ValueError, match="`eps` must be a finite number > 0, got 0"):
        NCC(9, eps=0)


def voxelmorph_ncc(y_true, y_pred, win=9):
    """VoxelMorph's NCC.loss (voxelmorph/torch/losses.py), transcribed for a single channel."""
    filt = torch.ones(1, 1, win, win, win, dtype=y_true.dtype)
    pad = math.floor(win / 2)
    Ii, Ji = y_true, y_pred
    sums = [F.conv3d(x, filt, padding=pad) for x in (Ii, Ji, Ii * Ii, Ji * Ji, Ii * Ji)]
    I_sum, J_sum, I2_sum, J2_sum, IJ_sum = sums
    win_size = win**3
    u_I, u_J = I_sum / win_size, J_sum / win_size
    cross = IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * win_size
    I_var = I2_sum - 2 * u_I * I_sum + u_I * u_I * win_size
    J_var = J2_sum - 2 * u_J * J_sum + u_J * u_J * win_size
    cc = cross * cross / (I_var * J_var + 1e-5)
    return -torch.mean(cc)


@pytest.mark.parametrize("win", [5, [9, 9, 9]])
def test_voxelmorph_module(win):
    y_true, y_pred = volumes((2, 1, 10, 11, 12), "cpu", torch.float64)
    ours = run(lambda p, t: NCC(win).loss(t, p), y_pred, y_true, "mean")
    side = win if isinstance(win, int) else win[0]
    theirs = run(lambda p, t: voxelmorph_ncc(t, p, side), y_pred, y_true, "mean")
    for x, r in zip(ours, theirs, strict=True):
        assert rel_err(x, r) <= 1e-10
    with pytest.raises(ValueError, match=r"`win` must give one side for every axis \(only cubic"):
        NCC([9, 9, 7])
    with pytest.raises(ValueError, match=r"`win` must be an odd positive int, got \[4, 4, 4\]"):
        NCC([4, 4, 4])
    with pytest.raises(ValueError, match=r"`win` must be one side or three \(the volumes are "
                                         r"3-D\), got \[5, 5\]"):
        NCC([5, 5])  # VoxelMorph's 2-D window: refused, not taken as 5^3
    with pytest.raises(ValueError, match="`backend` must be one of"):
        NCC(5, backend="gpu")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        LocalNormalizedCrossCorrelationLoss(backend="gpu")
