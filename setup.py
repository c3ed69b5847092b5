"""Builds gvsl_fast._C: CPU C++ always; the CUDA kernels too when torch has CUDA and nvcc exists.

Environment:
  GVSL_FAST_CUDA=0       build without the CUDA kernels even where they could be built
  TORCH_CUDA_ARCH_LIST   GPU targets; defaults to the local GPU, or "9.0" (Hopper) with none
  GVSL_FAST_PORTABLE=1   no -march=native for the CPU kernels (for wheels built elsewhere)
  GVSL_FAST_GATHER=0|1   let GCC vectorize the samplers' corner loads with hardware gathers;
                         default 1, except 0 on AMD CPUs (see _native_flags)
"""

import glob
import importlib.util
import os
import subprocess
import tempfile

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("GVSL_FAST_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _wheel_cuda_includes() -> list[str]:
    """Headers of the CUDA libraries that torch's CUDA wheel brings (cuSPARSE, cuBLAS, ...), which
    a bare toolkit with only nvcc may lack; ATen's CUDA headers include them."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return sorted(d for r in roots for d in glob.glob(os.path.join(r, "*", "include")))


def _compiles_with(flags: list[str]) -> bool:
    """Whether the C++ compiler that builds the extension accepts `flags`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cmd = [os.environ.get("CXX", "c++"), *flags, "-c", src, "-o", os.path.join(tmp, "p.o")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def _amd_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "AuthenticAMD" in f.read()
    except OSError:
        return False


def _native_flags() -> list[str]:
    """-march=native, and on AMD CPUs no hardware gathers. GCC 12 tunes Zen 3 to use vgatherdps
    for the samplers' eight corner loads, yet there they ran slower than the scalar loads GCC
    emits instead: warp forward 11.5 -> 6.8 ms, affine_flow_warp forward 39 -> 29 ms at
    1x1x128^3 on a 2-core EPYC (alternating builds, best of 15). Intel CPUs were only ever
    measured with the gathers (a Sapphire Rapids Xeon), so they keep them."""
    flags = ["-march=native"]
    if os.environ.get("GVSL_FAST_GATHER", "0" if _amd_cpu() else "1") == "0":
        no_gather = ["-mtune-ctrl=^use_gather_2parts,^use_gather_4parts,^use_gather"]
        if _compiles_with(no_gather):
            flags += no_gather
        else:  # a GCC option; other compilers keep their own choice
            print("gvsl-fast: the compiler does not take -mtune-ctrl; hardware gathers stay on")
    return flags


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math: lets GCC if-convert and vectorize the samplers' clamps and float-to-int
    # conversions (no kernel relies on floating-point traps)
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if os.environ.get("GVSL_FAST_PORTABLE", "0") != "1":
        cxx += _native_flags()
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if _want_cuda():
        if not torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["include_dirs"] += _wheel_cuda_includes()
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "gvsl_fast._C",
            sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension("gvsl_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=[
        "gvsl_fast",
        "gvsl_fast.ops",
        "gvsl_fast.models",
        "gvsl_fast.data",
        "gvsl_fast.train",
        "gvsl_fast.kernels",
    ],
    package_dir={"gvsl_fast.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
