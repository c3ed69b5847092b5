// Shared by the CPU (.cpp) and CUDA (.cu) translation units: the per-voxel math headers are
// compiled for both. The CPU backend batches much of that math in its own vectorized row loops,
// so the CPU-only tests also run the CUDA kernels themselves on the host (csrc/cuda/emulate.h,
// tests/test_cuda_emulated.py): the very arithmetic the CUDA kernels run.
#pragma once

#ifdef __CUDACC__
#define GVSL_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always inlined: a call in a row loop would keep it from vectorizing
#define GVSL_HD inline __attribute__((always_inline))
#else
#define GVSL_HD inline
#endif

#include <cmath>
#include <cstdint>

namespace gvsl {

// Accumulation type: float for float/half/bfloat16 inputs, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

GVSL_HD float gnearbyint(float x) { return nearbyintf(x); }
GVSL_HD double gnearbyint(double x) { return nearbyint(x); }

}  // namespace gvsl
