import os
from pathlib import Path

import pytest
import torch

# Triton kernels run under the interpreter on CPU tensors where no GPU exists (set before any
# kernel module is imported); on a GPU machine they compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]


# nvcc contracts a * b + c into fused multiply-adds by default; so does GCC at -O2 where the CPU
# has them (every AVX2 CPU), so the emulated kernels meet the precision hazards that this brings.
_FMA_FLAGS = (["-mfma", "-ffp-contract=fast"]
              if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else [])


# Set (with libasan preloaded) by tests/test_cuda_emulated.py's AddressSanitizer run.
EMULATE_ASAN = "GVSL_FAST_EMULATE_ASAN"


@pytest.fixture(scope="session")
def cuda_emulated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The CUDA ops' sources built for the host (tests/csrc/cuda_emulated.cpp), once per session:
    ``torch.ops.gvsl_fast_cuda_emulated``, with the schemas of ``torch.ops.gvsl_fast``. With
    GVSL_FAST_EMULATE_ASAN=1, built with AddressSanitizer instead. The build lives in pytest's
    cache (ninja rebuilds it when a source changes), or in a temporary directory without one."""
    from torch.utils.cpp_extension import load

    asan = os.environ.get(EMULATE_ASAN) == "1"
    name = "cuda_emulated_asan" if asan else "cuda_emulated"
    cache = getattr(request.config, "cache", None)
    build = cache.mkdir(name) if cache else tmp_path_factory.mktemp(name)
    flags = (["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"] if asan
             else ["-O2", *_FMA_FLAGS])
    load(
        name=name,
        sources=[str(ROOT / "tests" / "csrc" / "cuda_emulated.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-std=c++20", "-DGVSL_CUDA_EMULATE", "-Wno-unknown-pragmas", *flags],
        extra_ldflags=["-fsanitize=address"] if asan else [],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.gvsl_fast_cuda_emulated
