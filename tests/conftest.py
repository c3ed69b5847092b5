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


@pytest.fixture(scope="session")
def cuda_emulated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The CUDA ops' sources built for the host (tests/csrc/cuda_emulated.cpp), once per session:
    ``torch.ops.gvsl_fast_cuda_emulated``, with the schemas of ``torch.ops.gvsl_fast``. The build
    lives in pytest's cache (ninja rebuilds it when a source changes), or in a temporary
    directory without one."""
    from torch.utils.cpp_extension import load

    cache = getattr(request.config, "cache", None)
    build = cache.mkdir("cuda_emulated") if cache else tmp_path_factory.mktemp("cuda_emulated")
    load(
        name="cuda_emulated",
        sources=[str(ROOT / "tests" / "csrc" / "cuda_emulated.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2", "-std=c++20", "-DGVSL_CUDA_EMULATE", "-Wno-unknown-pragmas",
                      *_FMA_FLAGS],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.gvsl_fast_cuda_emulated
