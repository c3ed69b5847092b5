// Per-voxel math of warp, grid_sample and affine_warp, shared by the CPU loops (csrc/cpu) and
// the CUDA kernels (csrc/cuda): the 8-corner stencil of one sampling position, and the three
// sources of positions (a displacement field, a normalized grid, an affine theta).
#pragma once
#include "sampling.h"

#if defined(__CUDACC__) || defined(__clang__)
#define GVSL_UNROLL _Pragma("unroll")
#else
#define GVSL_UNROLL _Pragma("GCC unroll 8")
#endif

namespace gvsl {

// The 8 corners of one sampling position: element offsets into a (D, H, W) volume and their
// weights, computed once per voxel and reused for every channel. Corners outside the volume get
// weight 0 and offset 0 (a valid address), so channel loops need no branches.
// With `grad`, dw[a][k] = d weight_k / d position_a (already times the border clamp factor).
template <typename T> struct Stencil {
  int64_t off[8];
  T w[8];
  T dw[3][8];
};

// Builds the stencil of index position x = (d, h, w) on a volume of `size` voxels with element
// strides (sd, sh, sw). Nearest mode puts the one corner in slot 0 and has zero derivatives.
template <typename T, bool kGrad>
GVSL_HD_INLINE void make_stencil(const T* x, const int* size, int64_t sd, int64_t sh,
                                 int64_t sw, int mode, int padding, Stencil<T>& s) {
  if (mode == kNearest) {
    const int id = nearest_index(x[0], size[0], padding);
    const int ih = nearest_index(x[1], size[1], padding);
    const int iw = nearest_index(x[2], size[2], padding);
    const bool ok = (id >= 0) & (ih >= 0) & (iw >= 0);
    GVSL_UNROLL
    for (int k = 0; k < 8; ++k) {
      s.off[k] = 0;
      s.w[k] = T(0);
      if (kGrad) s.dw[0][k] = s.dw[1][k] = s.dw[2][k] = T(0);
    }
    s.off[0] = ok ? id * sd + ih * sh + iw * sw : 0;
    s.w[0] = ok ? T(1) : T(0);
    return;
  }
  const Axis<T> ad = linear_axis(x[0], size[0], padding);
  const Axis<T> ah = linear_axis(x[1], size[1], padding);
  const Axis<T> aw = linear_axis(x[2], size[2], padding);
  const T wd[2] = {T(1) - ad.f, ad.f}, wh[2] = {T(1) - ah.f, ah.f}, ww[2] = {T(1) - aw.f, aw.f};
  const T gd[2] = {-ad.dcoord, ad.dcoord}, gh[2] = {-ah.dcoord, ah.dcoord},
          gw[2] = {-aw.dcoord, aw.dcoord};
  const bool vd[2] = {ad.v0, ad.v1}, vh[2] = {ah.v0, ah.v1}, vw[2] = {aw.v0, aw.v1};
  GVSL_UNROLL
  for (int i = 0; i < 2; ++i) {
    GVSL_UNROLL
    for (int j = 0; j < 2; ++j) {
      GVSL_UNROLL
      for (int k = 0; k < 2; ++k) {
        const int c = i * 4 + j * 2 + k;
        const bool ok = vd[i] & vh[j] & vw[k];
        s.off[c] = ok ? (ad.i0 + i) * sd + (ah.i0 + j) * sh + (aw.i0 + k) * sw : 0;
        s.w[c] = ok ? wd[i] * wh[j] * ww[k] : T(0);
        if (kGrad) {
          s.dw[0][c] = ok ? gd[i] * wh[j] * ww[k] : T(0);
          s.dw[1][c] = ok ? wd[i] * gh[j] * ww[k] : T(0);
          s.dw[2][c] = ok ? wd[i] * wh[j] * gw[k] : T(0);
        }
      }
    }
  }
}

// Interpolated value of one channel (`img` points at its (0, 0, 0) voxel).
template <typename T, typename S> GVSL_HD T stencil_value(const Stencil<T>& s, const S* img) {
  T out = T(0);
  GVSL_UNROLL
  for (int k = 0; k < 8; ++k) out += s.w[k] * static_cast<T>(img[s.off[k]]);
  return out;
}

// Adds g * d value / d position of one channel to gpos (3 values, d/h/w).
template <typename T, typename S>
GVSL_HD void stencil_pos_grad(const Stencil<T>& s, const S* img, T g, T* gpos) {
  T a = T(0), b = T(0), c = T(0);
  GVSL_UNROLL
  for (int k = 0; k < 8; ++k) {
    const T v = static_cast<T>(img[s.off[k]]);
    a += s.dw[0][k] * v;
    b += s.dw[1][k] * v;
    c += s.dw[2][k] * v;
  }
  gpos[0] += g * a;
  gpos[1] += g * b;
  gpos[2] += g * c;
}

// ---- position sources: where output voxel (b, d, h, w) samples, and where its gradient goes --

enum Source : int { kFlow = 0, kGrid = 1, kAffine = 2 };

// flow (B, 3, D, H, W) in voxels, channels d/h/w: position p + flow(p). Strides in elements.
template <typename S> struct FlowSource {
  static constexpr int kind = kFlow;
  const S* flow;
  S* grad;  // same strides as flow
  int64_t sb, sc, sd, sh, sw;

  template <typename T> GVSL_HD_INLINE void position(int b, int d, int h, int w, T* x) const {
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

  template <typename T> GVSL_HD_INLINE void position(int b, int d, int h, int w, T* x) const {
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

  GVSL_HD_INLINE void position(int b, int d, int h, int w, T* x) const {
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

}  // namespace gvsl
