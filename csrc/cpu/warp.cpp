// warp (displacement field) and grid_sample (normalized grid): schemas and CPU kernels.
// Both are the sampler skeleton of sampler.h with a FlowSource / GridSource.
#include <torch/library.h>

#include "cpu/memory.h"
#include "cpu/sampler.h"
#include "sampler_host.h"

namespace gvsl::cpu {
namespace {

// grad_out (B, C, D', H', W') and a saved derivative that new_saved_derivative made for it.
void check_saved(const at::Tensor& grad_out, const at::Tensor& dpos, const at::Tensor& image) {
  TORCH_CHECK(grad_out.dim() == 5 && grad_out.size(0) == image.size(0) &&
                  grad_out.size(1) == image.size(1) && grad_out.scalar_type() == image.scalar_type(),
              "gvsl_fast: grad_out must be (B, C, D', H', W') in the image's dtype");
  TORCH_CHECK(dpos.is_contiguous() && dpos.dim() == 5 && dpos.size(0) == grad_out.size(0) &&
                  dpos.size(1) == 3 * grad_out.size(1) &&
                  dpos.sizes().slice(2) == grad_out.sizes().slice(2) &&
                  dpos.scalar_type() == acc_dtype(image),
              "gvsl_fast: the saved position derivative does not match grad_out");
}

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

// The position derivative that a forward saves: (B, 3C, D', H', W'), contiguous, in the
// accumulation type (sampler.h's saved_offset).
at::Tensor new_saved_derivative(const at::Tensor& image, const at::Tensor& out) {
  return huge_pages(at::empty({out.size(0), 3 * out.size(1), out.size(2), out.size(3), out.size(4)},
                              image.options().dtype(acc_dtype(image))));
}

// warp_forward that also saves d out / d position, for a backward wanting only d flow.
std::tuple<at::Tensor, at::Tensor> warp_forward_saved(const at::Tensor& image,
                                                      const at::Tensor& flow, int64_t mode,
                                                      int64_t padding) {
  check_flow(image, flow);
  at::Tensor out = new_output(image, flow.sizes().slice(2));
  at::Tensor dpos = new_saved_derivative(image, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "warp_saved", [&] {
    forward(image.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), geometry(image, out),
            flow_source<scalar_t>(flow, nullptr), int(mode), int(padding),
            dpos.data_ptr<acc_t<scalar_t>>());
  });
  return {out, dpos};
}

at::Tensor warp_backward_saved(const at::Tensor& grad_out, const at::Tensor& dpos,
                               const at::Tensor& image, const at::Tensor& flow,
                               int64_t /*mode*/, int64_t /*padding*/) {
  check_flow(image, flow);
  check_saved(grad_out, dpos, image);
  at::Tensor gflow = huge_pages(at::empty_like(flow));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "warp_bwd_saved", [&] {
    backward_saved(grad_out.const_data_ptr<scalar_t>(), dpos.const_data_ptr<acc_t<scalar_t>>(),
                   geometry(image, grad_out), flow_source<scalar_t>(flow, &gflow));
  });
  return gflow;
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

std::tuple<at::Tensor, at::Tensor> grid_sample_forward_saved(const at::Tensor& image,
                                                             const at::Tensor& grid, int64_t mode,
                                                             int64_t padding, bool align_corners) {
  check_grid(image, grid);
  at::Tensor out = new_output(image, grid.sizes().slice(1, 3));
  at::Tensor dpos = new_saved_derivative(image, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "grid_saved", [&] {
    forward(image.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), geometry(image, out),
            grid_source<scalar_t>(grid, nullptr, image, align_corners), int(mode), int(padding),
            dpos.data_ptr<acc_t<scalar_t>>());
  });
  return {out, dpos};
}

at::Tensor grid_sample_backward_saved(const at::Tensor& grad_out, const at::Tensor& dpos,
                                      const at::Tensor& image, const at::Tensor& grid,
                                      int64_t /*mode*/, int64_t /*padding*/, bool align_corners) {
  check_grid(image, grid);
  check_saved(grad_out, dpos, image);
  at::Tensor ggrid = huge_pages(at::empty_like(grid));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "grid_bwd_saved", [&] {
    backward_saved(grad_out.const_data_ptr<scalar_t>(), dpos.const_data_ptr<acc_t<scalar_t>>(),
                   geometry(image, grad_out),
                   grid_source<scalar_t>(grid, &ggrid, image, align_corners));
  });
  return ggrid;
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
  // CPU only: the forward also saves d out / d position (3C floats per output voxel) so that
  // a backward wanting only the position gradient skips the stencils.
  m.def("warp_forward_saved(Tensor image, Tensor flow, int mode, int padding) -> (Tensor, Tensor)");
  m.def(
      "warp_backward_saved(Tensor grad_out, Tensor dpos, Tensor image, Tensor flow, int mode, "
      "int padding) -> Tensor");
  m.def(
      "grid_sample_forward_saved(Tensor image, Tensor grid, int mode, int padding, "
      "bool align_corners) -> (Tensor, Tensor)");
  m.def(
      "grid_sample_backward_saved(Tensor grad_out, Tensor dpos, Tensor image, Tensor grid, "
      "int mode, int padding, bool align_corners) -> Tensor");
}

TORCH_LIBRARY_IMPL(gvsl_fast, CPU, m) {
  m.impl("warp_forward_saved", &gvsl::cpu::warp_forward_saved);
  m.impl("warp_backward_saved", &gvsl::cpu::warp_backward_saved);
  m.impl("grid_sample_forward_saved", &gvsl::cpu::grid_sample_forward_saved);
  m.impl("grid_sample_backward_saved", &gvsl::cpu::grid_sample_backward_saved);
  m.impl("warp_forward", &gvsl::cpu::warp_forward);
  m.impl("warp_backward", &gvsl::cpu::warp_backward);
  m.impl("grid_sample_forward", &gvsl::cpu::grid_sample_forward);
  m.impl("grid_sample_backward", &gvsl::cpu::grid_sample_backward);
}
