// The CUDA ops' own sources, built for the host: csrc/cuda/launch.cuh with GVSL_CUDA_EMULATE
// runs their kernels through csrc/cuda/emulate.h (a fiber per CUDA thread), and their host
// code registers each op as a CPU op of torch.ops.gvsl_fast_cuda_emulated. Built by
// tests/conftest.py (the cuda_emulated fixture); tested by tests/test_cuda_emulated.py.
#include "cuda/affine_warp.cu"
#include "cuda/compose.cu"
#include "cuda/lncc.cu"
#include "cuda/warp.cu"
