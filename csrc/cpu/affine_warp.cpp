// affine_warp: grid_sample(image, affine_grid(theta)) with no grid tensor. Schemas and CPU
// kernels: the sampler skeleton of sampler.h with an AffineSource (the index-space map of each
// batch element's theta); the theta gradient comes from per-row moments summed in fixed order.
#include <torch/library.h>

#include <vector>

#include "cpu/sampler.h"
#include "sampler_host.h"

namespace gvsl::cpu {
namespace {

// One index-space map per batch element, in the accumulation type.
template <typename T, typename S>
std::vector<AffineIndexMap<T>> index_maps(const at::Tensor& theta, const Geometry& g,
                                          bool align_corners) {
  const at::Tensor th = theta.contiguous();
  const S* p = th.const_data_ptr<S>();
  std::vector<AffineIndexMap<T>> maps(g.B);
  for (int b = 0; b < g.B; ++b)
    maps[b] = affine_index_map<T>(p + b * 12, g.out_size, g.in_size, align_corners);
  return maps;
}

at::Tensor affine_warp_forward(const at::Tensor& image, const at::Tensor& theta, int64_t padding,
                               bool align_corners, bool /*deterministic*/) {
  check_theta(image, theta);
  at::Tensor out = new_output(image, image.sizes().slice(2));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "affine_warp", [&] {
    using T = acc_t<scalar_t>;
    const Geometry g = geometry(image, out);
    const auto maps = index_maps<T, scalar_t>(theta, g, align_corners);
    forward(image.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g,
            AffineSource<T>{maps.data()}, kBilinear, int(padding));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> affine_warp_backward(
    const at::Tensor& grad_out, const at::Tensor& image, const at::Tensor& theta, int64_t padding,
    bool align_corners, bool /*deterministic: always on the CPU*/, bool image_grad,
    bool theta_grad) {
  check_theta(image, theta);
  at::Tensor gimg, gtheta;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "affine_bwd", [&] {
    using T = acc_t<scalar_t>;
    const Geometry g = geometry(image, grad_out);
    const auto maps = index_maps<T, scalar_t>(theta, g, align_corners);
    at::Tensor moments;
    gimg = backward<scalar_t>(grad_out, image, AffineSource<T>{maps.data()}, kBilinear,
                              int(padding), image_grad, theta_grad, moments);
    if (theta_grad) gtheta = theta_grad_cpu(moments, g, align_corners, theta);
  });
  return {empty_if_undefined(gimg, image), empty_if_undefined(gtheta, theta)};
}

}  // namespace
}  // namespace gvsl::cpu

TORCH_LIBRARY_FRAGMENT(gvsl_fast, m) {
  m.def(
      "affine_warp_forward(Tensor image, Tensor theta, int padding, bool align_corners, "
      "bool deterministic) -> Tensor");
  m.def(
      "affine_warp_backward(Tensor grad_out, Tensor image, Tensor theta, int padding, "
      "bool align_corners, bool deterministic, bool image_grad, bool pos_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gvsl_fast, CPU, m) {
  m.impl("affine_warp_forward", &gvsl::cpu::affine_warp_forward);
  m.impl("affine_warp_backward", &gvsl::cpu::affine_warp_backward);
}
