// Launch helper shared by the CUDA ops: grid axes y and z stop at 65535 blocks.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <algorithm>

namespace gvsl::cuda {

constexpr unsigned kMaxGridYZ = 65535;

// Launches `count` rows of blocks on grid axis y or z in slices of at most kMaxGridYZ:
// launch(n, first) for each slice (the kernel adds `first` to its blockIdx), each followed by the
// launch check.
template <class Launch> void in_grid_slices(unsigned count, Launch&& launch) {
  for (unsigned first = 0; first < count; first += kMaxGridYZ) {
    launch(std::min(kMaxGridYZ, count - first), int(first));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace gvsl::cuda
