"""The package as users install it: the source distribution holds everything the extension's
build needs, a wheel built from it installs and runs outside this repository (the kernels, the
Triton sources, pretrain on the embedded cohort, export and from_pretrained), and an extension
compiled for another machine's CPU or GPU is refused by name instead of crashing."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
import torch

from gvsl_fast.ops import _backend

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Runs `cmd`; on failure the assertion shows its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source distribution, built as `python -m build --sdist` builds it."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(out), str(ROOT)])
    (archive,) = out.glob("gvsl_fast-*.tar.gz")
    return archive


def test_sdist_holds_every_tracked_source(sdist: Path) -> None:
    """Every tracked file of the package, the Triton kernels and the C++/CUDA sources (headers
    included: setuptools packs only the sources an extension lists) is in the sdist."""
    try:
        tracked = _run(["git", "ls-files", "gvsl_fast", "kernels", "csrc"], cwd=ROOT).stdout
    except (AssertionError, FileNotFoundError):
        pytest.skip("not a git checkout")
    needed = set(tracked.split()) | {"setup.py", "pyproject.toml", "README.md"}
    with tarfile.open(sdist) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert not needed - packed, f"missing from {sdist.name}: {sorted(needed - packed)}"


_CHECK = """
import pathlib, sys, torch
import gvsl_fast
from gvsl_fast import ops
from gvsl_fast.models import UNet3D
assert pathlib.Path(gvsl_fast.__file__).is_relative_to(sys.prefix), gvsl_fast.__file__
import gvsl_fast.kernels.lncc  # the Triton sources ship with the package
from gvsl_fast._build_info import CUDA_CODES  # setup.py's record ships too
assert CUDA_CODES == (), CUDA_CODES  # built with GVSL_FAST_CUDA=0
g = torch.Generator().manual_seed(0)
a, b = (torch.rand(1, 1, 10, 11, 12, generator=g, dtype=torch.float64) for _ in range(2))
flow = torch.randn(1, 3, 10, 11, 12, generator=g, dtype=torch.float64)
torch.testing.assert_close(ops.lncc(a, b, backend="cpu"), ops.reference.lncc(a, b))
torch.testing.assert_close(ops.warp(a, flow, backend="cpu"), ops.reference.warp(a, flow))
net = UNet3D.from_pretrained(sys.argv[1])
print("ok", sum(p.numel() for p in net.parameters()))
"""


@pytest.mark.slow
def test_wheel_from_sdist_installs_and_runs(sdist: Path, tmp_path: Path) -> None:
    """pip builds a wheel from the sdist (CPU kernels: the CUDA build is CI's own step) and
    installs it into a fresh virtual environment; run from outside the repository, the installed
    package's ops match the reference, `gvsl-fast pretrain --amp` trains a step on the embedded
    cohort, `export` writes the backbone and `UNet3D.from_pretrained` loads it."""
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "src", filter="data")
    (src,) = (tmp_path / "src").iterdir()
    env = dict(os.environ, GVSL_FAST_CUDA="0", MAX_JOBS=str(os.cpu_count() or 1))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(tmp_path / "wheels"), str(src)], env=env)
    (wheel,) = (tmp_path / "wheels").glob("gvsl_fast-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python, bindir = venv / "bin" / "python", venv / "bin"
    # torch and the other dependencies from this environment: its site-packages as a plain path
    # (a path in a .pth file; the .pth files there, such as an editable gvsl-fast's, stay unread)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    Path(purelib.stdout.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])

    work = tmp_path / "work"  # not the repository: `import gvsl_fast` must find the installed one
    work.mkdir()
    info = _run([str(bindir / "gvsl-fast"), "info"], cwd=work).stdout
    assert "cpu: available" in info, info
    _run([str(bindir / "gvsl-fast"), "pretrain", "--amp", "--steps", "1", "--patch", "16",
          "--batch-size", "1", "--save-every", "1", "--keep-last", "1", "--no-progress",
          "--loader", "torch", "--workers", "0", "--out", "run", "--cache", "cache"], cwd=work)
    _run([str(bindir / "gvsl-fast"), "export", "run/ckpt_00000001.pt", "unet.pth"], cwd=work)
    out = _run([str(python), "-c", _CHECK, "unet.pth"], cwd=work).stdout
    assert out.startswith("ok "), out


def test_build_record_matches_the_loaded_extension() -> None:
    """setup.py's record of what gvsl_fast._C was compiled for describes this build: CPU
    features this CPU has, and CUDA targets exactly when the CUDA kernels were built."""
    built = _backend.build_info()
    if built is None:
        pytest.skip("gvsl_fast._C was built without setup.py's record")
    assert _backend.extension_error() is None
    host = _backend.host_cpu_flags()
    if host is not None:
        assert set(built.CPU_FEATURES) <= host
    assert bool(built.CUDA_CODES) == torch.ops.gvsl_fast.cuda_built(), built.CUDA_CODES


def test_cpu_features_the_cpu_lacks_are_named() -> None:
    assert _backend.cpu_build_error(("avx2", "fma"), frozenset({"avx2", "fma", "sse4_2"})) is None
    assert _backend.cpu_build_error(("avx2",), None) is None  # flags unknown: no objection
    why = _backend.cpu_build_error(("avx2", "avx512bw", "avx512f"), frozenset({"avx2"}))
    assert "lacks (avx512bw, avx512f)" in why and "GVSL_FAST_PORTABLE=1" in why, why


_OTHER_CPU = """
import sys, warnings, torch
import gvsl_fast._build_info as built
built.CPU_FEATURES += ("avx512_made_up",)
from gvsl_fast import ops
assert "gvsl_fast._C" not in sys.modules  # never loaded: it could die of an illegal instruction
a, b = torch.rand(2, 1, 1, 8, 9, 10, dtype=torch.float64)
try:
    ops.lncc(a, b, backend="cpu")
except RuntimeError as exc:
    assert "lacks (avx512_made_up)" in str(exc), exc
else:
    raise AssertionError("backend='cpu' ran")
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    loss = ops.lncc(a, b)
assert any("avx512_made_up" in str(w.message) for w in seen), [str(w.message) for w in seen]
torch.testing.assert_close(loss, ops.reference.lncc(a, b))
print("ok")
"""


def test_an_extension_for_another_cpu_is_never_loaded() -> None:
    """With a CPU feature the build used and this CPU lacks, importing gvsl_fast leaves _C
    unloaded; backend='cpu' names the feature and 'auto' says why it takes the reference."""
    if _backend.build_info() is None:
        pytest.skip("gvsl_fast._C was built without setup.py's record")
    assert _run([sys.executable, "-c", _OTHER_CPU]).stdout.strip() == "ok"


@pytest.mark.parametrize(("codes", "capability", "runs"), [
    (("sm_90",), (9, 0), True),
    (("sm_90",), (8, 0), False),
    (("sm_90",), (10, 0), False),  # binaries do not cross major versions
    (("sm_80",), (8, 6), True),    # a binary runs on later minors of its major
    (("sm_86",), (8, 0), False),
    (("compute_80", "sm_80"), (9, 0), True),  # PTX compiles at load for later GPUs
    (("compute_90",), (8, 9), False),
    (("sm_90a",), (9, 0), True),
    (("sm_100a",), (10, 3), False),  # arch-specific: that GPU only
])
def test_cuda_targets_against_the_gpu(codes, capability, runs) -> None:
    why = _backend.cuda_arch_error(codes, capability, "cuda:0 (some GPU)")
    assert (why is None) == runs, why
    if not runs:
        major, minor = capability
        assert f"cuda:0 (some GPU) is sm_{major}{minor}" in why, why
        assert f"TORCH_CUDA_ARCH_LIST={major}.{minor}" in why, why
