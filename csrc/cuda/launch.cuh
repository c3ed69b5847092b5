// How the CUDA ops reach the GPU: kernel launches (checked, on the current stream, grid axes y
// and z sliced to their limit), the device guard, the dtype dispatch and the op registration.
// Everything device-specific that the host code of csrc/cuda/*.cu uses goes through here, so that
// the same sources also build for the host with GVSL_CUDA_EMULATE: csrc/cuda/emulate.h then runs
// each CUDA thread as a fiber on the host, and the ops register as CPU ops of the library
// gvsl_fast_cuda_emulated (tests/test_cuda_emulated.py).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#ifdef GVSL_CUDA_EMULATE
#include "cuda/emulate.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

// float, half and bfloat16 (float64 stays on the CPU backend).
#define GVSL_DISPATCH_FAST(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace gvsl::cuda {

constexpr unsigned kGridYZLimit = 65535;  // the GPU's gridDim.y and gridDim.z

#ifdef GVSL_CUDA_EMULATE
// Host fibers (the launch checks the GPU's limits); slices of 2 rows, so that the tests' small
// batches take several launches.
constexpr at::DeviceType kDevice = at::kCPU;
constexpr unsigned kMaxGridYZ = 2;
using DeviceGuard = emulate::DeviceGuard;
inline int multiprocessors() { return 132; }  // an H100 SXM, for lncc's depth chunking

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
  emulate::launch(grid, block, kGridYZLimit, [&] { kernel(args...); });
}

// The emulated library has no schemas of its own: each op is defined from its C++ signature.
#define GVSL_CUDA_LIBRARY(m) TORCH_LIBRARY_FRAGMENT(gvsl_fast_cuda_emulated, m)
template <typename F> void register_op(torch::Library& m, const char* name, F* fn) {
  m.def(name, fn);
}
#else
constexpr at::DeviceType kDevice = at::kCUDA;
constexpr unsigned kMaxGridYZ = kGridYZLimit;
using DeviceGuard = c10::cuda::CUDAGuard;  // launch on the inputs' device and stream
inline int multiprocessors() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// kernel<<<grid, block>>>(args...) on the current stream, then the launch check.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
  kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define GVSL_CUDA_LIBRARY(m) TORCH_LIBRARY_IMPL(gvsl_fast, CUDA, m)
template <typename F> void register_op(torch::Library& m, const char* name, F* fn) {
  m.impl(name, fn);
}
#endif

// Launches `count` rows of blocks on grid axis y or z in slices of at most kMaxGridYZ:
// launch(n, first) for each slice (the kernel adds `first` to its blockIdx).
template <class Launch> void in_grid_slices(unsigned count, Launch&& launch) {
  for (unsigned first = 0; first < count; first += kMaxGridYZ)
    launch(std::min(kMaxGridYZ, count - first), int(first));
}

}  // namespace gvsl::cuda
