// Host emulation of the CUDA execution model, for testing the CUDA sources without a GPU
// (included by csrc/cuda/launch.cuh when GVSL_CUDA_EMULATE is defined; never in a real build).
//
// Each CUDA thread is a fiber (ucontext) with its own stack, and one host thread runs them: the
// blocks of a grid one after another, so `__shared__` (a function-local static here) is one
// block's shared memory, and within a block every fiber until it reaches a barrier. A
// __syncthreads releases when every thread of the block has reached one (threads that have
// exited count as arrived, as on sm_70 and later); a warp shuffle writes its lane's value, waits
// for the 32 lanes of its warp, reads, and waits again. The threads start, and resume after each
// release, in a fresh pseudo-random order, so atomics add in an order that changes from launch
// to launch, as on a GPU. What a GPU would make undefined or fatal raises instead: threads
// stuck at different barriers (a divergent __syncthreads), a shuffle with lanes that have
// exited, and launches past the limits (1024 threads a block; grid axes y and z as the caller
// says: 65535 blocks).
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// One host thread runs every CUDA thread, so these are plain globals, set at each switch.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace gvsl::cuda::emulate {

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  State state = State::kReady;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;
  alignas(8) unsigned char lanes[1024][8];  // the values in flight in warp shuffles
};

inline Block* g_block = nullptr;
inline std::mutex g_launch;  // one emulated launch at a time (the statics are its shared memory)
inline std::vector<std::unique_ptr<char[]>> g_stacks;  // a fiber stack per thread of a block
inline unsigned long long g_order_seed = 0x9e3779b97f4a7c15ull;
constexpr size_t kStackBytes = 256 * 1024;

inline int thread_rank() {
  return int((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x);
}

inline dim3 thread_of(int rank) {
  return dim3(unsigned(rank % blockDim.x), unsigned(rank / blockDim.x % blockDim.y),
              unsigned(rank / (blockDim.x * blockDim.y)));
}

// The running fiber stops at a barrier and hands control back to the scheduler.
inline void wait_at(State barrier) {
  Fiber& f = g_block->fibers[g_block->current];
  f.state = barrier;
  swapcontext(&f.context, &g_block->scheduler);
}

inline void fiber_main() {
  g_block->body();
  g_block->fibers[g_block->current].state = State::kDone;  // then uc_link: the scheduler
}

// Resumes fibers until all are done; releases warp barriers, then block barriers.
inline void run_block(Block& b) {
  const int n = int(b.fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.state = State::kReady;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = g_stacks[i].get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  while (true) {
    for (int i = n - 1; i > 0; --i) {  // a new resume order (Fisher-Yates, LCG)
      g_order_seed = g_order_seed * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(order[i], order[int((g_order_seed >> 33) % unsigned(i + 1))]);
    }
    for (int i : order) {
      if (b.fibers[i].state != State::kReady) continue;
      b.current = i;
      threadIdx = thread_of(i);
      swapcontext(&b.scheduler, &b.fibers[i].context);
    }
    int done = 0, at_block = 0;
    bool released = false;
    for (int w = 0; w * 32 < n; ++w) {
      const int end = std::min(n, 32 * w + 32);
      int waiting = 0, exited = 0;
      for (int i = 32 * w; i < end; ++i) {
        waiting += b.fibers[i].state == State::kAtWarpBarrier;
        exited += b.fibers[i].state == State::kDone;
      }
      TORCH_CHECK(waiting == 0 || exited == 0, "CUDA emulation: a warp shuffle in block (",
                  blockIdx.x, ", ", blockIdx.y, ", ", blockIdx.z, ") with exited lanes");
      if (waiting == end - 32 * w) {
        for (int i = 32 * w; i < end; ++i) b.fibers[i].state = State::kReady;
        released = true;
      }
      done += exited;
    }
    if (done == n) return;
    if (!released) {
      for (const Fiber& f : b.fibers) at_block += f.state == State::kAtBlockBarrier;
      TORCH_CHECK(at_block + done == n, "CUDA emulation: threads of block (", blockIdx.x, ", ",
                  blockIdx.y, ", ", blockIdx.z, ") wait at different barriers (a divergent "
                  "__syncthreads or shuffle)");
      for (Fiber& f : b.fibers)
        if (f.state == State::kAtBlockBarrier) f.state = State::kReady;
    }
  }
}

// Runs body() as every thread of every block of `grid` (axes y and z at most `max_yz` blocks).
template <typename Body> void launch(dim3 grid, dim3 block, unsigned max_yz, Body&& body) {
  const long n = long(block.x) * block.y * block.z;
  TORCH_CHECK(n >= 1 && n <= 1024 && block.z <= 64, "CUDA emulation: invalid block size");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= max_yz && grid.z <= max_yz,
              "CUDA emulation: invalid configuration argument (grid ", grid.x, " x ", grid.y,
              " x ", grid.z, ")");
  const std::lock_guard<std::mutex> lock(g_launch);
  while (g_stacks.size() < size_t(n)) g_stacks.emplace_back(new char[kStackBytes]);
  Block b;
  b.fibers.resize(n);
  b.body = body;
  gridDim = grid;
  blockDim = block;
  g_block = &b;
  struct Reset {
    ~Reset() { g_block = nullptr; }
  } reset;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        run_block(b);
      }
}

struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

}  // namespace gvsl::cuda::emulate

inline void __syncthreads() {
  gvsl::cuda::emulate::wait_at(gvsl::cuda::emulate::State::kAtBlockBarrier);
}

template <typename T> T __shfl_down_sync(unsigned /*mask: full warps only*/, T v, int delta) {
  static_assert(sizeof(T) <= 8);
  using gvsl::cuda::emulate::State;
  auto& b = *gvsl::cuda::emulate::g_block;
  const int r = gvsl::cuda::emulate::thread_rank();
  const int width = std::min(32, int(blockDim.x * blockDim.y * blockDim.z) - r / 32 * 32);
  std::memcpy(b.lanes[r], &v, sizeof(T));
  gvsl::cuda::emulate::wait_at(State::kAtWarpBarrier);
  T out = v;  // a source lane past the warp's end: the lane keeps its own value
  if (r % 32 + delta < width) std::memcpy(&out, b.lanes[r + delta], sizeof(T));
  gvsl::cuda::emulate::wait_at(State::kAtWarpBarrier);  // all have read before the next write
  return out;
}

// One host thread: a plain add is atomic.
template <typename T> T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

inline long long __float2ll_rn(float x) { return std::llrint(x); }
inline long long __double2ll_rn(double x) { return std::llrint(x); }

template <typename T> T min(T a, T b) { return b < a ? b : a; }
template <typename T> T max(T a, T b) { return a < b ? b : a; }
