// Host-side helpers of compose and affine_flow_warp shared by the CPU and CUDA op files:
// argument checks and the packing of tensors into ComposeArgs (csrc/compose.h).
#pragma once
#include <ATen/ATen.h>

#include "compose.h"

namespace gvsl {

inline Strides5 strides5(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// The Python layer gives the user-facing errors; these guard direct calls of the ops.
inline void check_compose_inputs(const at::Tensor& theta, const at::Tensor& flow,
                                 const at::Tensor& image, at::DeviceType device) {
  TORCH_CHECK(flow.dim() == 5 && flow.size(1) == 3, "compose: flow must be (B, 3, D, H, W)");
  TORCH_CHECK(image.dim() == 5 && image.size(0) == flow.size(0) &&
                  image.sizes().slice(2) == flow.sizes().slice(2),
              "compose: image must be (B, C, D, H, W) with flow's B, D, H, W");
  TORCH_CHECK(flow.numel() > 0 && image.numel() > 0, "compose: empty flow or image");
  TORCH_CHECK(theta.dim() == 3 && theta.size(0) == flow.size(0) && theta.size(1) == 3 &&
                  theta.size(2) == 4 && theta.is_contiguous(),
              "compose: theta must be a contiguous (B, 3, 4) tensor");
  for (const auto* t : {&theta, &flow, &image}) {
    TORCH_CHECK(t->device().type() == device && t->device() == flow.device(),
                "compose: tensors on the wrong device (all must be on flow's device)");
    TORCH_CHECK(t->scalar_type() == flow.scalar_type(), "compose: tensors of different dtypes");
  }
}

inline void check_grad(const at::Tensor& grad, const at::Tensor& like) {
  TORCH_CHECK(grad.sizes() == like.sizes() && grad.scalar_type() == like.scalar_type() &&
                  grad.device() == like.device(),
              "compose: grad must match the forward output");
}

inline at::Tensor empty_grad(const at::TensorOptions& opts) { return at::empty({0}, opts); }

template <typename S>
ComposeArgs<S> make_args(const at::Tensor& theta, const at::Tensor& flow, const at::Tensor& image,
                         int64_t channels, bool align_corners, int64_t padding) {
  ComposeArgs<S> a;
  a.theta = theta.data_ptr<S>();
  a.flow = flow.data_ptr<S>();
  a.fs = strides5(flow);
  a.image = image.data_ptr<S>();
  a.is = strides5(image);
  a.batch = int(flow.size(0));
  a.channels = int(channels);
  for (int i = 0; i < 3; ++i) a.size[i] = int(flow.size(2 + i));
  a.align_corners = align_corners;
  a.padding = int(padding);
  return a;
}

}  // namespace gvsl
