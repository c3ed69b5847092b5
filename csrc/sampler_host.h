// Host-side helpers of the sampler ops shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// translation units: argument checks, output allocation and the position sources' setup.
#pragma once
#include <ATen/ATen.h>

#include "warp.h"

namespace gvsl {

// `out` is any tensor of the output's shape (B, C, D', H', W').
inline Geometry geometry(const at::Tensor& image, const at::Tensor& out) {
  Geometry g;
  g.B = int(image.size(0));
  g.C = int(image.size(1));
  for (int i = 0; i < 3; ++i) {
    g.in_size[i] = int(image.size(2 + i));
    g.out_size[i] = int(out.size(2 + i));
  }
  for (int i = 0; i < 5; ++i) {
    g.is[i] = image.stride(i);
    g.os[i] = out.stride(i);
  }
  return g;
}

// Output (B, C, D', H', W'): channels_last_3d only for an image strictly in that layout
// (the same rule as gvsl_fast/ops/_sampler.py's fake kernels).
inline at::Tensor new_output(const at::Tensor& image, at::IntArrayRef spatial) {
  const bool cl = !image.is_contiguous() && image.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return at::empty({image.size(0), image.size(1), spatial[0], spatial[1], spatial[2]},
                   image.options().memory_format(cl ? at::MemoryFormat::ChannelsLast3d
                                                    : at::MemoryFormat::Contiguous));
}

// Gradients not asked for come back as empty tensors (op schemas return plain Tensors).
inline at::Tensor empty_if_undefined(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

inline void check_common(const at::Tensor& image, const at::Tensor& pos, const char* pos_name) {
  TORCH_CHECK(image.dim() == 5, "gvsl_fast: image must be (B, C, D, H, W)");
  TORCH_CHECK(image.numel() > 0, "gvsl_fast: image is empty");
  TORCH_CHECK(pos.device() == image.device(), "gvsl_fast: ", pos_name, " and image devices differ");
  TORCH_CHECK(pos.scalar_type() == image.scalar_type(), "gvsl_fast: ", pos_name,
              " and image dtypes differ");
  TORCH_CHECK(pos.size(0) == image.size(0), "gvsl_fast: ", pos_name, " batch != image batch");
}

inline void check_flow(const at::Tensor& image, const at::Tensor& flow) {
  check_common(image, flow, "flow");
  TORCH_CHECK(flow.dim() == 5 && flow.size(1) == 3 && flow.size(2) == image.size(2) &&
                  flow.size(3) == image.size(3) && flow.size(4) == image.size(4),
              "gvsl_fast.warp: flow must be (B, 3, D, H, W) with the image's B, D, H, W");
}

inline void check_grid(const at::Tensor& image, const at::Tensor& grid) {
  check_common(image, grid, "grid");
  TORCH_CHECK(grid.dim() == 5 && grid.size(4) == 3,
              "gvsl_fast.grid_sample: grid must be (B, D', H', W', 3)");
  TORCH_CHECK(grid.numel() > 0, "gvsl_fast.grid_sample: grid is empty");
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

inline void check_theta(const at::Tensor& image, const at::Tensor& theta) {
  TORCH_CHECK(image.dim() == 5, "gvsl_fast.affine_warp: image must be (B, C, D, H, W)");
  TORCH_CHECK(image.numel() > 0, "gvsl_fast.affine_warp: image is empty");
  TORCH_CHECK(theta.device() == image.device(), "gvsl_fast.affine_warp: theta/image devices");
  TORCH_CHECK(theta.scalar_type() == image.scalar_type(), "gvsl_fast.affine_warp: dtypes differ");
  TORCH_CHECK(theta.dim() == 3 && theta.size(0) == image.size(0) && theta.size(1) == 3 &&
                  theta.size(2) == 4,
              "gvsl_fast.affine_warp: theta must be (B, 3, 4) with the image's batch size");
}

}  // namespace gvsl
