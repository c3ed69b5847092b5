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
from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
from torch.utils.cpp_extension import BuildExtension as TorchBuildExtension

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


# ISA macros of the C++ compiler, as /proc/cpuinfo names the features (x86; elsewhere none).
_ISA_MACROS = {
    "SSE4_2": "sse4_2", "AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI": "bmi1",
    "BMI2": "bmi2", "AVXVNNI": "avx_vnni", "AVX512F": "avx512f", "AVX512CD": "avx512cd",
    "AVX512BW": "avx512bw", "AVX512DQ": "avx512dq", "AVX512VL": "avx512vl",
    "AVX512VNNI": "avx512_vnni", "AVX512BF16": "avx512_bf16", "AVX512FP16": "avx512_fp16",
    "AVX512VBMI": "avx512vbmi", "AVX512IFMA": "avx512ifma", "AMX_TILE": "amx_tile",
    "AMX_BF16": "amx_bf16", "AMX_INT8": "amx_int8",
}


def _cpu_features(flags: list[str]) -> list[str]:
    """The CPU features that code compiled with `flags` may use (the compiler's ISA macros)."""
    cmd = [os.environ.get("CXX", "c++"), *flags, "-dM", "-E", "-x", "c++", os.devnull]
    done = subprocess.run(cmd, capture_output=True, text=True)
    defined = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define")}
    return sorted(name for macro, name in _ISA_MACROS.items() if f"__{macro}__" in defined)


class BuildExtension(TorchBuildExtension):
    """torch's build, then gvsl_fast/_build_info.py: what the extension was compiled for, which
    gvsl_fast checks against the machine before loading it (a -march=native build run on an older
    CPU would die of an illegal instruction; a GPU outside the CUDA targets would fail at the
    first launch). Written beside the built extension (the wheel's tree, and the source tree for
    in-place and editable builds), never by other setup.py commands such as sdist."""

    def run(self) -> None:
        super().run()
        (ext,) = self.extensions
        codes = []
        if any(src.endswith(".cu") for src in ext.sources):  # the -gencode flags nvcc was given
            from torch.utils.cpp_extension import _get_cuda_arch_flags

            codes = sorted({f.rsplit("code=", 1)[1] for f in _get_cuda_arch_flags()
                            if "code=" in f})
        text = ('"""What gvsl_fast._C was compiled for (written by setup.py; not tracked)."""\n\n'
                f"CPU_FEATURES = {tuple(_cpu_features(ext.extra_compile_args['cxx']))!r}\n"
                f"CUDA_CODES = {tuple(codes)!r}\n")
        dirs = [os.path.join(self.build_lib, "gvsl_fast")]
        if self.inplace or getattr(self, "editable_mode", False):
            dirs.append(os.path.join(ROOT, "gvsl_fast"))
        for d in dirs:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "_build_info.py"), "w") as f:
                f.write(text)


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
