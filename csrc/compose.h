// Per-voxel math of compose and affine_flow_warp (DESIGN §3). The CUDA kernels
// (csrc/cuda/compose.cu) run each voxel through compose_forward_voxel / compose_backward_voxel
// (so do the tests, on the host: tests/test_cuda_emulated.py); the CPU loop
// (csrc/cpu/compose.cpp) shares the arguments and the affine map, and batches the rest by rows.
//
//   p_hat = theta(p)            (exact index-space map, sampling.h: affine_index_map)
//   q     = p_hat + flow(p_hat) (flow sampled trilinearly at p_hat)
//   compose:          psi(p) = q - p
//   affine_flow_warp: out(p) = image(q), every channel, without psi in memory
//
// Backward, with g = dL/dq (compose: the incoming gradient; affine_flow_warp: gathered from the
// image at q): dL/dflow_k scatters g_k to the corners around p_hat, and
// dL/dp_hat = g + J^T g with J the Jacobian of flow at p_hat; theta's gradient follows from
// dL/dp_hat through the theta moments of csrc/warp.h (theta_moments, theta_grad_from_moments).
#pragma once
#include "sampling.h"

namespace gvsl {

// Element strides of a (B, C, D, H, W) tensor.
struct Strides5 {
  int64_t b, c, d, h, w;
};

// Everything a voxel of either op reads or writes. theta is (B, 3, 4) contiguous; image and out
// are used by affine_flow_warp only (compose writes psi to out with 3 channels).
template <typename S> struct ComposeArgs {
  const S* theta;
  const S* flow;
  Strides5 fs;
  const S* image;
  Strides5 is;
  int batch;
  int channels;  // of image (affine_flow_warp) or 3 (psi)
  int size[3];   // D, H, W, shared by image, flow and output
  bool align_corners;
  int padding;
};

// Position data of one voxel: p_hat, the stencil of flow at p_hat, and q.
template <typename T> struct ComposePoint {
  T p_hat[3];
  Axis<T> ax[3];
  Stencil<T> st;  // flow's corners around p_hat, in flow's strides, without derivative weights
  T q[3];
};

template <typename T, typename S>
GVSL_HD AffineIndexMap<T> compose_map(const ComposeArgs<S>& a, int b) {
  return affine_index_map<T>(a.theta + 12 * b, a.size, a.size, a.align_corners);
}

template <typename T, typename S>
GVSL_HD void compose_point(const ComposeArgs<S>& a, const AffineIndexMap<T>& A, int b, int d,
                           int h, int w, ComposePoint<T>& cp) {
  apply_affine(A, d, h, w, cp.p_hat);
  GVSL_UNROLL
  for (int i = 0; i < 3; ++i) cp.ax[i] = linear_axis(cp.p_hat[i], a.size[i], a.padding);
  make_stencil<T, false>(cp.ax[0], cp.ax[1], cp.ax[2], a.fs.d, a.fs.h, a.fs.w, cp.st);
  const S* fl = a.flow + b * a.fs.b;
  GVSL_UNROLL
  for (int k = 0; k < 3; ++k) cp.q[k] = cp.p_hat[k] + stencil_value(cp.st, fl + k * a.fs.c);
}

// Forward of one voxel. compose: out[k] = psi_k (3 values); affine_flow_warp: out[c] = image_c(q).
// Returns through `store(channel, value)` so callers choose the output layout and dtype.
template <bool kWarp, typename T, typename S, typename Store>
GVSL_HD void compose_forward_voxel(const ComposeArgs<S>& a, const AffineIndexMap<T>& A, int b,
                                   int d, int h, int w, Store&& store) {
  ComposePoint<T> cp;
  compose_point(a, A, b, d, h, w, cp);
  if (kWarp) {
    Stencil<T> sq;
    make_stencil<T, false>(cp.q, a.size, a.is.d, a.is.h, a.is.w, kBilinear, a.padding, sq);
    const S* img = a.image + b * a.is.b;
    for (int c = 0; c < a.channels; ++c) store(c, stencil_value(sq, img + c * a.is.c));
  } else {
    const int p[3] = {d, h, w};
    GVSL_UNROLL
    for (int k = 0; k < 3; ++k) store(k, cp.q[k] - T(p[k]));
  }
}

// Which gradients a backward pass computes.
struct ComposeNeeds {
  bool image, theta, flow;
};

// Backward of one voxel, `grad(channel)` reading dL/d(output) at this voxel.
// Scatters go through scatter_flow(k, offset, value) and scatter_image(c, offset, value), with
// offsets in a contiguous (D, H, W) volume; dL/dp_hat is written to gp when needs.theta.
template <bool kWarp, typename T, typename S, typename Grad, typename ScatterFlow,
          typename ScatterImage>
GVSL_HD void compose_backward_voxel(const ComposeArgs<S>& a, const AffineIndexMap<T>& A, int b,
                                    int d, int h, int w, ComposeNeeds need, Grad&& grad,
                                    ScatterFlow&& scatter_flow, ScatterImage&& scatter_image,
                                    T* gp) {
  ComposePoint<T> cp;
  compose_point(a, A, b, d, h, w, cp);
  const int64_t cd = int64_t(a.size[1]) * a.size[2], ch = a.size[2];
  T g[3] = {T(0), T(0), T(0)};  // dL/dq
  if (!kWarp) {
    GVSL_UNROLL
    for (int k = 0; k < 3; ++k) g[k] = grad(k);
  } else {
    Axis<T> aq[3];
    GVSL_UNROLL
    for (int i = 0; i < 3; ++i) aq[i] = linear_axis(cp.q[i], a.size[i], a.padding);
    const bool need_q = need.theta || need.flow;
    Stencil<T> sq, sqc;  // the image's corners around q; the same in the contiguous d image buffer
    make_stencil<T, true>(aq[0], aq[1], aq[2], a.is.d, a.is.h, a.is.w, sq);
    make_stencil<T, false>(aq[0], aq[1], aq[2], cd, ch, int64_t(1), sqc);
    const S* img = a.image + b * a.is.b;
    for (int c = 0; c < a.channels; ++c) {
      const T go = grad(c);
      if (need_q) stencil_pos_grad(sq, img + c * a.is.c, go, g);
      if (need.image)
        stencil_scatter(sqc, [&](int64_t off, T wt) { scatter_image(c, off, wt * go); });
    }
  }
  if (need.flow) {
    Stencil<T> sf;  // flow's corners in the contiguous d flow buffer
    make_stencil<T, false>(cp.ax[0], cp.ax[1], cp.ax[2], cd, ch, int64_t(1), sf);
    stencil_scatter(sf, [&](int64_t off, T wt) {
      GVSL_UNROLL
      for (int k = 0; k < 3; ++k) scatter_flow(k, off, wt * g[k]);
    });
  }
  if (need.theta) {
    // dL/dp_hat = g + J^T g, J the Jacobian of flow at p_hat
    Stencil<T> sf;
    make_stencil<T, true>(cp.ax[0], cp.ax[1], cp.ax[2], a.fs.d, a.fs.h, a.fs.w, sf);
    const S* fl = a.flow + b * a.fs.b;
    GVSL_UNROLL
    for (int i = 0; i < 3; ++i) gp[i] = g[i];
    GVSL_UNROLL
    for (int k = 0; k < 3; ++k) stencil_pos_grad(sf, fl + k * a.fs.c, g[k], gp);
  }
}

}  // namespace gvsl
