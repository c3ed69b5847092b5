// compose and affine_flow_warp on the CPU: op schemas and the CPU kernels, built from the
// sampler's vectorized row stencils (cpu/sampler.h) and the shared per-voxel math (sampling.h,
// warp.h): p_hat = theta(p), the flow's stencil at p_hat, q = p_hat + flow(p_hat), and for
// affine_flow_warp the image's stencil at q.
//
// Parallel over rows (b, d, h). Scatters (d flow, d image) go to one private buffer per range of
// rows, summed afterwards in range order; d theta is reduced from per-row moments in a fixed
// order. Results depend only on the thread count, never on scheduling.
//
// affine_flow_warp also has a saved-derivative pair (as warp, cpu/sampler.h): when only theta and
// flow want gradients, the forward saves d out / d q and d out / d p_hat from the corner loads it
// makes anyway, and the backward needs no flow or image loads, only the flow's stencil weights.
#include <ATen/Parallel.h>
#include <algorithm>
#include <torch/library.h>
#include <torch/torch.h>

#include "compose_host.h"
#include "cpu/memory.h"
#include "cpu/sampler.h"

namespace gvsl {
namespace {

using cpu::kBlock;
using cpu::RowStencils;

// Positions of one block of a row: p_hat (the affine image of p), the flow's stencils there and
// q = p_hat + flow(p_hat); with kGrad also the flow's Jacobian there, jac[k][i] = d flow_k / d
// p_hat_i, from the same corner loads.
template <typename T, typename I, bool kGrad> struct ComposeBlock {
  T p_hat[3][kBlock];
  T q[3][kBlock];
  T jac[kGrad ? 3 : 1][3][kBlock];
  RowStencils<T, I, kGrad> flow;

  // p_hat and the flow's stencils there (all that the scatter to d flow needs).
  template <typename S>
  void place(const ComposeArgs<S>& a, const AffineIndexMap<T>& A, const I* fst, int d, int h,
             int w0, int n) {
#pragma GCC ivdep
    for (int v = 0; v < n; ++v) {
      T x[3];
      apply_affine(A, d, h, w0 + v, x);
      p_hat[0][v] = x[0];
      p_hat[1][v] = x[1];
      p_hat[2][v] = x[2];
    }
    flow.build_at(p_hat, a.size, fst, n, kBilinear, a.padding);
  }

  template <typename S>
  void build(const ComposeArgs<S>& a, const AffineIndexMap<T>& A, const I* fst, int b, int d,
             int h, int w0, int n) {
    place(a, A, fst, d, h, w0, n);
    const S* fl = a.flow + b * a.fs.b;
    for (int k = 0; k < 3; ++k) {
      const S* fk = fl + k * a.fs.c;
      cpu::with_guard(cpu::nonfinite_origin(fk), [&](auto guard) {
#pragma omp simd
        for (int v = 0; v < n; ++v) {
          T der[3];
          q[k][v] = p_hat[k][v] + flow.template sample<kGrad, guard>(fk, v, der);
          if constexpr (kGrad) {
            jac[k][0][v] = der[0];
            jac[k][1][v] = der[1];
            jac[k][2][v] = der[2];
          }
        }
      });
    }
  }
};

template <typename I> struct ComposeStrides {
  I flow[3], image[3];
  template <typename S> explicit ComposeStrides(const ComposeArgs<S>& a)
      : flow{I(a.fs.d), I(a.fs.h), I(a.fs.w)}, image{I(a.is.d), I(a.is.h), I(a.is.w)} {}
};

// Calls f(I{}) with the offset type of the flow and image stencils (int32_t where both fit).
template <typename S, typename F> void with_compose_offsets(const ComposeArgs<S>& a, F&& f) {
  cpu::with_offset_type(std::max(cpu::last_offset(a.size, a.fs.d, a.fs.h, a.fs.w),
                                 cpu::last_offset(a.size, a.is.d, a.is.h, a.is.w)),
                        f);
}

// The launch's sizes as the sampler's Geometry: rows (b, d, h), their split, theta's gradient.
template <typename S> Geometry row_geometry(const ComposeArgs<S>& a) {
  Geometry g;
  g.B = a.batch;
  g.C = a.channels;
  for (int i = 0; i < 3; ++i) g.in_size[i] = g.out_size[i] = a.size[i];
  return g;
}

// affine_flow_warp's saved derivatives: (B, 6C, D, H, W) contiguous in the accumulation type,
// channel 6c + i = d out_c / d q_i and 6c + 3 + i = d out_c / d p_hat_i = ((I + J)^T d out_c /
// d q)_i, J the flow's Jacobian at p_hat. Returns the offset of (b, channel 6c, d, h, 0).
template <typename S> int64_t saved_offset(const ComposeArgs<S>& a, int b, int c, int d, int h) {
  return ((int64_t(b) * 6 * a.channels + 6 * c) * a.size[0] + d) * a.size[1] * int64_t(a.size[2]) +
         int64_t(h) * a.size[2];
}

// With kSave (affine_flow_warp) the loop also writes the saved derivatives to `saved`.
template <bool kWarp, bool kSave, typename I, typename S>
void forward_rows(const ComposeArgs<S>& a, S* out, const Strides5& os, acc_t<S>* saved) {
  using T = acc_t<S>;
  const ComposeStrides<I> cs(a);
  const Geometry g = row_geometry(a);
  const int W = a.size[2];
  [[maybe_unused]] const int64_t vox = g.voxels();
  at::parallel_for(0, g.rows(), 1, [&](int64_t r0, int64_t r1) {
    ComposeBlock<T, I, kSave> blk;
    RowStencils<T, I, kSave> img;
    for (int64_t r = r0; r < r1; ++r) {
      int b, d, h;
      g.split(r, b, d, h);
      const AffineIndexMap<T> A = compose_map<T>(a, b);
      S* ob = out + b * os.b + d * os.d + h * os.h;
      for (int w0 = 0; w0 < W; w0 += kBlock) {
        const int n = std::min(kBlock, W - w0);
        blk.build(a, A, cs.flow, b, d, h, w0, n);
        if constexpr (kWarp) {
          img.build_at(blk.q, a.size, cs.image, n, kBilinear, a.padding);
          const S* ib = a.image + b * a.is.b;
          for (int c = 0; c < a.channels; ++c) {
            const S* ic = ib + c * a.is.c;
            S* oc = ob + c * os.c + w0 * os.w;
            T* sc = kSave ? saved + saved_offset(a, b, c, d, h) + w0 : nullptr;
            cpu::with_guard(cpu::nonfinite_origin(ic), [&](auto guard) {
#pragma omp simd
              for (int v = 0; v < n; ++v) {
                T s[3];  // d out / d q
                oc[v * os.w] = static_cast<S>(img.template sample<kSave, guard>(ic, v, s));
                if constexpr (kSave) {
                  GVSL_UNROLL
                  for (int i = 0; i < 3; ++i) {
                    sc[i * vox + v] = s[i];
                    sc[(3 + i) * vox + v] = s[i] + blk.jac[0][i][v] * s[0] +
                                            blk.jac[1][i][v] * s[1] + blk.jac[2][i][v] * s[2];
                  }
                }
              }
            });
          }
        } else {
          const T p[3] = {T(d), T(h), T(0)};
          for (int k = 0; k < 3; ++k) {
            S* oc = ob + k * os.c + w0 * os.w;
#pragma omp simd
            for (int v = 0; v < n; ++v)
              oc[v * os.w] = static_cast<S>(blk.q[k][v] - (k == 2 ? T(w0 + v) : p[k]));
          }
        }
      }
    }
  });
}

// Rows [r0, r1) of the backward pass. Scatters go to df (flow's strides) and di (image's), theta's
// moments (12 per row) to `moments`. With kSaved (affine_flow_warp, no d image) dL/dq and dL/dp_hat
// come from the forward's saved derivatives instead of the flow's and the image's corners.
template <bool kWarp, bool kSaved, typename I, typename S>
void backward_rows(const ComposeArgs<S>& a, const S* grad, const Strides5& gs, ComposeNeeds need,
                   const acc_t<S>* saved, acc_t<S>* df, acc_t<S>* di, acc_t<S>* moments,
                   int64_t r0, int64_t r1) {
  using T = acc_t<S>;
  const ComposeStrides<I> cs(a);
  const Geometry geo = row_geometry(a);
  const int W = a.size[2];
  [[maybe_unused]] const int64_t vox = geo.voxels();
  ComposeBlock<T, I, !kSaved> blk;
  [[maybe_unused]] RowStencils<T, I, true> img;
  T g[3][kBlock];   // dL/dq
  T gp[3][kBlock];  // dL/dp_hat
  for (int64_t r = r0; r < r1; ++r) {
    int b, d, h;
    geo.split(r, b, d, h);
    const AffineIndexMap<T> A = compose_map<T>(a, b);
    const S* gb = grad + b * gs.b + d * gs.d + h * gs.h;
    T m[kMoments] = {};
    for (int w0 = 0; w0 < W; w0 += kBlock) {
      const int n = std::min(kBlock, W - w0);
      if constexpr (kSaved) {
        blk.place(a, A, cs.flow, d, h, w0, n);
        for (int v = 0; v < n; ++v)
          g[0][v] = g[1][v] = g[2][v] = gp[0][v] = gp[1][v] = gp[2][v] = T(0);
        for (int c = 0; c < a.channels; ++c) {
          const S* gc = gb + c * gs.c + w0 * gs.w;
          const T* sc = saved + saved_offset(a, b, c, d, h) + w0;
#pragma omp simd
          for (int v = 0; v < n; ++v) {
            const T go = static_cast<T>(gc[v * gs.w]);
            GVSL_UNROLL
            for (int i = 0; i < 3; ++i) {
              g[i][v] += go * sc[i * vox + v];
              gp[i][v] += go * sc[(3 + i) * vox + v];
            }
          }
        }
      } else if constexpr (kWarp) {
        blk.build(a, A, cs.flow, b, d, h, w0, n);
        img.build_at(blk.q, a.size, cs.image, n, kBilinear, a.padding);
        const S* ib = a.image + b * a.is.b;
        for (int v = 0; v < n; ++v) g[0][v] = g[1][v] = g[2][v] = T(0);
        for (int c = 0; c < a.channels; ++c) {
          const S* ic = ib + c * a.is.c;
          const S* gc = gb + c * gs.c + w0 * gs.w;
          if (need.theta || need.flow) {
            cpu::with_guard(cpu::nonfinite_origin(ic), [&](auto guard) {
#pragma omp simd
              for (int v = 0; v < n; ++v) {
                T der[3];
                img.template sample<true, guard>(ic, v, der);
                const T go = static_cast<T>(gc[v * gs.w]);
                g[0][v] += go * der[0];
                g[1][v] += go * der[1];
                g[2][v] += go * der[2];
              }
            });
          }
          if (di) {  // scatter: scalar, corner-major (see d flow below)
            T* dc = di + b * a.is.b + c * a.is.c;
            for (int k = 0; k < 8; ++k)
              for (int v = 0; v < n; ++v)
                dc[img.off[k][v]] += img.w[k][v] * static_cast<T>(gc[v * gs.w]);
          }
        }
      } else {
        blk.build(a, A, cs.flow, b, d, h, w0, n);
        for (int k = 0; k < 3; ++k) {
          const S* gc = gb + k * gs.c + w0 * gs.w;
          for (int v = 0; v < n; ++v) g[k][v] = static_cast<T>(gc[v * gs.w]);
        }
      }
      if (df) {  // d flow: g scattered to the flow's corners around p_hat
        // Corner-major: consecutive updates go to different addresses, so they pipeline instead
        // of waiting on each other's stores (neighbouring voxels share corners); the three
        // channels of a corner in one iteration (three independent updates per weight and offset
        // load): 15% off the step against a loop per channel.
        T* fb = df + b * a.fs.b;
        const int64_t fc = a.fs.c;
        for (int c = 0; c < 8; ++c)
          for (int v = 0; v < n; ++v) {
            T* p = fb + blk.flow.off[c][v];
            const T wt = blk.flow.w[c][v];
            p[0] += wt * g[0][v];
            p[fc] += wt * g[1][v];
            p[2 * fc] += wt * g[2][v];
          }
      }
      if (need.theta) {
        if constexpr (!kSaved) {  // dL/dp_hat = g + J^T g, J the flow's Jacobian at p_hat
          for (int i = 0; i < 3; ++i)
            for (int v = 0; v < n; ++v) gp[i][v] = g[i][v];
          for (int k = 0; k < 3; ++k)
            for (int i = 0; i < 3; ++i)
#pragma omp simd
              for (int v = 0; v < n; ++v) gp[i][v] += g[k][v] * blk.jac[k][i][v];
        }
        for (int v = 0; v < n; ++v) {
          const T gv[3] = {gp[0][v], gp[1][v], gp[2][v]};
          theta_moments(gv, d, h, w0 + v, a.size, m);
        }
      }
    }
    if (need.theta) std::copy(m, m + kMoments, moments + r * kMoments);
  }
}

// The forward; affine_flow_warp with a non-null `saved` also saves its derivatives there.
template <bool kWarp, typename S>
void forward_cpu(const ComposeArgs<S>& a, S* out, const Strides5& os,
                 acc_t<S>* saved = nullptr) {
  with_compose_offsets(a, [&](auto i) {
    if constexpr (kWarp) {
      if (saved) return forward_rows<true, true, decltype(i)>(a, out, os, saved);
    }
    forward_rows<kWarp, false, decltype(i)>(a, out, os, nullptr);
  });
}

// Returns (d image, d theta, d flow); the ones not needed are empty. A defined `saved`
// (affine_flow_warp's forward_saved, no d image) takes the saved-derivative backward.
template <bool kWarp, typename S>
std::vector<at::Tensor> backward_cpu(const ComposeArgs<S>& a, const at::Tensor& grad,
                                     const at::Tensor& image, const at::Tensor& theta,
                                     const at::Tensor& flow, ComposeNeeds need,
                                     const at::Tensor& saved = {}) {
  using T = acc_t<S>;
  const at::ScalarType acc_type = c10::CppTypeToScalarType<T>::value;
  const auto acc = flow.options().dtype(acc_type);
  const Geometry geo = row_geometry(a);
  const int64_t rows = geo.rows();
  const int ranges = int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows)));
  std::vector<at::Tensor> dflow, dimage;
  for (int v = 0; v < ranges; ++v) {
    if (need.flow) dflow.push_back(huge_zeros_like(flow, acc_type));
    if (need.image) dimage.push_back(huge_zeros_like(image, acc_type));
  }
  for (const auto* bufs : {&dflow, &dimage})
    for (const auto& t : *bufs)
      TORCH_CHECK(t.strides() == (bufs == &dflow ? flow : image).strides(),
                  "compose: gradient buffer layout");
  at::Tensor moments = need.theta ? at::zeros({1, rows, kMoments}, acc) : at::Tensor();
  const S* g = grad.const_data_ptr<S>();
  const Strides5 gs = strides5(grad);
  const T* sv = saved.defined() ? saved.const_data_ptr<T>() : nullptr;
  TORCH_CHECK(!sv || (kWarp && !need.image), "compose: saved derivatives serve theta and flow");
  with_compose_offsets(a, [&](auto i) {
    at::parallel_for(0, ranges, 1, [&](int64_t l0, int64_t l1) {
      for (int64_t v = l0; v < l1; ++v) {
        T* df = need.flow ? dflow[v].data_ptr<T>() : nullptr;
        T* di = need.image ? dimage[v].data_ptr<T>() : nullptr;
        T* mo = need.theta ? moments.data_ptr<T>() : nullptr;
        const int64_t r0 = rows * v / ranges, r1 = rows * (v + 1) / ranges;
        if constexpr (kWarp) {
          if (sv) {
            backward_rows<true, true, decltype(i)>(a, g, gs, need, sv, df, di, mo, r0, r1);
            continue;
          }
        }
        backward_rows<kWarp, false, decltype(i)>(a, g, gs, need, sv, df, di, mo, r0, r1);
      }
    });
  });
  for (auto* bufs : {&dflow, &dimage})
    for (size_t v = 1; v < bufs->size(); ++v) (*bufs)[0].add_((*bufs)[v]);
  const auto dtype = flow.scalar_type();
  const at::Tensor dtheta =
      need.theta ? cpu::theta_grad_cpu(moments, geo, a.align_corners, theta) : at::Tensor();
  const auto opts = flow.options();
  return {
      need.image ? dimage[0].to(dtype) : empty_grad(opts),
      need.theta ? dtheta : empty_grad(opts),
      need.flow ? dflow[0].to(dtype) : empty_grad(opts),
  };
}

// `deterministic` is for the GPU: the CPU backward is always reproducible (per-thread buffers
// summed in a fixed order).
at::Tensor compose_fwd_cpu(const at::Tensor& theta, const at::Tensor& flow, bool align_corners,
                           int64_t padding, bool /*deterministic*/) {
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
                                        int64_t padding, bool /*deterministic*/, bool need_theta,
                                        bool need_flow) {
  check_compose_inputs(theta, flow, flow, at::kCPU);
  check_grad(grad, flow);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flow.scalar_type(), "compose", [&] {
    const auto a = make_args<scalar_t>(theta, flow, flow, 3, align_corners, padding);
    out = backward_cpu<false>(a, grad, flow, theta, flow, {false, need_theta, need_flow});
  });
  return {out[1], out[2]};
}

at::Tensor affine_flow_warp_fwd_cpu(const at::Tensor& image, const at::Tensor& theta,
                                    const at::Tensor& flow, bool align_corners,
                                    int64_t padding, bool /*deterministic*/) {
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
                                                 bool /*deterministic*/, bool need_image,
                                                 bool need_theta, bool need_flow) {
  check_compose_inputs(theta, flow, image, at::kCPU);
  check_grad(grad, image);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flow.scalar_type(), "afw", [&] {
    const auto a = make_args<scalar_t>(theta, flow, image, image.size(1), align_corners, padding);
    out = backward_cpu<true>(a, grad, image, theta, flow, {need_image, need_theta, need_flow});
  });
  return out;
}

// affine_flow_warp's forward that also saves d out / d q and d out / d p_hat (saved_offset).
std::tuple<at::Tensor, at::Tensor> affine_flow_warp_fwd_saved_cpu(const at::Tensor& image,
                                                                  const at::Tensor& theta,
                                                                  const at::Tensor& flow,
                                                                  bool align_corners,
                                                                  int64_t padding) {
  check_compose_inputs(theta, flow, image, at::kCPU);
  at::Tensor out = at::empty_like(image);
  at::Tensor saved = huge_pages(at::empty(
      {image.size(0), 6 * image.size(1), image.size(2), image.size(3), image.size(4)},
      image.options().dtype(acc_dtype(image))));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flow.scalar_type(), "afw", [&] {
    const auto a = make_args<scalar_t>(theta, flow, image, image.size(1), align_corners, padding);
    forward_cpu<true>(a, out.data_ptr<scalar_t>(), strides5(out),
                      saved.data_ptr<acc_t<scalar_t>>());
  });
  return {out, saved};
}

// Returns (d theta, d flow) from the saved derivatives; the ones not needed are empty.
std::vector<at::Tensor> affine_flow_warp_bwd_saved_cpu(const at::Tensor& grad,
                                                       const at::Tensor& saved,
                                                       const at::Tensor& image,
                                                       const at::Tensor& theta,
                                                       const at::Tensor& flow, bool align_corners,
                                                       int64_t padding, bool need_theta,
                                                       bool need_flow) {
  check_compose_inputs(theta, flow, image, at::kCPU);
  check_grad(grad, image);
  TORCH_CHECK(saved.is_contiguous() && saved.dim() == 5 && saved.size(0) == image.size(0) &&
                  saved.size(1) == 6 * image.size(1) &&
                  saved.sizes().slice(2) == image.sizes().slice(2) &&
                  saved.scalar_type() == acc_dtype(image),
              "affine_flow_warp: the saved derivatives do not match the image");
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flow.scalar_type(), "afw", [&] {
    const auto a = make_args<scalar_t>(theta, flow, image, image.size(1), align_corners, padding);
    out = backward_cpu<true>(a, grad, image, theta, flow, {false, need_theta, need_flow}, saved);
  });
  return {out[1], out[2]};
}

}  // namespace
}  // namespace gvsl

TORCH_LIBRARY_FRAGMENT(gvsl_fast, m) {
  m.def(
      "compose_fwd(Tensor theta, Tensor flow, bool align_corners, int padding, "
      "bool deterministic) -> Tensor");
  m.def(
      "compose_bwd(Tensor grad, Tensor theta, Tensor flow, bool align_corners, int padding, "
      "bool deterministic, bool need_theta, bool need_flow) -> Tensor[]");
  m.def(
      "affine_flow_warp_fwd(Tensor image, Tensor theta, Tensor flow, bool align_corners, "
      "int padding, bool deterministic) -> Tensor");
  m.def(
      "affine_flow_warp_bwd(Tensor grad, Tensor image, Tensor theta, Tensor flow, "
      "bool align_corners, int padding, bool deterministic, bool need_image, bool need_theta, "
      "bool need_flow) -> Tensor[]");
  // CPU only: the saved-derivative pair (theta and flow gradients only).
  m.def(
      "affine_flow_warp_fwd_saved(Tensor image, Tensor theta, Tensor flow, bool align_corners, "
      "int padding) -> (Tensor, Tensor)");
  m.def(
      "affine_flow_warp_bwd_saved(Tensor grad, Tensor saved, Tensor image, Tensor theta, "
      "Tensor flow, bool align_corners, int padding, bool need_theta, bool need_flow) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(gvsl_fast, CPU, m) {
  m.impl("compose_fwd", &gvsl::compose_fwd_cpu);
  m.impl("compose_bwd", &gvsl::compose_bwd_cpu);
  m.impl("affine_flow_warp_fwd", &gvsl::affine_flow_warp_fwd_cpu);
  m.impl("affine_flow_warp_bwd", &gvsl::affine_flow_warp_bwd_cpu);
  m.impl("affine_flow_warp_fwd_saved", &gvsl::affine_flow_warp_fwd_saved_cpu);
  m.impl("affine_flow_warp_bwd_saved", &gvsl::affine_flow_warp_bwd_saved_cpu);
}
