// affine_warp: CUDA launch code. theta is folded per batch element into the index-space map of
// csrc/sampling.h by a one-block kernel; the sampler skeleton of sampler.cuh runs with an
// AffineSource; the theta gradient is the per-block moments summed per batch in a fixed order
// (a deterministic reduction, no float atomics) and turned into d theta by csrc/warp.h.
#include "cuda/sampler.cuh"
#include "sampler_host.h"

namespace gvsl::cuda {
namespace {

template <typename T, typename S>
__global__ void index_maps_kernel(const S* theta, AffineIndexMap<T>* maps, int batch,
                                  AffineSizes z, bool align_corners) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b < batch) maps[b] = affine_index_map<T>(theta + b * 12, z.out, z.in, align_corners);
}

// Maps in a byte buffer that lives as long as the returned tensor.
template <typename T, typename S>
at::Tensor index_maps(const at::Tensor& theta, const AffineSizes& z, bool align_corners) {
  const int batch = int(theta.size(0));
  auto buf = at::empty({int64_t(batch * sizeof(AffineIndexMap<T>))},
                       theta.options().dtype(at::kByte));
  const at::Tensor th = theta.contiguous();
  launch(index_maps_kernel<T, S>, dim3((batch + 127) / 128), dim3(128), th.const_data_ptr<S>(),
         reinterpret_cast<AffineIndexMap<T>*>(buf.data_ptr()), batch, z, align_corners);
  return buf;
}

template <typename T>
AffineSource<T> affine_source(const at::Tensor& maps) {
  return AffineSource<T>{reinterpret_cast<const AffineIndexMap<T>*>(maps.const_data_ptr())};
}

at::Tensor affine_warp_forward(const at::Tensor& image, const at::Tensor& theta, int64_t padding,
                               bool align_corners, bool /*deterministic*/) {
  check_theta(image, theta);
  const DeviceGuard guard(image.device());  // launch on the inputs' device and stream
  at::Tensor out = new_output(image, image.sizes().slice(2));
  const AffineSizes z = sizes_of(image);
  GVSL_DISPATCH_FAST(image.scalar_type(), "affine", [&] {
    using T = acc_t<scalar_t>;
    const at::Tensor maps = index_maps<T, scalar_t>(theta, z, align_corners);
    launch_forward<scalar_t>(image, out, affine_source<T>(maps), kBilinear, int(padding));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> affine_warp_backward(
    const at::Tensor& grad_out, const at::Tensor& image, const at::Tensor& theta, int64_t padding,
    bool align_corners, bool deterministic, bool image_grad, bool theta_grad) {
  check_theta(image, theta);
  const DeviceGuard guard(image.device());
  const AffineSizes z = sizes_of(image);
  at::Tensor gimg, gtheta;
  GVSL_DISPATCH_FAST(image.scalar_type(), "affine_bwd", [&] {
    using T = acc_t<scalar_t>;
    const at::Tensor maps = index_maps<T, scalar_t>(theta, z, align_corners);
    at::Tensor moments;
    gimg = launch_backward<scalar_t>(grad_out, image, affine_source<T>(maps), kBilinear,
                                     int(padding), image_grad, theta_grad, deterministic, moments);
    if (theta_grad) gtheta = theta_grad_cuda<scalar_t>(moments, z, align_corners, theta);
  });
  return {empty_if_undefined(gimg, image), empty_if_undefined(gtheta, theta)};
}

}  // namespace
}  // namespace gvsl::cuda

GVSL_CUDA_LIBRARY(m) {
  using gvsl::cuda::register_op;
  register_op(m, "affine_warp_forward", &gvsl::cuda::affine_warp_forward);
  register_op(m, "affine_warp_backward", &gvsl::cuda::affine_warp_backward);
}
