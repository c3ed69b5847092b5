// warp (displacement field) and grid_sample (normalized grid): schemas and CPU kernels.
// Both are the sampler skeleton of sampler.h with a FlowSource / GridSource.
#include <torch/library.h>

#include "cpu/sampler.h"
#include "sampler_host.h"

namespace gvsl::cpu {
namespace {

at::Tensor warp_forward(const at::Tensor& image, const at::Tensor& flow, int64_t mode,
                        int64_t padding, bool /*deterministic*/) {
  check_flow(image, flow);
  at::Tensor out = new_output(image, flow.sizes().slice(2));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "warp", [&] {
    forward(image.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), geometry(image, out),
            flow_source<scalar_t>(flow, nullptr), int(mode), int(padding));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> warp_backward(const at::Tensor& grad_out,
                                                 const at::Tensor& image, const at::Tensor& flow,
                                                 int64_t mode, int64_t padding,
                                                 bool /*deterministic: always on the CPU*/,
                                                 bool image_grad, bool flow_grad) {
  check_flow(image, flow);
  at::Tensor gflow = flow_grad ? at::empty_like(flow) : at::Tensor();
  at::Tensor gimg, moments;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "warp_bwd", [&] {
    gimg = backward<scalar_t>(grad_out, image, flow_source<scalar_t>(flow, flow_grad ? &gflow : nullptr),
                              int(mode), int(padding), image_grad, flow_grad, moments);
  });
  return {empty_if_undefined(gimg, image), empty_if_undefined(gflow, flow)};
}

at::Tensor grid_sample_forward(const at::Tensor& image, const at::Tensor& grid, int64_t mode,
                               int64_t padding, bool align_corners, bool /*deterministic*/) {
  check_grid(image, grid);
  at::Tensor out = new_output(image, grid.sizes().slice(1, 3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "grid_sample", [&] {
    forward(image.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), geometry(image, out),
            grid_source<scalar_t>(grid, nullptr, image, align_corners), int(mode), int(padding));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grid_sample_backward(
    const at::Tensor& grad_out, const at::Tensor& image, const at::Tensor& grid, int64_t mode,
    int64_t padding, bool align_corners, bool /*deterministic*/, bool image_grad, bool grid_grad) {
  check_grid(image, grid);
  at::Tensor ggrid = grid_grad ? at::empty_like(grid) : at::Tensor();
  at::Tensor gimg, moments;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "grid_bwd", [&] {
    gimg = backward<scalar_t>(
        grad_out, image, grid_source<scalar_t>(grid, grid_grad ? &ggrid : nullptr, image, align_corners),
        int(mode), int(padding), image_grad, grid_grad, moments);
  });
  return {empty_if_undefined(gimg, image), empty_if_undefined(ggrid, grid)};
}

}  // namespace
}  // namespace gvsl::cpu

TORCH_LIBRARY_FRAGMENT(gvsl_fast, m) {
  m.def("warp_forward(Tensor image, Tensor flow, int mode, int padding, bool deterministic) -> Tensor");
  m.def(
      "warp_backward(Tensor grad_out, Tensor image, Tensor flow, int mode, int padding, "
      "bool deterministic, bool image_grad, bool pos_grad) -> (Tensor, Tensor)");
  m.def(
      "grid_sample_forward(Tensor image, Tensor grid, int mode, int padding, bool align_corners, "
      "bool deterministic) -> Tensor");
  m.def(
      "grid_sample_backward(Tensor grad_out, Tensor image, Tensor grid, int mode, int padding, "
      "bool align_corners, bool deterministic, bool image_grad, bool pos_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gvsl_fast, CPU, m) {
  m.impl("warp_forward", &gvsl::cpu::warp_forward);
  m.impl("warp_backward", &gvsl::cpu::warp_backward);
  m.impl("grid_sample_forward", &gvsl::cpu::grid_sample_forward);
  m.impl("grid_sample_backward", &gvsl::cpu::grid_sample_backward);
}
