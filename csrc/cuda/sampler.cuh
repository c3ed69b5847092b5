// CUDA kernels of the trilinear sampler shared by warp, grid_sample and affine_warp: one
// skeleton templated on the position source (csrc/warp.h). Each voxel's body is warp.h's
// sample_forward_voxel / sample_backward_voxel; the kernels add indexing, atomics and reductions.
// One thread per output voxel (grid.y = batch element), all channels in the thread, so the
// stencil is built once per voxel. Backward: position gradient by gather; image gradient by
// float atomics, or (deterministic) int64 fixed-point atomics, whose sums do not depend on order.
// theta: 12 moments reduced per block into a buffer, then summed per batch in a fixed order
// (theta_grad_cuda, also used by compose and affine_flow_warp).
#pragma once
#include <limits>

#include "cuda/launch.cuh"
#include "sampler_host.h"

namespace gvsl::cuda {

constexpr int kThreads = 256;

inline dim3 blocks(const Geometry& g, int64_t batch) {
  return dim3(unsigned((g.voxels() + kThreads - 1) / kThreads), unsigned(batch));
}

__device__ __forceinline__ void decode(const Geometry& g, int64_t v, int& d, int& h, int& w) {
  w = int(v % g.out_size[2]);
  h = int((v / g.out_size[2]) % g.out_size[1]);
  d = int(v / (int64_t(g.out_size[2]) * g.out_size[1]));
}

template <typename S, typename Src>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const S* __restrict__ img, S* __restrict__ out, Geometry g, Src src, int mode,
                   int padding, int b0) {
  const int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= g.voxels()) return;
  int d, h, w;
  decode(g, v, d, h, w);
  sample_forward_voxel(img, out, g, src, mode, padding, b0 + int(blockIdx.y), d, h, w);
}

__device__ __forceinline__ long long to_fixed(float x) { return __float2ll_rn(x); }
__device__ __forceinline__ long long to_fixed(double x) { return __double2ll_rn(x); }

// Adds x to buf[i]: a float atomic into an acc_t buffer or, with kFixed, an int64 atomic of
// x * scale rounded (integer sums do not depend on the order of the additions).
template <bool kFixed, typename T>
__device__ __forceinline__ void scatter_add(void* buf, int64_t i, T x, T scale) {
  if constexpr (kFixed)
    atomicAdd(static_cast<unsigned long long*>(buf) + i,
              static_cast<unsigned long long>(to_fixed(x * scale)));
  else
    atomicAdd(static_cast<T*>(buf) + i, x);
}

// Power-of-two scale (a 1-element float tensor on the device, no host sync) such that `count`
// additions of at most `peak` (a 0-dim bound on |x|) cannot overflow the int64 accumulator;
// capped so that it stays a finite float when the bound is tiny or zero. Computed in double: a
// bound past float's range (a product of two maxima) still gives a scale, as no scattered float
// exceeds float's largest. A non-finite bound (an inf or NaN among the scattered values, such as
// an fp16 overflow that a GradScaler must see) gives a NaN scale: the whole gradient comes out
// NaN instead of rounded integers that hide it.
inline at::Tensor fixed_point_scale(const at::Tensor& peak, int64_t count) {
  const auto p = peak.to(at::kDouble);
  const auto bound = at::where(p.isfinite(), p.clamp(1e-30, std::numeric_limits<float>::max()),
                               std::numeric_limits<double>::quiet_NaN());
  return at::exp2(at::floor(62.0 - at::log2(bound * double(count))).clamp_max(120.0))
      .to(at::kFloat)
      .reshape({1});
}

// A fixed-point accumulator back to `dtype`.
inline at::Tensor from_fixed(const at::Tensor& acc, const at::Tensor& scale,
                             at::ScalarType dtype) {
  return (acc.to(at::kDouble) / scale.to(at::kDouble)).to(dtype);
}

template <typename T> __device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;
}

// Block sum of 12 moments into partial[blockIdx.y][blockIdx.x][12] (fixed order).
template <typename T> __device__ void store_block_moments(T* m, T* partial) {
  __shared__ T sh[kThreads / 32][kMoments];
  const int lane = threadIdx.x % 32, wid = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < kMoments; ++i) {
    const T s = warp_sum(m[i]);
    if (lane == 0) sh[wid][i] = s;
  }
  __syncthreads();
  if (threadIdx.x < kMoments) {
    T s = T(0);
    for (int k = 0; k < kThreads / 32; ++k) s += sh[k][threadIdx.x];
    partial[(int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * kMoments + threadIdx.x] = s;
  }
}

// Output and input (D, H, W) of an affine map, by value for kernels.
struct AffineSizes {
  int out[3];
  int in[3];
};

// Output and input both the spatial size of x (B, C, D, H, W): affine_warp, compose.
inline AffineSizes sizes_of(const at::Tensor& x) {
  AffineSizes z;
  for (int i = 0; i < 3; ++i) z.out[i] = z.in[i] = int(x.size(2 + i));
  return z;
}

template <typename S>
__global__ void theta_grad_kernel(const double* moments, S* dtheta, int batch, AffineSizes z,
                                  bool align_corners) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  double out[kMoments];
  theta_grad_from_moments(moments + b * kMoments, z.out, z.in, align_corners, out);
  for (int i = 0; i < kMoments; ++i) dtheta[b * kMoments + i] = static_cast<S>(out[i]);
}

// d theta (B, 3, 4), in theta's dtype S, of per-block moments (B, blocks, 12): the blocks summed
// in a fixed order in double (reproducible), then turned into d theta by csrc/warp.h.
template <typename S>
at::Tensor theta_grad_cuda(const at::Tensor& moments, const AffineSizes& z, bool align_corners,
                           const at::Tensor& theta) {
  const int batch = int(theta.size(0));
  const at::Tensor sums = moments.sum(1, false, at::kDouble).contiguous();
  at::Tensor dtheta = at::empty({batch, 3, 4}, theta.options());
  launch(theta_grad_kernel<S>, dim3((batch + 127) / 128), dim3(128),
         sums.const_data_ptr<double>(), dtheta.data_ptr<S>(), batch, z, align_corners);
  return dtheta;
}

// Image gradient into `gimg` (acc_t<S>, or int64 fixed point with kFixed, image strides);
// position gradient through src (flow, grid) or into per-block moments (theta).
template <bool kImage, bool kPos, bool kFixed, typename S, typename Src>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const S* __restrict__ img, const S* __restrict__ gout, void* gimg,
                    const float* __restrict__ scale_ptr, acc_t<S>* moments, Geometry g, Src src,
                    int mode, int padding, int b0) {
  using T = acc_t<S>;
  const int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = v < g.voxels();
  const int b = b0 + int(blockIdx.y);
  int d = 0, h = 0, w = 0;
  T gp[3] = {T(0), T(0), T(0)};
  if (active) {
    decode(g, v, d, h, w);
    const T scale = kFixed ? T(*scale_ptr) : T(1);
    sample_backward_voxel<kImage, kPos>(
        img, gout, g, src, mode, padding, b, d, h, w,
        [&](int c, int64_t off, T x) {
          scatter_add<kFixed>(gimg, b * g.is[0] + c * g.is[1] + off, x, scale);
        },
        gp);
  }
  if constexpr (kPos) {
    if constexpr (Src::kind == kAffine) {
      T m[kMoments] = {};
      if (active) theta_moments(gp, d, h, w, g.out_size, m);
      store_block_moments(m, moments + int64_t(b0) * gridDim.x * kMoments);
    } else {
      if (active) src.store_grad(b, d, h, w, gp);
    }
  }
}

template <typename S, typename Src>
void launch_forward(const at::Tensor& image, at::Tensor& out, const Src& src, int mode,
                    int padding) {
  const Geometry g = geometry(image, out);
  if (g.voxels() == 0) return;
  const dim3 grid = blocks(g, image.size(0));
  in_grid_slices(grid.y, [&](unsigned nb, int b0) {  // the batch on axis y
    launch(forward_kernel<S, Src>, dim3(grid.x, nb), dim3(kThreads), image.const_data_ptr<S>(),
           out.data_ptr<S>(), g, src, mode, padding, b0);
  });
}

// Returns d image (undefined if not asked); for theta, `moments` receives (B, blocks, 12).
template <typename S, typename Src>
at::Tensor launch_backward(const at::Tensor& grad_out, const at::Tensor& image, const Src& src,
                           int mode, int padding, bool image_grad, bool pos_grad,
                           bool deterministic, at::Tensor& moments) {
  using T = acc_t<S>;
  const auto acc_type = c10::CppTypeToScalarType<T>::value;
  const Geometry g = geometry(image, grad_out);
  const dim3 grid = blocks(g, image.size(0));
  const bool fixed = image_grad && deterministic;
  at::Tensor gimg, scale;
  if (image_grad) {
    gimg = at::zeros_like(image, image.options().dtype(fixed ? at::kLong : acc_type));
    TORCH_CHECK(gimg.strides() == image.strides(), "gvsl_fast: gradient buffer layout");
  }
  // each output voxel adds at most max|grad_out| (trilinear weights sum to 1)
  if (fixed) scale = fixed_point_scale(grad_out.abs().amax(), g.voxels());
  if (pos_grad && Src::kind == kAffine)
    moments =
        at::empty({image.size(0), int64_t(grid.x), kMoments}, image.options().dtype(acc_type));
  // nothing to launch: the (zero) image gradient still goes back in the image's dtype, not as
  // the accumulation or fixed-point buffer
  if (g.voxels() == 0 || (!image_grad && !pos_grad))
    return image_grad ? gimg.to(image.scalar_type()) : gimg;
  void* gptr = image_grad ? gimg.data_ptr() : nullptr;
  const float* sptr = fixed ? scale.const_data_ptr<float>() : nullptr;
  T* mptr = moments.defined() ? moments.data_ptr<T>() : nullptr;
  const S* ip = image.const_data_ptr<S>();
  const S* gp = grad_out.const_data_ptr<S>();
#define GVSL_LAUNCH(I, P, F)                                                               \
  launch(backward_kernel<I, P, F, S, Src>, dim3(grid.x, nb), dim3(kThreads), ip, gp, gptr, sptr, \
         mptr, g, src, mode, padding, b0)
  in_grid_slices(grid.y, [&](unsigned nb, int b0) {  // the batch on axis y
    if (image_grad && pos_grad) {
      if (fixed) GVSL_LAUNCH(true, true, true); else GVSL_LAUNCH(true, true, false);
    } else if (image_grad) {
      if (fixed) GVSL_LAUNCH(true, false, true); else GVSL_LAUNCH(true, false, false);
    } else {
      GVSL_LAUNCH(false, true, false);
    }
  });
#undef GVSL_LAUNCH
  if (!image_grad) return gimg;
  if (fixed) return from_fixed(gimg, scale, image.scalar_type());
  return gimg.to(image.scalar_type());
}

}  // namespace gvsl::cuda
