// warp (displacement field) and grid_sample (normalized grid): schemas and CPU kernels.
// Both are the sampler skeleton of sampler.h with a FlowSource / GridSource.
#include <torch/library.h>

#include "cpu/sampler.h"

namespace gvsl::cpu {
namespace {

void check_common(const at::Tensor& image, const at::Tensor& pos, const char* pos_name) {
  TORCH_CHECK(image.dim() == 5, "gvsl_fast: image must be (B, C, D, H, W)");
  TORCH_CHECK(pos.device() == image.device(), "gvsl_fast: ", pos_name, " and image devices differ");
  TORCH_CHECK(pos.scalar_type() == image.scalar_type(), "gvsl_fast: ", pos_name,
              " and image dtypes differ");
  TORCH_CHECK(pos.size(0) == image.size(0), "gvsl_fast: ", pos_name, " batch != image batch");
}

void check_flow(const at::Tensor& image, const at::Tensor& flow) {
  check_common(image, flow, "flow");
  TORCH_CHECK(flow.dim() == 5 && flow.size(1) == 3 && flow.size(2) == image.size(2) &&
                  flow.size(3) == image.size(3) && flow.size(4) == image.size(4),
              "gvsl_fast.warp: flow must be (B, 3, D, H, W) with the image's B, D, H, W");
}

void check_grid(const at::Tensor& image, const at::Tensor& grid) {
  check_common(image, grid, "grid");
  TORCH_CHECK(grid.dim() == 5 && grid.size(4) == 3,
              "gvsl_fast.grid_sample: grid must be (B, D', H', W', 3)");
}

template <typename S> FlowSource<S> flow_source(const at::Tensor& flow, at::Tensor* grad) {
  FlowSource<S> s;
  s.flow = flow.const_data_ptr<S>();
  s.grad = grad ? grad->data_ptr<S>() : nullptr;
  TORCH_CHECK(!grad || grad->strides() == flow.strides(), "gvsl_fast: flow gradient layout");
  s.sb = flow.stride(0);
  s.sc = flow.stride(1);
  s.sd = flow.stride(2);
  s.sh = flow.stride(3);
  s.sw = flow.stride(4);
  return s;
}

template <typename S>
GridSource<S> grid_source(const at::Tensor& grid, at::Tensor* grad, const at::Tensor& image,
                          bool align_corners) {
  GridSource<S> s;
  s.grid = grid.const_data_ptr<S>();
  s.grad = grad ? grad->data_ptr<S>() : nullptr;
  TORCH_CHECK(!grad || grad->strides() == grid.strides(), "gvsl_fast: grid gradient layout");
  s.sb = grid.stride(0);
  s.sd = grid.stride(1);
  s.sh = grid.stride(2);
  s.sw = grid.stride(3);
  s.sc = grid.stride(4);
  for (int i = 0; i < 3; ++i) s.in_size[i] = int(image.size(2 + i));
  s.align_corners = align_corners;
  return s;
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
