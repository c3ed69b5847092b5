// Per-voxel math of warp, grid_sample and affine_warp, shared by the CPU loops (csrc/cpu) and
// the CUDA kernels (csrc/cuda): the three sources of sampling positions (a displacement field, a
// normalized grid, an affine theta). Each position is sampled through sampling.h's Stencil.
#pragma once
#include "sampling.h"

namespace gvsl {

// Sizes and element strides of one sampler launch (image and output), for both backends.
struct Geometry {
  int B = 0, C = 0;
  int in_size[3] = {0, 0, 0};       // image (D, H, W)
  int out_size[3] = {0, 0, 0};      // output (D, H, W)
  int64_t is[5] = {0, 0, 0, 0, 0};  // image strides (also those of the image-gradient buffer)
  int64_t os[5] = {0, 0, 0, 0, 0};  // output (or grad_out) strides

  GVSL_HD int64_t voxels() const { return int64_t(out_size[0]) * out_size[1] * out_size[2]; }
  int64_t rows() const { return int64_t(B) * out_size[0] * out_size[1]; }
  void split(int64_t r, int& b, int& d, int& h) const {
    h = int(r % out_size[1]);
    d = int((r / out_size[1]) % out_size[0]);
    b = int(r / (int64_t(out_size[1]) * out_size[0]));
  }
};

// ---- position sources: where output voxel (b, d, h, w) samples, and where its gradient goes --

enum Source : int { kFlow = 0, kGrid = 1, kAffine = 2 };

// flow (B, 3, D, H, W) in voxels, channels d/h/w: position p + flow(p). Strides in elements.
template <typename S> struct FlowSource {
  static constexpr int kind = kFlow;
  const S* flow;
  S* grad;  // same strides as flow
  int64_t sb, sc, sd, sh, sw;

  template <typename T> GVSL_HD void position(int b, int d, int h, int w, T* x) const {
    const S* f = flow + b * sb + d * sd + h * sh + w * sw;
    x[0] = T(d) + static_cast<T>(f[0]);
    x[1] = T(h) + static_cast<T>(f[sc]);
    x[2] = T(w) + static_cast<T>(f[2 * sc]);
  }
  template <typename T> GVSL_HD void store_grad(int b, int d, int h, int w, const T* g) const {
    S* f = grad + b * sb + d * sd + h * sh + w * sw;
    f[0] = static_cast<S>(g[0]);
    f[sc] = static_cast<S>(g[1]);
    f[2 * sc] = static_cast<S>(g[2]);
  }
};

// grid (B, D', H', W', 3) in normalized (x, y, z) = (w, h, d) coordinates, as F.grid_sample.
template <typename S> struct GridSource {
  static constexpr int kind = kGrid;
  const S* grid;
  S* grad;  // same strides as grid
  int64_t sb, sd, sh, sw, sc;
  int in_size[3];
  bool align_corners;

  template <typename T> GVSL_HD void position(int b, int d, int h, int w, T* x) const {
    const S* g = grid + b * sb + d * sd + h * sh + w * sw;
    GVSL_UNROLL
    for (int i = 0; i < 3; ++i)
      x[i] = unnormalize(static_cast<T>(g[(2 - i) * sc]), in_size[i], align_corners);
  }
  template <typename T> GVSL_HD void store_grad(int b, int d, int h, int w, const T* gp) const {
    S* g = grad + b * sb + d * sd + h * sh + w * sw;
    GVSL_UNROLL
    for (int i = 0; i < 3; ++i)
      g[(2 - i) * sc] = static_cast<S>(gp[i] * unnormalize_scale<T>(in_size[i], align_corners));
  }
};

// theta (B, 3, 4): position = affine_index_map(theta_b) applied to (d, h, w). Its gradient is a
// reduction, accumulated as moments (see theta_moments / theta_grad_from_moments).
template <typename T> struct AffineSource {
  static constexpr int kind = kAffine;
  const AffineIndexMap<T>* maps;  // one per batch element

  GVSL_HD void position(int b, int d, int h, int w, T* x) const {
    apply_affine(maps[b], d, h, w, x);
  }
};

// d loss / d theta is a sum over output voxels p of c_i * g_i(p) * n_j(p), with g = d loss /
// d input index, c_i = d index / d normalized coordinate and n_j(p) = a_j * (p_j - centre_j)
// affine_grid's base coordinate (both align_corners conventions have this form). The kernels sum
// 12 moments per batch element: kMoments[i * 4 + j] = sum g_i * (p_j - centre_j) for j < 3 and
// kMoments[i * 4 + 3] = sum g_i, centred so that no large terms cancel.
constexpr int kMoments = 12;

GVSL_HD float half_extent(int size) { return 0.5f * float(size - 1); }

// Adds one voxel's moments: g in (d, h, w), output index (d, h, w), out_size (D, H, W).
template <typename T, typename A>
GVSL_HD void theta_moments(const T* g, int d, int h, int w, const int* out_size, A* m) {
  const T p[3] = {T(d) - T(half_extent(out_size[0])), T(h) - T(half_extent(out_size[1])),
                  T(w) - T(half_extent(out_size[2]))};
  GVSL_UNROLL
  for (int i = 0; i < 3; ++i) {
    GVSL_UNROLL
    for (int j = 0; j < 3; ++j) m[i * 4 + j] += g[i] * p[j];
    m[i * 4 + 3] += g[i];
  }
}

// Turns summed moments (12, as above) into d loss / d theta (12, row-major, x/y/z order).
template <typename T>
GVSL_HD void theta_grad_from_moments(const T* m, const int* out_size, const int* in_size,
                                     bool align_corners, T* dtheta) {
  GVSL_UNROLL
  for (int i = 0; i < 3; ++i) {
    const int ri = 2 - i;
    const T c = unnormalize_scale<T>(in_size[i], align_corners);
    GVSL_UNROLL
    for (int j = 0; j < 3; ++j) {
      const int so = out_size[j];
      const T a = so <= 1 ? T(0) : (align_corners ? T(2) / T(so - 1) : T(2) / T(so));
      dtheta[ri * 4 + (2 - j)] = c * a * m[i * 4 + j];
    }
    dtheta[ri * 4 + 3] = c * m[i * 4 + 3];
  }
}

// ---- one output voxel, all channels (the CUDA kernels' per-voxel bodies) -------------------
// The stencil of the voxel's position is built once and serves every channel. The CPU loops
// batch these steps over rows of voxels instead; the tests run the CUDA kernels, and with them
// these very functions, on the host (csrc/cuda/emulate.h, tests/test_cuda_emulated.py).

// out(b, :, d, h, w) = image(b, :) sampled at src's position of output voxel (b, d, h, w).
template <typename S, typename Src>
GVSL_HD void sample_forward_voxel(const S* img, S* out, const Geometry& g, const Src& src,
                                  int mode, int padding, int b, int d, int h, int w) {
  using T = acc_t<S>;
  T x[3];
  src.position(b, d, h, w, x);
  Stencil<T> s;
  make_stencil<T, false>(x, g.in_size, g.is[2], g.is[3], g.is[4], mode, padding, s);
  const S* ib = img + b * g.is[0];
  S* o = out + b * g.os[0] + d * g.os[2] + h * g.os[3] + w * g.os[4];
  for (int c = 0; c < g.C; ++c)
    o[c * g.os[1]] = static_cast<S>(stencil_value(s, ib + c * g.is[1]));
}

// Backward of output voxel (b, d, h, w) given gout = dL/d out. kImage: scatter_image(c, offset,
// value) for every corner of nonzero weight, offsets from the origin of channel c of batch
// element b, in the image's strides. kPos: gp (d, h, w) = dL/d position, for the source to store
// (flow, grid) or to fold into theta moments (affine).
template <bool kImage, bool kPos, typename S, typename Src, typename ScatterImage>
GVSL_HD void sample_backward_voxel(const S* img, const S* gout, const Geometry& g,
                                   const Src& src, int mode, int padding, int b, int d, int h,
                                   int w, ScatterImage&& scatter_image, acc_t<S>* gp) {
  using T = acc_t<S>;
  T x[3];
  src.position(b, d, h, w, x);
  Stencil<T> s;
  make_stencil<T, kPos>(x, g.in_size, g.is[2], g.is[3], g.is[4], mode, padding, s);
  const S* ib = img + b * g.is[0];
  const S* go_p = gout + b * g.os[0] + d * g.os[2] + h * g.os[3] + w * g.os[4];
  if constexpr (kPos) gp[0] = gp[1] = gp[2] = T(0);
  for (int c = 0; c < g.C; ++c) {
    const T go = static_cast<T>(go_p[c * g.os[1]]);
    if constexpr (kImage)
      stencil_scatter(s, [&](int64_t off, T wt) { scatter_image(c, off, wt * go); });
    if constexpr (kPos) stencil_pos_grad(s, ib + c * g.is[1], go, gp);
  }
}

}  // namespace gvsl
