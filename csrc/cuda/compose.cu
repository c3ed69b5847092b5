// compose and affine_flow_warp on CUDA: indexing and launch only; the per-voxel math is
// csrc/compose.h, shared with the CPU kernels. One thread per output voxel, grid (blocks, B).
// Scatters (d flow, d image) are float atomics into fp32 buffers or, deterministic, int64
// fixed-point atomics (sampler.cuh's scatter_add); d theta goes through the
// sampler's theta moments (csrc/warp.h): reduced per block into (B, blocks, 12) partials, then
// summed in a fixed order (sampler.cuh's theta_grad_cuda), so it is reproducible.
#include "compose.h"
#include "compose_host.h"
#include "cuda/sampler.cuh"

namespace gvsl::cuda {
namespace {

struct Voxel {
  int d, h, w;
  bool valid;
};

// 32-bit index arithmetic (64-bit division is slow on the GPU); the ops check D*H*W < 2^31.
__device__ __forceinline__ Voxel voxel_of(int64_t i, const int* size) {
  Voxel v;
  v.valid = i < int64_t(size[0]) * size[1] * size[2];
  const unsigned j = unsigned(i), W = unsigned(size[2]), H = unsigned(size[1]);
  v.w = int(j % W);
  v.h = int((j / W) % H);
  v.d = int(j / (W * H));
  return v;
}

template <bool kWarp, typename S>
__global__ void compose_forward_kernel(ComposeArgs<S> a, S* out, Strides5 os, int b0) {
  using T = acc_t<S>;
  const int b = b0 + int(blockIdx.y);
  const Voxel v = voxel_of(int64_t(blockIdx.x) * blockDim.x + threadIdx.x, a.size);
  if (!v.valid) return;
  const AffineIndexMap<T> A = compose_map<T>(a, b);
  S* o = out + b * os.b + v.d * os.d + v.h * os.h + v.w * os.w;
  compose_forward_voxel<kWarp>(a, A, b, v.d, v.h, v.w,
                               [&](int c, T x) { o[c * os.c] = static_cast<S>(x); });
}

// With kFixed, `scales` holds the fixed-point scales of d image and d flow.
template <bool kWarp, bool kFixed, typename S>
__global__ void compose_backward_kernel(ComposeArgs<S> a, const S* grad, Strides5 gs,
                                        ComposeNeeds need, void* dimage, void* dflow,
                                        const float* __restrict__ scales, acc_t<S>* moments,
                                        int b0) {
  using T = acc_t<S>;
  const int b = b0 + int(blockIdx.y);
  const int64_t N = int64_t(a.size[0]) * a.size[1] * a.size[2];
  const Voxel v = voxel_of(int64_t(blockIdx.x) * blockDim.x + threadIdx.x, a.size);
  T m[kMoments] = {};
  if (v.valid) {
    const AffineIndexMap<T> A = compose_map<T>(a, b);
    const S* go = grad + b * gs.b + v.d * gs.d + v.h * gs.h + v.w * gs.w;
    const T si = kFixed ? T(scales[0]) : T(1), sf = kFixed ? T(scales[1]) : T(1);
    T gp[3];
    compose_backward_voxel<kWarp>(
        a, A, b, v.d, v.h, v.w, need, [&](int c) { return static_cast<T>(go[c * gs.c]); },
        [&](int k, int64_t off, T x) { scatter_add<kFixed>(dflow, (b * 3 + k) * N + off, x, sf); },
        [&](int c, int64_t off, T x) {
          scatter_add<kFixed>(dimage, (b * a.channels + c) * N + off, x, si);
        },
        gp);
    if (need.theta) theta_moments(gp, v.d, v.h, v.w, a.size, m);
  }
  if (need.theta) store_block_moments(m, moments + int64_t(b0) * gridDim.x * kMoments);
}

dim3 grid_of(const at::Tensor& flow) {
  const int64_t N = flow.size(2) * flow.size(3) * flow.size(4);
  TORCH_CHECK(N < (int64_t(1) << 31), "compose: at most 2^31 voxels per volume on CUDA");
  return dim3(unsigned((N + kThreads - 1) / kThreads), unsigned(flow.size(0)));
}

template <bool kWarp>
at::Tensor forward_cuda(const at::Tensor& theta, const at::Tensor& flow, const at::Tensor& image,
                        bool align_corners, int64_t padding) {
  check_compose_inputs(theta, flow, image, kDevice);
  const DeviceGuard guard(flow.device());
  at::Tensor out = at::empty_like(kWarp ? image : flow);
  const int64_t channels = kWarp ? image.size(1) : 3;
  GVSL_DISPATCH_FAST(flow.scalar_type(), "compose", [&] {
    const auto a = make_args<scalar_t>(theta, flow, image, channels, align_corners, padding);
    const dim3 grid = grid_of(flow);
    in_grid_slices(grid.y, [&](unsigned nb, int b0) {  // the batch on axis y
      launch(compose_forward_kernel<kWarp, scalar_t>, dim3(grid.x, nb), dim3(kThreads), a,
             out.data_ptr<scalar_t>(), strides5(out), b0);
    });
  });
  return out;
}

// Returns (d image, d theta, d flow); the ones not needed are empty.
template <bool kWarp>
std::vector<at::Tensor> backward_cuda(const at::Tensor& grad, const at::Tensor& theta,
                                      const at::Tensor& flow, const at::Tensor& image,
                                      bool align_corners, int64_t padding, bool deterministic,
                                      ComposeNeeds need) {
  check_compose_inputs(theta, flow, image, kDevice);
  check_grad(grad, kWarp ? image : flow);
  const DeviceGuard guard(flow.device());
  const dim3 grid = grid_of(flow);
  const bool fixed = deterministic && (need.image || need.flow);
  const auto acc = flow.options().dtype(fixed ? at::kLong : at::kFloat);
  at::Tensor dflow = need.flow ? at::zeros(flow.sizes(), acc) : at::Tensor();
  at::Tensor dimage = need.image ? at::zeros(image.sizes(), acc) : at::Tensor();
  at::Tensor moments;
  if (need.theta) moments = at::empty({flow.size(0), grid.x, kMoments}, acc.dtype(at::kFloat));
  at::Tensor scales;
  if (fixed) {
    // Each output voxel adds at most its largest scattered value (trilinear weights sum to 1):
    // |grad| to d image; to d flow |dL/dq| <= sum_c |grad_c| |d image_c / dq| <= C * max|grad|
    // * 2 max|image| (a trilinear derivative is a weighted mean of neighbour differences), or
    // max|grad| for compose.
    const int64_t N = flow.size(2) * flow.size(3) * flow.size(4);
    const at::Tensor peak = grad.abs().amax().to(at::kDouble);
    const at::Tensor peak_q =
        kWarp ? peak * image.abs().amax().to(at::kDouble) * double(2 * image.size(1)) : peak;
    scales = at::cat({fixed_point_scale(peak, N), fixed_point_scale(peak_q, N)});
  }
  at::Tensor dtheta;
  const int64_t channels = kWarp ? image.size(1) : 3;
  GVSL_DISPATCH_FAST(flow.scalar_type(), "compose", [&] {
    const auto a = make_args<scalar_t>(theta, flow, image, channels, align_corners, padding);
    void* di = need.image ? dimage.data_ptr() : nullptr;
    void* df = need.flow ? dflow.data_ptr() : nullptr;
    const float* sp = fixed ? scales.const_data_ptr<float>() : nullptr;
    float* mp = need.theta ? moments.data_ptr<float>() : nullptr;
    in_grid_slices(grid.y, [&](unsigned nb, int b0) {  // the batch on axis y
      const auto kernel = fixed ? compose_backward_kernel<kWarp, true, scalar_t>
                                : compose_backward_kernel<kWarp, false, scalar_t>;
      launch(kernel, dim3(grid.x, nb), dim3(kThreads), a, grad.data_ptr<scalar_t>(),
             strides5(grad), need, di, df, sp, mp, b0);
    });
    if (need.theta)
      dtheta = theta_grad_cuda<scalar_t>(moments, sizes_of(flow), align_corners, theta);
  });
  const auto opts = flow.options();
  const auto back = [&](const at::Tensor& t, int i) {
    return fixed ? from_fixed(t, scales[i], flow.scalar_type()) : t.to(flow.scalar_type());
  };
  return {
      need.image ? back(dimage, 0) : empty_grad(opts),
      need.theta ? dtheta : empty_grad(opts),
      need.flow ? back(dflow, 1) : empty_grad(opts),
  };
}

at::Tensor compose_fwd_cuda(const at::Tensor& theta, const at::Tensor& flow, bool align_corners,
                            int64_t padding, bool /*deterministic*/) {
  return forward_cuda<false>(theta, flow, flow, align_corners, padding);
}

std::vector<at::Tensor> compose_bwd_cuda(const at::Tensor& grad, const at::Tensor& theta,
                                         const at::Tensor& flow, bool align_corners,
                                         int64_t padding, bool deterministic, bool need_theta,
                                         bool need_flow) {
  auto out = backward_cuda<false>(grad, theta, flow, flow, align_corners, padding, deterministic,
                                  {false, need_theta, need_flow});
  return {out[1], out[2]};
}

at::Tensor affine_flow_warp_fwd_cuda(const at::Tensor& image, const at::Tensor& theta,
                                     const at::Tensor& flow, bool align_corners,
                                     int64_t padding, bool /*deterministic*/) {
  return forward_cuda<true>(theta, flow, image, align_corners, padding);
}

std::vector<at::Tensor> affine_flow_warp_bwd_cuda(const at::Tensor& grad,
                                                  const at::Tensor& image,
                                                  const at::Tensor& theta,
                                                  const at::Tensor& flow, bool align_corners,
                                                  int64_t padding, bool deterministic,
                                                  bool need_image, bool need_theta,
                                                  bool need_flow) {
  return backward_cuda<true>(grad, theta, flow, image, align_corners, padding, deterministic,
                             {need_image, need_theta, need_flow});
}

}  // namespace
}  // namespace gvsl::cuda

GVSL_CUDA_LIBRARY(m) {
  using gvsl::cuda::register_op;
  register_op(m, "compose_fwd", &gvsl::cuda::compose_fwd_cuda);
  register_op(m, "compose_bwd", &gvsl::cuda::compose_bwd_cuda);
  register_op(m, "affine_flow_warp_fwd", &gvsl::cuda::affine_flow_warp_fwd_cuda);
  register_op(m, "affine_flow_warp_bwd", &gvsl::cuda::affine_flow_warp_bwd_cuda);
}
