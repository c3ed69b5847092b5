#!/usr/bin/env bash
# Creates .venv and installs gvsl-fast with everything its tests need, building gvsl_fast._C:
# CPU kernels always; CUDA kernels when nvcc is found (CUDA_HOME, default /usr/local/cuda).
#   GVSL_FAST_TORCH   torch requirement (default torch==2.14.1, the CUDA build; a CPU-only
#                     torch such as torch==2.13.0 installs lighter but builds no CUDA kernels)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q "${GVSL_FAST_TORCH:-torch==2.14.1}" -r requirements-dev.txt
.venv/bin/pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import torch, gvsl_fast._C; print('gvsl_fast._C built; CUDA kernels:', torch.ops.gvsl_fast.cuda_built())"
