// Per-voxel math of the local normalized cross-correlation (DESIGN §3), shared by the CPU loop
// (csrc/cpu/lncc.cpp) and the CUDA kernels (csrc/cuda/lncc.cu). Inputs are the five zero-padded
// window sums SI, SJ, SII, SJJ, SIJ of one voxel; n = window^3.
#pragma once
#include <type_traits>

#include "macros.h"

namespace gvsl {

enum LnccPreset : int { kLnccGvsl = 0, kLnccVoxelmorph = 1, kLnccMonai = 2 };
enum LnccReduction : int { kLnccNone = 0, kLnccMean = 1, kLnccSum = 2 };

// Box-summed quantities of the forward pass, in this order.
enum LnccSum : int { kSI = 0, kSJ = 1, kSII = 2, kSJJ = 3, kSIJ = 4, kLnccSums = 5 };

template <typename T> struct LnccParams {
  T n, eps, smooth_nr;  // n = window^3
  int preset;
};

template <typename T> struct LnccStats {
  T cross, ivar, jvar, mui, muj;
};

// The means divide (rather than multiply by 1/n), so that a window of one constant c has mu = c
// exactly: its variance is then zero where the squares summed are exact, and a rounding residue
// elsewhere. A window of one voxel (n = 1) has no variance or cross term at all: its statistics are
// set to zero. (Computed, SII holds I^2 rounded to float32 while SI^2 is exact in double: a
// residue that MONAI's cc, dividing by eps^2, made up to 1e2 near intensity 100 instead of 0.)
template <typename T>
GVSL_HD LnccStats<T> lncc_stats(T si, T sj, T sii, T sjj, T sij, T n) {
  LnccStats<T> s;
  s.mui = si / n;
  s.muj = sj / n;
  const bool one = n == T(1);
  s.cross = one ? T(0) : sij - si * s.muj;
  s.ivar = one ? T(0) : sii - si * s.mui;
  s.jvar = one ? T(0) : sjj - sj * s.muj;
  return s;
}

// The statistics in another precision: the CUDA kernels compute them in double from double
// window sums (the cancellation of SII - SI^2/n and the like happens there) and evaluate the
// formulas below in float.
template <typename T, typename U> GVSL_HD LnccStats<T> lncc_stats_cast(const LnccStats<U>& s) {
  LnccStats<T> r;
  r.cross = T(s.cross);
  r.ivar = T(s.ivar);
  r.jvar = T(s.jvar);
  r.mui = T(s.mui);
  r.muj = T(s.muj);
  return r;
}

GVSL_HD float gmax(float x, float y) { return x > y ? x : y; }
GVSL_HD double gmax(double x, double y) { return x > y ? x : y; }

// cc = cross^2 / (Ivar Jvar + eps) (gvsl, voxelmorph), or MONAI's
// (cross^2 + smooth_nr) / (max(Ivar, eps) max(Jvar, eps)). Zero variance gives a finite cc.
// Written with the quotients lncc_coefs also forms, so that a loop computing both divides once.
template <typename T> GVSL_HD T lncc_cc(const LnccStats<T>& s, const LnccParams<T>& p) {
  if (p.preset == kLnccMonai) {
    const T inv = T(1) / (gmax(s.ivar, p.eps) * gmax(s.jvar, p.eps));
    return (s.cross * s.cross + p.smooth_nr) * inv;
  }
  return s.cross / (s.ivar * s.jvar + p.eps) * s.cross;
}

// The per-voxel term that mean/sum reduce: 1 - cc (gvsl) or -cc (voxelmorph, monai).
template <typename T> GVSL_HD T lncc_term(T cc, int preset) {
  return preset == kLnccGvsl ? T(1) - cc : -cc;
}

// Backward coefficients for g = dL/dcc: a = g dcc/dcross, b = -2 g dcc/dIvar, c = -2 g dcc/dJvar
// (DESIGN §3). With MONAI's clamp the variance has zero gradient where it is clamped (as
// clamp_min: the gradient passes where Ivar >= eps).
template <typename T> struct LnccCoefs {
  T a, b, c;
};

template <typename T>
GVSL_HD LnccCoefs<T> lncc_coefs(const LnccStats<T>& s, T g, const LnccParams<T>& p) {
  LnccCoefs<T> k;
  if (p.preset == kLnccMonai) {
    const T iv = gmax(s.ivar, p.eps), jv = gmax(s.jvar, p.eps);
    const T inv = T(1) / (iv * jv);  // one division: 1/iv = jv * inv, 1/jv = iv * inv
    const T cc = (s.cross * s.cross + p.smooth_nr) * inv;
    k.a = T(2) * g * s.cross * inv;
    k.b = s.ivar >= p.eps ? T(2) * g * cc * jv * inv : T(0);
    k.c = s.jvar >= p.eps ? T(2) * g * cc * iv * inv : T(0);
  } else {
    const T den = s.ivar * s.jvar + p.eps;
    const T r = s.cross / den;
    k.a = T(2) * g * r;
    k.b = T(2) * g * r * r * s.jvar;
    k.c = T(2) * g * r * r * s.ivar;
  }
  return k;
}

// How many coefficient maps lncc_coef_maps writes.
GVSL_HD constexpr int lncc_map_count(bool need_i, bool need_j) {
  return 1 + 3 * need_i + 3 * need_j;
}

// Coefficient maps that the backward box-sums: a first, then for each input that needs a
// gradient the three maps of its formula (dL/dI: a*muJ, b, b*muI; dL/dJ: a*muI, c, c*muJ).
// Returns how many were written: lncc_map_count(need_i, need_j).
template <typename T>
GVSL_HD int lncc_coef_maps(const LnccStats<T>& s, const LnccCoefs<T>& k, bool need_i, bool need_j,
                           T* out) {
  int q = 0;
  out[q++] = k.a;
  if (need_i) {
    out[q++] = k.a * s.muj;
    out[q++] = k.b;
    out[q++] = k.b * s.mui;
  }
  if (need_j) {
    out[q++] = k.a * s.mui;
    out[q++] = k.c;
    out[q++] = k.c * s.muj;
  }
  return q;
}

// Host: calls f(std::integral_constant<int, Q>) with Q, the number of coefficient maps, as a
// compile-time constant.
template <class F> void with_maps(bool need_a, bool need_b, F&& f) {
  if (need_a && need_b) {
    f(std::integral_constant<int, 7>());
  } else {
    f(std::integral_constant<int, 4>());
  }
}

// dL/dI(q) = J(q) Box(a) - Box(a muJ) - I(q) Box(b) + Box(b muI); the same with I and J swapped
// (and c for b) for dL/dJ.
template <typename T>
GVSL_HD T lncc_grad(T self, T other, T box_a, T box_a_mu, T box_b, T box_b_mu) {
  return other * box_a - box_a_mu - self * box_b + box_b_mu;
}

}  // namespace gvsl
