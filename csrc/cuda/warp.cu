// warp and grid_sample: CUDA launch code (indexing and dispatch only; the math is csrc/warp.h,
// the kernels the skeleton of sampler.cuh with a FlowSource / GridSource).
#include "cuda/sampler.cuh"
#include "sampler_host.h"

namespace gvsl::cuda {
namespace {

at::Tensor warp_forward(const at::Tensor& image, const at::Tensor& flow, int64_t mode,
                        int64_t padding, bool /*deterministic*/) {
  check_flow(image, flow);
  const DeviceGuard guard(image.device());  // launch on the inputs' device and stream
  at::Tensor out = new_output(image, flow.sizes().slice(2));
  GVSL_DISPATCH_FAST(image.scalar_type(), "warp", [&] {
    launch_forward<scalar_t>(image, out, flow_source<scalar_t>(flow, nullptr), int(mode),
                             int(padding));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> warp_backward(const at::Tensor& grad_out,
                                                 const at::Tensor& image, const at::Tensor& flow,
                                                 int64_t mode, int64_t padding, bool deterministic,
                                                 bool image_grad, bool flow_grad) {
  check_flow(image, flow);
  const DeviceGuard guard(image.device());
  at::Tensor gflow = flow_grad ? at::empty_like(flow) : at::Tensor();
  at::Tensor gimg, moments;
  GVSL_DISPATCH_FAST(image.scalar_type(), "warp_bwd", [&] {
    gimg = launch_backward<scalar_t>(grad_out, image,
                                     flow_source<scalar_t>(flow, flow_grad ? &gflow : nullptr),
                                     int(mode), int(padding), image_grad, flow_grad,
                                     deterministic, moments);
  });
  return {empty_if_undefined(gimg, image), empty_if_undefined(gflow, flow)};
}

at::Tensor grid_sample_forward(const at::Tensor& image, const at::Tensor& grid, int64_t mode,
                               int64_t padding, bool align_corners, bool /*deterministic*/) {
  check_grid(image, grid);
  const DeviceGuard guard(image.device());
  at::Tensor out = new_output(image, grid.sizes().slice(1, 3));
  GVSL_DISPATCH_FAST(image.scalar_type(), "grid", [&] {
    launch_forward<scalar_t>(image, out, grid_source<scalar_t>(grid, nullptr, image, align_corners),
                             int(mode), int(padding));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grid_sample_backward(
    const at::Tensor& grad_out, const at::Tensor& image, const at::Tensor& grid, int64_t mode,
    int64_t padding, bool align_corners, bool deterministic, bool image_grad, bool grid_grad) {
  check_grid(image, grid);
  const DeviceGuard guard(image.device());
  at::Tensor ggrid = grid_grad ? at::empty_like(grid) : at::Tensor();
  at::Tensor gimg, moments;
  GVSL_DISPATCH_FAST(image.scalar_type(), "grid_bwd", [&] {
    gimg = launch_backward<scalar_t>(
        grad_out, image,
        grid_source<scalar_t>(grid, grid_grad ? &ggrid : nullptr, image, align_corners),
        int(mode), int(padding), image_grad, grid_grad, deterministic, moments);
  });
  return {empty_if_undefined(gimg, image), empty_if_undefined(ggrid, grid)};
}

}  // namespace
}  // namespace gvsl::cuda

GVSL_CUDA_LIBRARY(m) {
  using gvsl::cuda::register_op;
  register_op(m, "warp_forward", &gvsl::cuda::warp_forward);
  register_op(m, "warp_backward", &gvsl::cuda::warp_backward);
  register_op(m, "grid_sample_forward", &gvsl::cuda::grid_sample_forward);
  register_op(m, "grid_sample_backward", &gvsl::cuda::grid_sample_backward);
}
