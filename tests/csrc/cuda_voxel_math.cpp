// The CUDA kernels' per-voxel math on the host, for the CPU-only tests. The CPU backend runs its
// own vectorized row loops, so without this harness nothing without a GPU would execute the
// shared functions that csrc/cuda calls: sample_forward_voxel / sample_backward_voxel
// (csrc/warp.h) and compose_forward_voxel / compose_backward_voxel (csrc/compose.h), with their
// stencils, theta moments and theta_grad_from_moments. Here they run in a plain sequential loop
// over voxels: scatters add up one after another, theta moments are summed (in double) and
// turned into d theta. Built by tests/conftest.py; the ops are torch.ops.gvsl_voxel_math.*.
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "compose_host.h"
#include "sampler_host.h"

namespace gvsl::voxel_math {
namespace {

// f(std::bool_constant<flag>{}): a run-time flag as the template argument the kernels take.
template <typename F> void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

int mode_of(const std::string& mode) {
  TORCH_CHECK(mode == "bilinear" || mode == "nearest", "mode: ", mode);
  return mode == "nearest" ? kNearest : kBilinear;
}

int padding_of(const std::string& padding) {
  TORCH_CHECK(padding == "zeros" || padding == "border", "padding: ", padding);
  return padding == "border" ? kBorder : kZeros;
}

// ---- warp (flow), grid_sample (grid), affine_warp (theta): csrc/cuda/sampler.cuh ------------

// The output's (D, H, W): the grid's for grid_sample, else the image's.
at::IntArrayRef output_size(const std::string& source, const at::Tensor& image,
                            const at::Tensor& pos) {
  return source == "grid" ? pos.sizes().slice(1, 3) : image.sizes().slice(2, 3);
}

// Calls f(src) with the position source of `pos` (a flow, a grid or theta) as the CUDA ops build
// it; `gpos` receives the flow or grid gradient (theta's comes from moments instead).
template <typename S, typename F>
void with_source(const std::string& source, const at::Tensor& image, const at::Tensor& pos,
                 at::Tensor* gpos, bool align_corners, F&& f) {
  using T = acc_t<S>;
  if (source == "flow") {
    f(flow_source<S>(pos, gpos));
  } else if (source == "grid") {
    f(grid_source<S>(pos, gpos, image, align_corners));
  } else {
    TORCH_CHECK(source == "affine", "source: ", source);
    const at::Tensor theta = pos.contiguous();
    int size[3];
    for (int i = 0; i < 3; ++i) size[i] = int(image.size(2 + i));
    std::vector<AffineIndexMap<T>> maps;
    for (int64_t b = 0; b < theta.size(0); ++b)
      maps.push_back(affine_index_map<T>(theta.const_data_ptr<S>() + 12 * b, size, size,
                                         align_corners));
    f(AffineSource<T>{maps.data()});
  }
}

// Calls f(b, d, h, w) for every voxel of `batch` volumes of `size` (D, H, W), in order.
template <typename F> void for_each_voxel(int batch, const int* size, F&& f) {
  for (int b = 0; b < batch; ++b)
    for (int d = 0; d < size[0]; ++d)
      for (int h = 0; h < size[1]; ++h)
        for (int w = 0; w < size[2]; ++w) f(b, d, h, w);
}

at::Tensor sample_forward(const at::Tensor& image, const at::Tensor& pos,
                          const std::string& source, const std::string& mode,
                          const std::string& padding, bool align_corners) {
  const int md = mode_of(mode), pad = padding_of(padding);
  at::Tensor out = new_output(image, output_size(source, image, pos));
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "sample_forward", [&] {
    const Geometry g = geometry(image, out);
    const scalar_t* img = image.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    with_source<scalar_t>(source, image, pos, nullptr, align_corners, [&](const auto& src) {
      for_each_voxel(g.B, g.out_size, [&](int b, int d, int h, int w) {
        sample_forward_voxel(img, o, g, src, md, pad, b, d, h, w);
      });
    });
  });
  return out;
}

// (d image, d pos): d pos is d flow, d grid or d theta; the ones not asked for are empty.
std::tuple<at::Tensor, at::Tensor> sample_backward(
    const at::Tensor& grad_out, const at::Tensor& image, const at::Tensor& pos,
    const std::string& source, const std::string& mode, const std::string& padding,
    bool align_corners, bool image_grad, bool pos_grad) {
  const int md = mode_of(mode), pad = padding_of(padding);
  const bool affine = source == "affine";
  at::Tensor gimg, gpos = pos_grad && !affine ? at::empty_like(pos) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "sample_backward", [&] {
    using T = acc_t<scalar_t>;
    const Geometry g = geometry(image, grad_out);
    const scalar_t* img = image.const_data_ptr<scalar_t>();
    const scalar_t* gout = grad_out.const_data_ptr<scalar_t>();
    // The image gradient in the accumulation type and the image's strides, as on the GPU.
    if (image_grad)
      gimg = at::zeros_like(image, image.options().dtype(c10::CppTypeToScalarType<T>::value));
    T* gi = image_grad ? gimg.data_ptr<T>() : nullptr;
    std::vector<double> moments(size_t(g.B) * kMoments, 0.0);
    with_source<scalar_t>(source, image, pos, pos_grad ? &gpos : nullptr, align_corners,
                          [&](const auto& src) {
      using Src = std::decay_t<decltype(src)>;
      with_flag(image_grad, [&](auto kImage) {
        with_flag(pos_grad, [&](auto kPos) {
          for_each_voxel(g.B, g.out_size, [&](int b, int d, int h, int w) {
            T gp[3];
            sample_backward_voxel<kImage, kPos>(
                img, gout, g, src, md, pad, b, d, h, w,
                [&](int c, int64_t off, T x) { gi[b * g.is[0] + c * g.is[1] + off] += x; }, gp);
            if constexpr (kPos) {
              if constexpr (Src::kind == kAffine)
                theta_moments(gp, d, h, w, g.out_size, &moments[size_t(b) * kMoments]);
              else
                src.store_grad(b, d, h, w, gp);
            }
          });
        });
      });
    });
    if (pos_grad && affine) {
      at::Tensor dtheta = at::empty({g.B, 3, 4}, pos.options().dtype(at::kDouble));
      for (int b = 0; b < g.B; ++b)
        theta_grad_from_moments(&moments[size_t(b) * kMoments], g.out_size, g.in_size,
                                align_corners, dtheta.data_ptr<double>() + b * kMoments);
      gpos = dtheta.to(pos.scalar_type());
    }
  });
  if (gimg.defined()) gimg = gimg.to(image.scalar_type());
  return {empty_if_undefined(gimg, image), empty_if_undefined(gpos, pos)};
}

// ---- compose (no image) and affine_flow_warp (image): csrc/cuda/compose.cu ------------------

at::Tensor compose_forward(const at::Tensor& theta, const at::Tensor& flow,
                           const std::optional<at::Tensor>& image, bool align_corners,
                           const std::string& padding) {
  const at::Tensor& img = image ? *image : flow;
  check_compose_inputs(theta, flow, img, at::kCPU);
  at::Tensor out = at::empty_like(img);
  AT_DISPATCH_FLOATING_TYPES(flow.scalar_type(), "compose_forward", [&] {
    using T = acc_t<scalar_t>;
    const auto a = make_args<scalar_t>(theta, flow, img, image ? img.size(1) : 3, align_corners,
                                       padding_of(padding));
    const Strides5 os = strides5(out);
    scalar_t* ob = out.data_ptr<scalar_t>();
    with_flag(image.has_value(), [&](auto kWarp) {
      for_each_voxel(a.batch, a.size, [&](int b, int d, int h, int w) {
        scalar_t* o = ob + b * os.b + d * os.d + h * os.h + w * os.w;
        compose_forward_voxel<kWarp>(a, compose_map<T>(a, b), b, d, h, w,
                                     [&](int c, T x) { o[c * os.c] = static_cast<scalar_t>(x); });
      });
    });
  });
  return out;
}

// (d image, d theta, d flow); the ones not asked for are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> compose_backward(
    const at::Tensor& grad, const at::Tensor& theta, const at::Tensor& flow,
    const std::optional<at::Tensor>& image, bool align_corners, const std::string& padding,
    bool need_image, bool need_theta, bool need_flow) {
  const at::Tensor& img = image ? *image : flow;
  check_compose_inputs(theta, flow, img, at::kCPU);
  check_grad(grad, img);
  const ComposeNeeds need{need_image && image.has_value(), need_theta, need_flow};
  at::Tensor dimage, dtheta, dflow;
  AT_DISPATCH_FLOATING_TYPES(flow.scalar_type(), "compose_backward", [&] {
    using T = acc_t<scalar_t>;
    const auto a = make_args<scalar_t>(theta, flow, img, image ? img.size(1) : 3, align_corners,
                                       padding_of(padding));
    // Scatter buffers contiguous, in the accumulation type, as on the GPU.
    const auto acc = flow.options().dtype(c10::CppTypeToScalarType<T>::value);
    dimage = at::zeros(img.sizes(), acc);
    dflow = at::zeros(flow.sizes(), acc);
    T* di = dimage.data_ptr<T>();
    T* df = dflow.data_ptr<T>();
    const int64_t N = int64_t(a.size[0]) * a.size[1] * a.size[2];
    const scalar_t* gb = grad.const_data_ptr<scalar_t>();
    const Strides5 gs = strides5(grad);
    std::vector<double> moments(size_t(a.batch) * kMoments, 0.0);
    with_flag(image.has_value(), [&](auto kWarp) {
      for_each_voxel(a.batch, a.size, [&](int b, int d, int h, int w) {
        const scalar_t* go = gb + b * gs.b + d * gs.d + h * gs.h + w * gs.w;
        T gp[3];
        compose_backward_voxel<kWarp>(
            a, compose_map<T>(a, b), b, d, h, w, need,
            [&](int c) { return static_cast<T>(go[c * gs.c]); },
            [&](int k, int64_t off, T x) { df[(b * 3 + k) * N + off] += x; },
            [&](int c, int64_t off, T x) { di[(b * a.channels + c) * N + off] += x; }, gp);
        if (need.theta) theta_moments(gp, d, h, w, a.size, &moments[size_t(b) * kMoments]);
      });
    });
    dtheta = at::empty({a.batch, 3, 4}, theta.options().dtype(at::kDouble));
    for (int b = 0; b < a.batch; ++b)
      theta_grad_from_moments(&moments[size_t(b) * kMoments], a.size, a.size, align_corners,
                              dtheta.data_ptr<double>() + b * kMoments);
  });
  const auto opts = flow.options();
  return {need.image ? dimage.to(opts.dtype()) : empty_grad(opts),
          need.theta ? dtheta.to(opts.dtype()) : empty_grad(opts),
          need.flow ? dflow.to(opts.dtype()) : empty_grad(opts)};
}

}  // namespace
}  // namespace gvsl::voxel_math

TORCH_LIBRARY(gvsl_voxel_math, m) {
  using namespace gvsl::voxel_math;
  m.def(
      "sample_forward(Tensor image, Tensor pos, str source, str mode, str padding, "
      "bool align_corners) -> Tensor",
      &sample_forward);
  m.def(
      "sample_backward(Tensor grad_out, Tensor image, Tensor pos, str source, str mode, "
      "str padding, bool align_corners, bool image_grad, bool pos_grad) -> (Tensor, Tensor)",
      &sample_backward);
  m.def(
      "compose_forward(Tensor theta, Tensor flow, Tensor? image, bool align_corners, "
      "str padding) -> Tensor",
      &compose_forward);
  m.def(
      "compose_backward(Tensor grad, Tensor theta, Tensor flow, Tensor? image, "
      "bool align_corners, str padding, bool need_image, bool need_theta, bool need_flow) "
      "-> (Tensor, Tensor, Tensor)",
      &compose_backward);
}
