// Per-voxel sampling math shared by warp, grid_sample, affine_warp, compose and affine_flow_warp,
// on the CPU and the GPU alike. Index space: voxel centres at integers 0..S-1.
#pragma once
#include "macros.h"

// Full unrolling of short constant loops on both compilers (GCC ignores a bare `#pragma unroll`,
// and would otherwise keep the stencil arrays on the stack).
#if defined(__CUDACC__) || defined(__clang__)
#define GVSL_UNROLL _Pragma("unroll")
#else
#define GVSL_UNROLL _Pragma("GCC unroll 8")
#endif

namespace gvsl {

enum Padding : int { kZeros = 0, kBorder = 1 };
enum Interp : int { kBilinear = 0, kNearest = 1 };

// One axis of a trilinear stencil: corners i0 and i0 + 1 with weights (1 - f, f).
template <typename T> struct Axis {
  int i0;
  T f;
  bool v0, v1;  // corner inside [0, size): values outside read as zero
  T dcoord;     // d(used coordinate)/d(input coordinate): 0 where border padding clamps
};

// Trilinear axis of coordinate x on an axis of `size` voxels.
// Border: clamp to [0, size-1], zero gradient at and beyond the edge (F.grid_sample passes the
// gradient at exactly the edge; the two agree everywhere else);
// NaN goes to 0. Zeros: a coordinate far outside (or non-finite) reads nothing.
template <typename T> GVSL_HD Axis<T> linear_axis(T x, int size, int padding) {
  // Branch-free (selects only), so that CPU row loops vectorize.
  Axis<T> a;
  if (padding == kBorder) {
    const T hi = T(size - 1);
    a.dcoord = ((x > T(0)) & (x < hi)) ? T(1) : T(0);
    x = x > T(0) ? x : T(0);  // NaN goes to 0 too
    x = x < hi ? x : hi;
  } else {
    a.dcoord = T(1);
    x = ((x > T(-2)) & (x < T(size + 1))) ? x : T(-2);  // far: both corners outside, all zero
  }
  // floor by truncation (x is finite and > -3 here): unlike floorf, this vectorizes
  const int t = static_cast<int>(x);
  a.i0 = t - (x < static_cast<T>(t));
  a.f = x - static_cast<T>(a.i0);
  a.v0 = (a.i0 >= 0) & (a.i0 < size);
  a.v1 = (a.i0 + 1 >= 0) & (a.i0 + 1 < size);
  return a;
}

// Nearest index (round half to even, as F.grid_sample); -1 when outside with zeros padding.
template <typename T> GVSL_HD int nearest_index(T x, int size, int padding) {
  if (padding == kBorder) {
    x = x > T(0) ? x : T(0);  // also NaN
    x = x > T(size - 1) ? T(size - 1) : x;
  } else {
    x = ((x > T(-2)) & (x < T(size + 1))) ? x : T(-2);  // far (or NaN): outside
  }
  const int i = static_cast<int>(gnearbyint(x));
  return ((i >= 0) & (i < size)) ? i : -1;
}

// ---- the 8-corner stencil of one sampling position ----------------------------------------
// Element offsets into a (D, H, W) volume and their weights, computed once per position and
// reused for every channel (values, position derivatives, scatters). Corner c = 4 i + 2 j + k is
// (i0 + i, j0 + j, k0 + k). Corners outside the volume read as zero and are never scattered to,
// so an inf or NaN inside the volume cannot leak into samples outside it, as with F.grid_sample.
// They get weight 0 and offset kOutside, which corner_value does not load (a predicated load on
// the GPU); or, with kSignedZero (the CPU row loops, cpu::RowStencils, whose loads stay
// unconditional so that they vectorize), offset 0, a valid address, and weight -0, which no
// corner inside has (its weights are products of values >= +0). Built with kGrad, dw[a][c] =
// d w[c] / d position_a (already times the axis's border clamp factor dcoord); without it, dw is
// left unset.
constexpr int kOutside = -1;

// Value of the corner at offset off of one channel (`img`: its (0, 0, 0) voxel); zero for
// kOutside.
template <typename T, typename I, typename S> GVSL_HD T corner_value(const S* img, I off) {
  return off < 0 ? T(0) : static_cast<T>(img[off]);
}

template <typename T, typename I = int64_t> struct Stencil {
  I off[8];  // I: int32_t on the CPU where every offset fits (vectorizes), else int64_t
  T w[8];
  T dw[3][8];
};

// Trilinear stencil of the three axes of a position, in element strides (sd, sh, sw).
template <typename T, bool kGrad, typename I, bool kSignedZero = false>
GVSL_HD void make_stencil(const Axis<T>& ad, const Axis<T>& ah, const Axis<T>& aw, I sd,
                          I sh, I sw, Stencil<T, I>& s) {
  const I out_off = kSignedZero ? I(0) : I(kOutside);
  const T out_w = kSignedZero ? T(-0.0) : T(0);
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
        s.off[c] = ok ? (ad.i0 + i) * sd + (ah.i0 + j) * sh + (aw.i0 + k) * sw : out_off;
        s.w[c] = ok ? wd[i] * wh[j] * ww[k] : out_w;
        if (kGrad) {
          s.dw[0][c] = ok ? gd[i] * wh[j] * ww[k] : T(0);
          s.dw[1][c] = ok ? wd[i] * gh[j] * ww[k] : T(0);
          s.dw[2][c] = ok ? wd[i] * wh[j] * gw[k] : T(0);
        }
      }
    }
  }
}

// Stencil of index position x = (d, h, w) on a volume of `size` voxels, trilinear or nearest
// (`mode`). Nearest puts its one corner in slot 0 and has zero derivatives.
template <typename T, bool kGrad, typename I, bool kSignedZero = false>
GVSL_HD void make_stencil(const T* x, const int* size, I sd, I sh, I sw, int mode,
                          int padding, Stencil<T, I>& s) {
  if (mode == kNearest) {
    const I out_off = kSignedZero ? I(0) : I(kOutside);
    const T out_w = kSignedZero ? T(-0.0) : T(0);
    const int id = nearest_index(x[0], size[0], padding);
    const int ih = nearest_index(x[1], size[1], padding);
    const int iw = nearest_index(x[2], size[2], padding);
    const bool ok = (id >= 0) & (ih >= 0) & (iw >= 0);
    GVSL_UNROLL
    for (int k = 0; k < 8; ++k) {
      s.off[k] = out_off;
      s.w[k] = out_w;
      if (kGrad) s.dw[0][k] = s.dw[1][k] = s.dw[2][k] = T(0);
    }
    s.off[0] = ok ? id * sd + ih * sh + iw * sw : out_off;
    s.w[0] = ok ? T(1) : out_w;
    return;
  }
  make_stencil<T, kGrad, I, kSignedZero>(linear_axis(x[0], size[0], padding),
                                         linear_axis(x[1], size[1], padding),
                                         linear_axis(x[2], size[2], padding), sd, sh, sw, s);
}

// Interpolated value of one channel (`img` points at its (0, 0, 0) voxel).
template <typename T, typename I, typename S>
GVSL_HD T stencil_value(const Stencil<T, I>& s, const S* img) {
  T out = T(0);
  GVSL_UNROLL
  for (int k = 0; k < 8; ++k) out += s.w[k] * corner_value<T>(img, s.off[k]);
  return out;
}

// Adds g * d value / d position of one channel to gpos (3 values, d/h/w); needs kGrad.
template <typename T, typename I, typename S>
GVSL_HD void stencil_pos_grad(const Stencil<T, I>& s, const S* img, T g, T* gpos) {
  T a = T(0), b = T(0), c = T(0);
  GVSL_UNROLL
  for (int k = 0; k < 8; ++k) {
    const T v = corner_value<T>(img, s.off[k]);
    a += s.dw[0][k] * v;
    b += s.dw[1][k] * v;
    c += s.dw[2][k] * v;
  }
  gpos[0] += g * a;
  gpos[1] += g * b;
  gpos[2] += g * c;
}

// The adjoint of stencil_value: calls f(offset, weight) for each corner of nonzero weight
// (kOutside corners have weight 0; skipping the others of weight 0 saves GPU atomics).
template <typename T, typename I, typename F>
GVSL_HD void stencil_scatter(const Stencil<T, I>& s, F&& f) {
  GVSL_UNROLL
  for (int k = 0; k < 8; ++k)
    if (s.w[k] != T(0)) f(s.off[k], s.w[k]);
}

// ---- normalized coordinates (F.affine_grid / F.grid_sample conventions) -------------------

// Index of normalized coordinate x on an axis of `size` voxels (grid_sample's unnormalize).
template <typename T> GVSL_HD T unnormalize(T x, int size, bool align_corners) {
  return align_corners ? (x + T(1)) * T(0.5) * T(size - 1)
                       : ((x + T(1)) * T(size) - T(1)) * T(0.5);
}
// d index / d normalized coordinate.
template <typename T> GVSL_HD T unnormalize_scale(int size, bool align_corners) {
  return align_corners ? T(0.5) * T(size - 1) : T(0.5) * T(size);
}

// theta (3 x 4, rows and columns in x, y, z = W, H, D order, F.affine_grid's convention)
// folded into one index-space map: input index = m * (d, h, w) + t, in (d, h, w) order.
// Written so that the identity theta with equal in/out sizes gives exactly p_hat = p:
// the diagonal ratios are one division each and the translation cancels exactly.
template <typename T> struct AffineIndexMap {
  T m[3][3];
  T t[3];
};

// theta: 12 values, row-major; out_size / in_size in (D, H, W).
template <typename T, typename S>
GVSL_HD AffineIndexMap<T> affine_index_map(const S* theta, const int* out_size,
                                           const int* in_size, bool align_corners) {
  AffineIndexMap<T> A;
GVSL_UNROLL
  for (int i = 0; i < 3; ++i) {          // input axis, d/h/w
    const int ri = 2 - i;                 // theta row (x = w)
    const T c = unnormalize_scale<T>(in_size[i], align_corners);
    T acc = static_cast<T>(theta[ri * 4 + 3]) * c + T(0.5) * T(in_size[i] - 1);
GVSL_UNROLL
    for (int j = 0; j < 3; ++j) {        // output axis, d/h/w
      const int cj = 2 - j;
      const T th = static_cast<T>(theta[ri * 4 + cj]);
      const int so = out_size[j], si = in_size[i];
      // c_i * a_j and c_i * b_j, with a, b the base grid's slope and offset
      T ca, cb;
      if (so <= 1) {
        ca = T(0);
        cb = T(0);
      } else if (align_corners) {
        ca = T(si - 1) / T(so - 1);
        cb = T(-0.5) * T(si - 1);
      } else {
        ca = T(si) / T(so);
        cb = T(si) * T(1 - so) / T(2 * so);
      }
      A.m[i][j] = th * ca;
      acc += th * cb;
    }
    A.t[i] = acc;
  }
  return A;
}

// Input index (d, h, w) of output index (d, h, w).
template <typename T>
GVSL_HD void apply_affine(const AffineIndexMap<T>& A, int d, int h, int w, T* out) {
GVSL_UNROLL
  for (int i = 0; i < 3; ++i)
    out[i] = A.m[i][0] * T(d) + A.m[i][1] * T(h) + A.m[i][2] * T(w) + A.t[i];
}

}  // namespace gvsl
