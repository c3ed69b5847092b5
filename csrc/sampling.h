// Per-voxel sampling math shared by warp, grid_sample, affine_warp, compose and affine_flow_warp,
// on the CPU and the GPU alike. Index space: voxel centres at integers 0..S-1.
#pragma once
#include "macros.h"

// Force-inlined on the host so that the CPU row loops that call these vectorize.
#ifdef __CUDACC__
#define GVSL_HD_INLINE GVSL_HD
#else
#define GVSL_HD_INLINE inline __attribute__((always_inline))
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
// Border: clamp to [0, size-1], zero gradient at and beyond the edge (as F.grid_sample);
// NaN goes to 0. Zeros: a coordinate far outside (or non-finite) reads nothing.
template <typename T> GVSL_HD_INLINE Axis<T> linear_axis(T x, int size, int padding) {
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
  const T fl = gfloor(x);
  a.i0 = static_cast<int>(fl);
  a.f = x - fl;
  a.v0 = (a.i0 >= 0) & (a.i0 < size);
  a.v1 = (a.i0 + 1 >= 0) & (a.i0 + 1 < size);
  return a;
}

// Nearest index (round half to even, as F.grid_sample); -1 when outside with zeros padding.
template <typename T> GVSL_HD_INLINE int nearest_index(T x, int size, int padding) {
  if (padding == kBorder) {
    x = x > T(0) ? x : T(0);  // also NaN
    x = x > T(size - 1) ? T(size - 1) : x;
  } else {
    x = ((x > T(-2)) & (x < T(size + 1))) ? x : T(-2);  // far (or NaN): outside
  }
  const int i = static_cast<int>(gnearbyint(x));
  return ((i >= 0) & (i < size)) ? i : -1;
}

// Value at one position of a (D, H, W) volume with element strides (sd, sh, sw).
template <typename S, typename T>
GVSL_HD T trilinear(const S* img, int64_t sd, int64_t sh, int64_t sw, const Axis<T>& ad,
                    const Axis<T>& ah, const Axis<T>& aw) {
  const T wd[2] = {T(1) - ad.f, ad.f}, wh[2] = {T(1) - ah.f, ah.f}, ww[2] = {T(1) - aw.f, aw.f};
  const bool vd[2] = {ad.v0, ad.v1}, vh[2] = {ah.v0, ah.v1}, vw[2] = {aw.v0, aw.v1};
  T out = T(0);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!vd[i]) continue;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (!vh[j]) continue;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        if (!vw[k]) continue;
        const T v = static_cast<T>(img[(ad.i0 + i) * sd + (ah.i0 + j) * sh + (aw.i0 + k) * sw]);
        out += wd[i] * wh[j] * ww[k] * v;
      }
    }
  }
  return out;
}

// Value and its derivatives along d, h, w (already multiplied by each axis's dcoord).
template <typename S, typename T>
GVSL_HD T trilinear_grad(const S* img, int64_t sd, int64_t sh, int64_t sw, const Axis<T>& ad,
                         const Axis<T>& ah, const Axis<T>& aw, T& gd, T& gh, T& gw) {
  const T wd[2] = {T(1) - ad.f, ad.f}, wh[2] = {T(1) - ah.f, ah.f}, ww[2] = {T(1) - aw.f, aw.f};
  const T sg[2] = {T(-1), T(1)};
  const bool vd[2] = {ad.v0, ad.v1}, vh[2] = {ah.v0, ah.v1}, vw[2] = {aw.v0, aw.v1};
  T out = T(0);
  gd = gh = gw = T(0);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!vd[i]) continue;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (!vh[j]) continue;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        if (!vw[k]) continue;
        const T v = static_cast<T>(img[(ad.i0 + i) * sd + (ah.i0 + j) * sh + (aw.i0 + k) * sw]);
        out += wd[i] * wh[j] * ww[k] * v;
        gd += sg[i] * wh[j] * ww[k] * v;
        gh += wd[i] * sg[j] * ww[k] * v;
        gw += wd[i] * wh[j] * sg[k] * v;
      }
    }
  }
  gd *= ad.dcoord;
  gh *= ah.dcoord;
  gw *= aw.dcoord;
  return out;
}

// Calls f(offset, weight) for each corner inside the volume: the adjoint (scatter) of trilinear.
template <typename T, typename F>
GVSL_HD void for_each_corner(int64_t sd, int64_t sh, int64_t sw, const Axis<T>& ad,
                             const Axis<T>& ah, const Axis<T>& aw, F&& f) {
  const T wd[2] = {T(1) - ad.f, ad.f}, wh[2] = {T(1) - ah.f, ah.f}, ww[2] = {T(1) - aw.f, aw.f};
  const bool vd[2] = {ad.v0, ad.v1}, vh[2] = {ah.v0, ah.v1}, vw[2] = {aw.v0, aw.v1};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!vd[i]) continue;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (!vh[j]) continue;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        if (!vw[k]) continue;
        f((ad.i0 + i) * sd + (ah.i0 + j) * sh + (aw.i0 + k) * sw, wd[i] * wh[j] * ww[k]);
      }
    }
  }
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
// Normalized coordinate of output index i (affine_grid's base grid; 0 on an axis of one voxel).
template <typename T> GVSL_HD T base_coord(int i, int size, bool align_corners) {
  if (size <= 1) return T(0);
  return align_corners ? T(2 * i) / T(size - 1) - T(1) : T(2 * i + 1) / T(size) - T(1);
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
#pragma unroll
  for (int i = 0; i < 3; ++i) {          // input axis, d/h/w
    const int ri = 2 - i;                 // theta row (x = w)
    const T c = unnormalize_scale<T>(in_size[i], align_corners);
    T acc = static_cast<T>(theta[ri * 4 + 3]) * c + T(0.5) * T(in_size[i] - 1);
#pragma unroll
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
#pragma unroll
  for (int i = 0; i < 3; ++i)
    out[i] = A.m[i][0] * T(d) + A.m[i][1] * T(h) + A.m[i][2] * T(w) + A.t[i];
}

// Adds one voxel's contribution to d loss / d theta (12 values, row-major, xyz order), given
// g = d loss / d (input index) in (d, h, w) order at output index p.
template <typename T>
GVSL_HD void accumulate_theta_grad(const T* g, int d, int h, int w, const int* out_size,
                                   const int* in_size, bool align_corners, T* dtheta) {
  const T n[3] = {base_coord<T>(d, out_size[0], align_corners),
                  base_coord<T>(h, out_size[1], align_corners),
                  base_coord<T>(w, out_size[2], align_corners)};
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    const int ri = 2 - i;
    const T gi = g[i] * unnormalize_scale<T>(in_size[i], align_corners);
#pragma unroll
    for (int j = 0; j < 3; ++j) dtheta[ri * 4 + (2 - j)] += gi * n[j];
    dtheta[ri * 4 + 3] += gi;
  }
}

}  // namespace gvsl

// ---- 8-corner stencil: one position's trilinear offsets and weights, computed once and applied
// to several channels (values, derivatives, scatters). Same corner order and products as
// trilinear / trilinear_grad / for_each_corner, so the results are identical to theirs.
// GVSL_UNROLL: full unrolling of short constant loops on both compilers (GCC ignores a bare
// `#pragma unroll`, and would otherwise keep the stencil arrays on the stack).
#ifdef __CUDACC__
#define GVSL_UNROLL _Pragma("unroll")
#else
#define GVSL_UNROLL _Pragma("GCC unroll 8")
#endif

namespace gvsl {

template <typename T> struct CornerStencil {
  int64_t off[8];  // corner c = 4 i + 2 j + k at offset (i0 + i) sd + (j0 + j) sh + (k0 + k) sw
  T w[8];          // value weights
  unsigned valid;  // bit c: corner c inside the volume (outside corners are never read)
};

// Derivative weights along d, h, w (each already multiplied by its axis's dcoord).
template <typename T> struct StencilGrad {
  T d[8], h[8], w[8];
};

template <typename T>
GVSL_HD CornerStencil<T> make_stencil(int64_t sd, int64_t sh, int64_t sw, const Axis<T>& ad,
                                const Axis<T>& ah, const Axis<T>& aw) {
  const T wd[2] = {T(1) - ad.f, ad.f}, wh[2] = {T(1) - ah.f, ah.f}, ww[2] = {T(1) - aw.f, aw.f};
  const bool vd[2] = {ad.v0, ad.v1}, vh[2] = {ah.v0, ah.v1}, vw[2] = {aw.v0, aw.v1};
  CornerStencil<T> s;
  s.valid = 0u;
  const int64_t base = ad.i0 * sd + ah.i0 * sh + aw.i0 * sw;
GVSL_UNROLL
  for (int c = 0; c < 8; ++c) {
    const int i = c >> 2, j = (c >> 1) & 1, k = c & 1;
    s.off[c] = base + (i ? sd : 0) + (j ? sh : 0) + (k ? sw : 0);
    s.w[c] = wd[i] * wh[j] * ww[k];
    s.valid |= unsigned(vd[i] && vh[j] && vw[k]) << c;
  }
  return s;
}

template <typename T>
GVSL_HD StencilGrad<T> make_stencil_grad(const Axis<T>& ad, const Axis<T>& ah,
                                         const Axis<T>& aw) {
  const T wd[2] = {T(1) - ad.f, ad.f}, wh[2] = {T(1) - ah.f, ah.f}, ww[2] = {T(1) - aw.f, aw.f};
  const T sd[2] = {-ad.dcoord, ad.dcoord}, sh[2] = {-ah.dcoord, ah.dcoord},
          sw[2] = {-aw.dcoord, aw.dcoord};
  StencilGrad<T> g;
GVSL_UNROLL
  for (int c = 0; c < 8; ++c) {
    const int i = c >> 2, j = (c >> 1) & 1, k = c & 1;
    g.d[c] = sd[i] * wh[j] * ww[k];
    g.h[c] = wd[i] * sh[j] * ww[k];
    g.w[c] = wd[i] * wh[j] * sw[k];
  }
  return g;
}

template <typename S, typename T> GVSL_HD T stencil_value(const S* img, const CornerStencil<T>& s) {
  T out = T(0);
GVSL_UNROLL
  for (int c = 0; c < 8; ++c)
    if ((s.valid >> c) & 1u) out += s.w[c] * static_cast<T>(img[s.off[c]]);
  return out;
}

// Derivatives along d, h, w at the stencil's position (the value is stencil_value).
template <typename S, typename T>
GVSL_HD void stencil_derivatives(const S* img, const CornerStencil<T>& s, const StencilGrad<T>& g,
                                 T& gd, T& gh, T& gw) {
  gd = gh = gw = T(0);
GVSL_UNROLL
  for (int c = 0; c < 8; ++c) {
    if (!((s.valid >> c) & 1u)) continue;
    const T v = static_cast<T>(img[s.off[c]]);
    gd += g.d[c] * v;
    gh += g.h[c] * v;
    gw += g.w[c] * v;
  }
}

// Calls f(offset, weight) for each corner inside the volume (the adjoint of stencil_value).
template <typename T, typename F> GVSL_HD void stencil_scatter(const CornerStencil<T>& s, F&& f) {
GVSL_UNROLL
  for (int c = 0; c < 8; ++c)
    if ((s.valid >> c) & 1u) f(s.off[c], s.w[c]);
}

}  // namespace gvsl
