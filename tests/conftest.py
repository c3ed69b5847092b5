import os
from pathlib import Path

import pytest
import torch

# Triton kernels run under the interpreter on CPU tensors where no GPU exists (set before any
# kernel module is imported); on a GPU machine they compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cuda_voxel_math(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The CUDA kernels' per-voxel functions run on the host (tests/csrc/cuda_voxel_math.cpp),
    built once per session: ``torch.ops.gvsl_voxel_math``. The build lives in pytest's cache
    (ninja rebuilds it when a csrc header changes), or in a temporary directory without one."""
    from torch.utils.cpp_extension import load

    cache = getattr(request.config, "cache", None)
    build = cache.mkdir("cuda_voxel_math") if cache else tmp_path_factory.mktemp("voxel_math")
    load(
        name="cuda_voxel_math",
        sources=[str(ROOT / "tests" / "csrc" / "cuda_voxel_math.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O1"],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.gvsl_voxel_math
