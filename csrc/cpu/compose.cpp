// compose and affine_flow_warp on the CPU: op schemas and the CPU kernels. The per-voxel math is
// csrc/compose.h, shared with csrc/cuda/compose.cu.
//
// Parallel over (batch, depth) slabs. Scatters (d flow, d image) go to per-thread partial
// volumes summed afterwards in thread order; d theta is accumulated in double per slab and the
// slabs summed in a fixed order, so results do not depend on scheduling.
#include <ATen/Parallel.h>
#include <algorithm>
#include <torch/library.h>
#include <torch/torch.h>

#include "compose.h"
#include "compose_host.h"

namespace gvsl {
namespace {

// Slab functions are flattened: GCC otherwise leaves the per-voxel helpers out of line and the
// stencils travel through memory.
#define GVSL_FLATTEN __attribute__((flatten))

template <bool kWarp, typename S>
GVSL_FLATTEN void forward_slab(const ComposeArgs<S>& a, S* out, const Strides5& os, int b, int d) {
  using T = acc_t<S>;
  const AffineIndexMap<T> A = compose_map<T>(a, b);
  for (int h = 0; h < a.size[1]; ++h)
    for (int w = 0; w < a.size[2]; ++w) {
      S* o = out + b * os.b + d * os.d + h * os.h + w * os.w;
      compose_forward_voxel<kWarp>(a, A, b, d, h, w,
                                   [&](int c, T v) { o[c * os.c] = static_cast<S>(v); });
    }
}

template <bool kWarp, typename S>
void forward_cpu(const ComposeArgs<S>& a, S* out, const Strides5& os) {
  const int D = a.size[0];
  at::parallel_for(0, int64_t(a.batch) * D, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bd = lo; bd < hi; ++bd) forward_slab<kWarp>(a, out, os, int(bd / D), int(bd % D));
  });
}

// One (b, d) slab of the backward pass: scatters into this thread's partial volumes df / di,
// theta's gradient into th (12 values, double).
template <bool kWarp, typename S>
GVSL_FLATTEN void backward_slab(const ComposeArgs<S>& a, const S* g, const Strides5& gs,
                                ComposeNeeds need, acc_t<S>* df, acc_t<S>* di, double* th,
                                int b, int d) {
  using T = acc_t<S>;
  const int64_t N = int64_t(a.size[0]) * a.size[1] * a.size[2], C = a.channels;
  const AffineIndexMap<T> A = compose_map<T>(a, b);
  for (int h = 0; h < a.size[1]; ++h) {
    T row[12] = {0};  // one row in the accumulation type, then the slab in double
    for (int w = 0; w < a.size[2]; ++w) {
      const S* go = g + b * gs.b + d * gs.d + h * gs.h + w * gs.w;
      T gp[3];
      compose_backward_voxel<kWarp>(
          a, A, b, d, h, w, need, [&](int c) { return static_cast<T>(go[c * gs.c]); },
          [&](int k, int64_t off, T v) { df[(b * 3 + k) * N + off] += v; },
          [&](int c, int64_t off, T v) { di[(b * C + c) * N + off] += v; }, gp);
      if (need.theta) accumulate_theta_grad(gp, d, h, w, a.size, a.size, a.align_corners, row);
    }
    for (int j = 0; j < 12; ++j) th[j] += row[j];
  }
}

// Returns (d image, d theta, d flow); the ones not needed are empty.
template <bool kWarp, typename S>
std::vector<at::Tensor> backward_cpu(const ComposeArgs<S>& a, const at::Tensor& grad,
                                     ComposeNeeds need, const at::TensorOptions& opts) {
  using T = acc_t<S>;
  const int D = a.size[0], H = a.size[1], W = a.size[2];
  const int64_t B = a.batch, N = int64_t(D) * H * W;
  const int64_t C = a.channels;
  const int threads = at::get_num_threads();
  const auto acc = opts.dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor dflow = need.flow ? at::zeros({threads, B, 3, N}, acc) : at::Tensor();
  at::Tensor dimage = need.image ? at::zeros({threads, B, C, N}, acc) : at::Tensor();
  at::Tensor dtheta = need.theta ? at::zeros({B, D, 12}, opts.dtype(at::kDouble)) : at::Tensor();
  const S* g = grad.data_ptr<S>();
  const Strides5 gs = strides5(grad);
  at::parallel_for(0, B * D, 1, [&](int64_t lo, int64_t hi) {
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "compose: more threads than partial buffers");
    T* df = need.flow ? dflow.data_ptr<T>() + tid * B * 3 * N : nullptr;
    T* di = need.image ? dimage.data_ptr<T>() + tid * B * C * N : nullptr;
    for (int64_t bd = lo; bd < hi; ++bd) {
      double th[12] = {0};
      backward_slab<kWarp>(a, g, gs, need, df, di, th, int(bd / D), int(bd % D));
      if (need.theta) std::copy(th, th + 12, dtheta.data_ptr<double>() + bd * 12);
    }
  });
  const auto out_dtype = opts.dtype().toScalarType();
  return {
      need.image ? dimage.sum(0).view({B, C, D, H, W}).to(out_dtype) : empty_grad(opts),
      need.theta ? dtheta.sum(1).view({B, 3, 4}).to(out_dtype) : empty_grad(opts),
      need.flow ? dflow.sum(0).view({B, 3, D, H, W}).to(out_dtype) : empty_grad(opts),
  };
}

at::Tensor compose_fwd_cpu(const at::Tensor& theta, const at::Tensor& flow, bool align_corners,
                           int64_t padding) {
  check_compose_inputs(theta, flow, flow, at::kCPU);
  at::Tensor psi = at::empty_like(flow);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flow.scalar_type(), "compose", [&] {
    const auto a = make_args<scalar_t>(theta, flow, flow, 3, align_corners, padding);
    forward_cpu<false>(a, psi.data_ptr<scalar_t>(), strides5(psi));
  });
  return psi;
}

std::vector<at::Tensor> compose_bwd_cpu(const at::Tensor& grad, const at::Tensor& theta,
                                        const at::Tensor& flow, bool align_corners,
                                        int64_t padding, bool need_theta, bool need_flow) {
  check_compose_inputs(theta, flow, flow, at::kCPU);
  check_grad(grad, flow);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flow.scalar_type(), "compose", [&] {
    const auto a = make_args<scalar_t>(theta, flow, flow, 3, align_corners, padding);
    out = backward_cpu<false>(a, grad, {false, need_theta, need_flow}, flow.options());
  });
  return {out[1], out[2]};
}

at::Tensor affine_flow_warp_fwd_cpu(const at::Tensor& image, const at::Tensor& theta,
                                    const at::Tensor& flow, bool align_corners,
                                    int64_t padding) {
  check_compose_inputs(theta, flow, image, at::kCPU);
  at::Tensor out = at::empty_like(image);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flow.scalar_type(), "afw", [&] {
    const auto a = make_args<scalar_t>(theta, flow, image, image.size(1), align_corners, padding);
    forward_cpu<true>(a, out.data_ptr<scalar_t>(), strides5(out));
  });
  return out;
}

std::vector<at::Tensor> affine_flow_warp_bwd_cpu(const at::Tensor& grad, const at::Tensor& image,
                                                 const at::Tensor& theta, const at::Tensor& flow,
                                                 bool align_corners, int64_t padding,
                                                 bool need_image, bool need_theta,
                                                 bool need_flow) {
  check_compose_inputs(theta, flow, image, at::kCPU);
  check_grad(grad, image);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flow.scalar_type(), "afw", [&] {
    const auto a = make_args<scalar_t>(theta, flow, image, image.size(1), align_corners, padding);
    out = backward_cpu<true>(a, grad, {need_image, need_theta, need_flow}, flow.options());
  });
  return out;
}

}  // namespace
}  // namespace gvsl

TORCH_LIBRARY_FRAGMENT(gvsl_fast, m) {
  m.def("compose_fwd(Tensor theta, Tensor flow, bool align_corners, int padding) -> Tensor");
  m.def(
      "compose_bwd(Tensor grad, Tensor theta, Tensor flow, bool align_corners, int padding, "
      "bool need_theta, bool need_flow) -> Tensor[]");
  m.def(
      "affine_flow_warp_fwd(Tensor image, Tensor theta, Tensor flow, bool align_corners, "
      "int padding) -> Tensor");
  m.def(
      "affine_flow_warp_bwd(Tensor grad, Tensor image, Tensor theta, Tensor flow, "
      "bool align_corners, int padding, bool need_image, bool need_theta, bool need_flow) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(gvsl_fast, CPU, m) {
  m.impl("compose_fwd", &gvsl::compose_fwd_cpu);
  m.impl("compose_bwd", &gvsl::compose_bwd_cpu);
  m.impl("affine_flow_warp_fwd", &gvsl::affine_flow_warp_fwd_cpu);
  m.impl("affine_flow_warp_bwd", &gvsl::affine_flow_warp_bwd_cpu);
}
