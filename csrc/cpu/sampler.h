// CPU loops of the trilinear sampler shared by warp, grid_sample and affine_warp: one skeleton,
// templated on the position source (csrc/warp.h), so the three ops differ only in where a voxel
// samples and where its position gradient goes.
//
// Parallel layout. Forward and position gradients: rows (b, d, h) of output voxels, all channels
// per voxel (the stencil is built once per voxel). Image gradient (a scatter): "lanes", each a
// (channel group, row range) pair; channel groups never collide, and row ranges within a group
// scatter into private buffers summed afterwards in a fixed order. The result depends only on
// the thread count, never on scheduling, so the CPU backward is always run-to-run reproducible.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/memory.h"
#include "sampler_host.h"

namespace gvsl::cpu {

// Stencils of up to kBlock consecutive output voxels of one row, built once per voxel (with the
// options as template arguments) and then reused for every channel of that voxel. The build
// loop vectorizes (with -fno-trapping-math) when the offsets I are int32_t.
constexpr int kBlock = 32;

// From this many channels on, a channels-last image is sampled voxel by voxel with the channel
// loop vectorized: every channel of a corner is contiguous, so one stencil serves a vector of
// channels (gathers and scatters alike; distinct channels never collide). Measured 2x faster
// than the other loops for 32 channels; converting a contiguous image costs about that gain, so
// contiguous images keep their own loops.
constexpr int kChannelVector = 8;

// A 32-byte vector of T (the GCC/Clang vector extension) for the channels-last loops over
// channels, written out because GCC 12 left their omp simd form scalar (the backward's channel
// reduction beside its scatter): 32 channels of affine_warp's backward went from 250 to 90 ms
// on an AVX2 CPU. Loads and stores are unaligned; a stride other than 1 goes element by element.
template <typename T> struct LanesOf {
  typedef T type __attribute__((vector_size(32)));
};
template <typename T> using Lanes = typename LanesOf<T>::type;
template <typename T> constexpr int lanes() { return int(32 / sizeof(T)); }
template <typename T> inline Lanes<T> load_lanes(const T* p, int64_t stride = 1) {
  Lanes<T> v;
  if (stride == 1) {
    std::memcpy(&v, p, sizeof v);
  } else {
    for (int l = 0; l < lanes<T>(); ++l) v[l] = p[l * stride];
  }
  return v;
}
template <typename T> inline void store_lanes(T* p, const Lanes<T>& v, int64_t stride = 1) {
  if (stride == 1) {
    std::memcpy(p, &v, sizeof v);
  } else {
    for (int l = 0; l < lanes<T>(); ++l) p[l * stride] = v[l];
  }
}

inline bool channel_vector(const Geometry& g) { return g.C >= kChannelVector && g.is[1] == 1; }

// The largest element offset inside one channel of a volume of `size` voxels, strides (d, h, w).
inline int64_t last_offset(const int* size, int64_t sd, int64_t sh, int64_t sw) {
  return int64_t(size[0] - 1) * sd + int64_t(size[1] - 1) * sh + int64_t(size[2] - 1) * sw;
}

// Calls f(I{}) with I = int32_t when every stencil offset (at most `last`) fits, else int64_t.
template <typename F> void with_offset_type(int64_t last, F&& f) {
  if (last <= INT32_MAX) f(int32_t{});
  else f(int64_t{});
}

// The offset type of a sampler launch: that of the image's stencils.
template <typename F> void with_offset_type(const Geometry& g, F&& f) {
  with_offset_type(last_offset(g.in_size, g.is[2], g.is[3], g.is[4]), f);
}

// Whether a channel's first voxel, which corners outside the volume read (RowStencils), is
// inf or NaN; with `channels` (`stride` apart), whether that of any of them is.
template <typename S>
inline bool nonfinite_origin(const S* c, int channels = 1, int64_t stride = 1) {
  bool bad = false;
  for (int i = 0; i < channels; ++i) bad |= !std::isfinite(static_cast<acc_t<S>>(c[i * stride]));
  return bad;
}

// Calls f(std::true_type{}) if guard, else f(std::false_type{}): RowStencils::sample's kGuard.
template <typename F> void with_guard(bool guard, F&& f) {
  if (guard) f(std::true_type{});
  else f(std::false_type{});
}

template <typename T, typename I, bool kGrad> struct RowStencils {
  // A corner outside the volume has offset 0 and weight -0 (make_stencil's kSignedZero). sample
  // loads it unconditionally, from the channel's first voxel, which keeps the loops over voxels
  // branch-free and vectorized: times -0 it adds nothing when that voxel is finite. Where it is
  // not (nonfinite_origin), sample<.., true> zeroes those corners instead, so that nothing
  // outside is read, as with F.grid_sample. Scatters add their w * g = -0 * g to the first voxel:
  // exact for a finite g (for a non-finite one the gradient is non-finite anyway, at g's own
  // corners).
  I off[8][kBlock];
  T w[8][kBlock];
  T dw[kGrad ? 3 : 1][8][kBlock];

  bool in(int k, int v) const { return !std::signbit(w[k][v]); }

  // Stencils of n index-space positions x[axis][v] in a volume of `size` voxels with element
  // strides `st` (d, h, w). Mode and padding are template arguments: no option branches per voxel.
  template <int kMode, int kPad>
  void build_at(const T (&x)[3][kBlock], const int* size_ref, const I* st, int n) {
    const int size[3] = {size_ref[0], size_ref[1], size_ref[2]};  // locals: no aliasing
    const I sd = st[0], sh = st[1], sw = st[2];
    // Positions never alias these arrays: no run-time alias check (which picked the scalar
    // loop) is needed.
#pragma GCC ivdep
    for (int v = 0; v < n; ++v) {
      const T xv[3] = {x[0][v], x[1][v], x[2][v]};
      Stencil<T, I> s;
      make_stencil<T, kGrad, I, true>(xv, size, sd, sh, sw, kMode, kPad, s);
      for (int k = 0; k < 8; ++k) {
        off[k][v] = s.off[k];
        w[k][v] = s.w[k];
        if constexpr (kGrad) {
          dw[0][k][v] = s.dw[0][k];
          dw[1][k][v] = s.dw[1][k];
          dw[2][k][v] = s.dw[2][k];
        }
      }
    }
  }

  // Voxel v's eight corners as element pointers into `base` (a channels-last volume: channel c
  // of corner k is p[k][c]) and their weights. Corners outside the volume point at base's first
  // voxel, as in `sample`, or at `zeros` if given (where that voxel has a non-finite channel).
  template <typename P>
  void corners(int v, P* base, P* (&p)[8], T (&wk)[8], P* zeros = nullptr) const {
    for (int k = 0; k < 8; ++k) {
      p[k] = zeros && !in(k, v) ? zeros : base + off[k][v];
      wk[k] = w[k][v];
    }
  }

  // One channel's corner sums at voxel v (c: that channel of the sampled volume, kGuard:
  // nonfinite_origin(c)): returns the trilinear value sum_k w_k c_k and, with kDer, writes its
  // derivative along each index axis, sum_k dw_ak c_k, to der. Always inlined, so it vectorizes
  // in the callers' loops over v.
  template <bool kDer, bool kGuard, typename P>
  GVSL_HD T sample(const P* c, int v, T (&der)[3]) const {
    T acc = T(0), x = T(0), y = T(0), z = T(0);
    GVSL_UNROLL
    for (int k = 0; k < 8; ++k) {
      T val = static_cast<T>(c[off[k][v]]);
      if constexpr (kGuard) val = in(k, v) ? val : T(0);
      acc += w[k][v] * val;
      if constexpr (kDer) {
        x += dw[0][k][v] * val;
        y += dw[1][k][v] * val;
        z += dw[2][k][v] * val;
      }
    }
    der[0] = x;
    der[1] = y;
    der[2] = z;
    return acc;
  }

  void build_at(const T (&x)[3][kBlock], const int* size, const I* st, int n, int mode,
                int padding) {
    if (mode == kNearest) {
      if (padding == kBorder) build_at<kNearest, kBorder>(x, size, st, n);
      else build_at<kNearest, kZeros>(x, size, st, n);
    } else {
      if (padding == kBorder) build_at<kBilinear, kBorder>(x, size, st, n);
      else build_at<kBilinear, kZeros>(x, size, st, n);
    }
  }

  // Stencils of output voxels (b, d, h, w0 .. w0 + n - 1) of a sampler launch.
  template <typename Src>
  void build(const Geometry& g, const Src& src_ref, int b, int d, int h, int w0, int n, int mode,
             int padding) {
    const Src src = src_ref;
    T x[3][kBlock];
#pragma GCC ivdep
    for (int v = 0; v < n; ++v) {
      T xv[3];
      src.position(b, d, h, w0 + v, xv);
      x[0][v] = xv[0];
      x[1][v] = xv[1];
      x[2][v] = xv[2];
    }
    const I st[3] = {I(g.is[2]), I(g.is[3]), I(g.is[4])};
    build_at(x, g.in_size, st, n, mode, padding);
  }
};

// Offset of (b, channel k, d, h, 0) in a position derivative saved by the forward: (B, 3C, D',
// H', W') contiguous, channel 3c + a = d out_c / d position_a (index units).
inline int64_t saved_offset(const Geometry& g, int b, int k, int d, int h) {
  return ((int64_t(b) * 3 * g.C + k) * g.out_size[0] + d) * int64_t(g.out_size[1]) * g.out_size[2] +
         int64_t(h) * g.out_size[2];
}

// With kSave the loop also writes each output's derivative w.r.t. its position to `dpos`
// (saved_offset), from the same corner loads, so that a backward wanting only the position
// gradient is a streaming product (backward_saved) instead of a second pass over the stencils.
template <bool kSave, typename I, typename S, typename Src>
void forward_rows(const S* img, S* out, acc_t<S>* dpos, const Geometry& g, const Src& src,
                  int mode, int padding) {
  using T = acc_t<S>;
  at::parallel_for(0, g.rows(), 1, [&](int64_t r0, int64_t r1) {
    RowStencils<T, I, kSave> st;
    const std::vector<S> zeros(channel_vector(g) ? g.C : 0, S(0));  // corners outside
    const int64_t ow = g.os[4];
    for (int64_t r = r0; r < r1; ++r) {
      int b, d, h;
      g.split(r, b, d, h);
      const S* ib = img + b * g.is[0];
      S* ob = out + b * g.os[0] + d * g.os[2] + h * g.os[3];
      const S* outside = channel_vector(g) && nonfinite_origin(ib, g.C) ? zeros.data() : nullptr;
      for (int w0 = 0; w0 < g.out_size[2]; w0 += kBlock) {
        const int n = std::min(kBlock, g.out_size[2] - w0);
        st.build(g, src, b, d, h, w0, n, mode, padding);
        if (!kSave && channel_vector(g)) {  // voxel by voxel over vectors of channels
          for (int v = 0; v < n; ++v) {
            S* ov = ob + (w0 + v) * ow;
            const S* ik[8];
            T wk[8];
            st.corners(v, ib, ik, wk, outside);
            int c = 0;
            if constexpr (std::is_same_v<S, T>) {
              for (; c + lanes<T>() <= g.C; c += lanes<T>()) {
                Lanes<T> acc = wk[0] * load_lanes(ik[0] + c);
                GVSL_UNROLL
                for (int k = 1; k < 8; ++k) acc += wk[k] * load_lanes(ik[k] + c);
                store_lanes(ov + c * g.os[1], acc, g.os[1]);
              }
            }
            for (; c < g.C; ++c) {  // the channels left over, and half-precision images
              T acc = T(0);
              for (int k = 0; k < 8; ++k) acc += wk[k] * static_cast<T>(ik[k][c]);
              ov[c * g.os[1]] = static_cast<S>(acc);
            }
          }
          continue;
        }
        // Channel-major, voxels inner: the voxel loop vectorizes (gathers), which hides the
        // latency of the 8-term sums that a voxel-major loop serializes.
        for (int c = 0; c < g.C; ++c) {
          const S* ic = ib + c * g.is[1];
          S* oc = ob + c * g.os[1] + w0 * ow;
          const int64_t vox = g.voxels();
          T* dc = kSave ? dpos + saved_offset(g, b, 3 * c, d, h) + w0 : nullptr;
          with_guard(nonfinite_origin(ic), [&](auto guard) {
#pragma omp simd
            for (int v = 0; v < n; ++v) {
              T der[3];
              oc[v * ow] = static_cast<S>(st.template sample<kSave, guard>(ic, v, der));
              if constexpr (kSave) {
                dc[v] = der[0];
                dc[vox + v] = der[1];
                dc[2 * vox + v] = der[2];
              }
            }
          });
        }
      }
    }
  });
}

// The sampler's forward; with a non-null `dpos` it also saves the position derivative
// (forward_rows' kSave).
template <typename S, typename Src>
void forward(const S* img, S* out, const Geometry& g, const Src& src, int mode, int padding,
             acc_t<S>* dpos = nullptr) {
  with_offset_type(g, [&](auto i) {
    if (dpos)
      forward_rows<true, decltype(i)>(img, out, dpos, g, src, mode, padding);
    else
      forward_rows<false, decltype(i)>(img, out, dpos, g, src, mode, padding);
  });
}

// d loss / d position from the forward's saved derivative: gp = sum_c gout_c dpos_c, in the
// same order as backward_rows' position-only loop, then stored by the source (flow, grid).
template <typename S, typename Src>
void backward_saved(const S* gout, const acc_t<S>* dpos, const Geometry& g, const Src& src) {
  using T = acc_t<S>;
  const int64_t vox = g.voxels(), ow = g.os[4];
  at::parallel_for(0, g.rows(), 1, [&](int64_t r0, int64_t r1) {
    T gp[3][kBlock];
    for (int64_t r = r0; r < r1; ++r) {
      int b, d, h;
      g.split(r, b, d, h);
      const S* gb = gout + b * g.os[0] + d * g.os[2] + h * g.os[3];
      for (int w0 = 0; w0 < g.out_size[2]; w0 += kBlock) {
        const int n = std::min(kBlock, g.out_size[2] - w0);
        for (int v = 0; v < n; ++v) gp[0][v] = gp[1][v] = gp[2][v] = T(0);
        for (int c = 0; c < g.C; ++c) {
          const S* gc = gb + c * g.os[1] + w0 * ow;
          const T* dc = dpos + saved_offset(g, b, 3 * c, d, h) + w0;
#pragma omp simd
          for (int v = 0; v < n; ++v) {
            const T go = static_cast<T>(gc[v * ow]);
            gp[0][v] += go * dc[v];
            gp[1][v] += go * dc[vox + v];
            gp[2][v] += go * dc[2 * vox + v];
          }
        }
        for (int v = 0; v < n; ++v) {
          const T gv[3] = {gp[0][v], gp[1][v], gp[2][v]};
          src.store_grad(b, d, h, w0 + v, gv);
        }
      }
    }
  });
}

// One lane of the backward: rows [r0, r1), channels [c0, c1). `scatter` (image gradient, same
// strides as the image) may be null; with kPos the position gradient of these channels goes to
// the source (flow, grid) or, for theta, into per-row moments `moments` (rows x 12).
template <bool kPos, typename I, typename S, typename Src>
void backward_rows(const S* img, const S* gout, const Geometry& g, const Src& src, int mode,
                   int padding, int64_t r0, int64_t r1, int c0, int c1, acc_t<S>* scatter,
                   acc_t<S>* moments) {
  using T = acc_t<S>;
  RowStencils<T, I, kPos> st;
  T gp[3][kBlock];
  const std::vector<S> zeros(scatter && channel_vector(g) ? g.C : 0, S(0));  // corners outside
  const int64_t ow = g.os[4];
  for (int64_t r = r0; r < r1; ++r) {
    int b, d, h;
    g.split(r, b, d, h);
    const S* ib = img + b * g.is[0];
    const S* gb = gout + b * g.os[0] + d * g.os[2] + h * g.os[3];
    T* sb = scatter ? scatter + b * g.is[0] : nullptr;
    // The voxel-by-voxel loops below check once per row, for all channels (the guarded reads
    // give the same sums where the first voxel is finite).
    const bool guard = sb && nonfinite_origin(ib, g.C, g.is[1]);
    const S* outside = guard && !zeros.empty() ? zeros.data() : nullptr;
    T m[kMoments] = {};
    for (int w0 = 0; w0 < g.out_size[2]; w0 += kBlock) {
      const int n = std::min(kBlock, g.out_size[2] - w0);
      st.build(g, src, b, d, h, w0, n, mode, padding);
      if (sb && channel_vector(g)) {
        // Channels-last with the image gradient: voxel by voxel over vectors of channels, the
        // scatter (distinct channels never collide) and, for the position gradient, the eight
        // channel dot products s_k = <gout, corner k>, which the stencil's dw then weighs:
        // d pos = sum_k dw_k s_k (8 multiply-adds per channel instead of 24).
        for (int v = 0; v < n; ++v) {
          const S* gv = gb + (w0 + v) * ow;
          T* sk[8];
          const S* ik[8];
          T wk[8];
          st.corners(v, sb, sk, wk);
          st.corners(v, ib, ik, wk, outside);
          using V = Lanes<T>;
          V dots[8] = {};
          int c = c0;
          if constexpr (std::is_same_v<S, T>) {
            for (; c + lanes<T>() <= c1; c += lanes<T>()) {
              const V go = load_lanes(gv + c * g.os[1], g.os[1]);
              GVSL_UNROLL
              for (int k = 0; k < 8; ++k) {
                store_lanes(sk[k] + c, load_lanes(sk[k] + c) + wk[k] * go);
                if constexpr (kPos) dots[k] += go * load_lanes(ik[k] + c);
              }
            }
          }
          for (; c < c1; ++c) {  // the channels left over, and half-precision images
            const T go = static_cast<T>(gv[c * g.os[1]]);
            for (int k = 0; k < 8; ++k) {
              sk[k][c] += wk[k] * go;
              if constexpr (kPos) dots[k][0] += go * static_cast<T>(ik[k][c]);
            }
          }
          if constexpr (kPos) {
            T dot[8];
            for (int k = 0; k < 8; ++k) {
              dot[k] = T(0);
              for (int l = 0; l < lanes<T>(); ++l) dot[k] += dots[k][l];
            }
            for (int a = 0; a < 3; ++a) {
              T acc = T(0);
              for (int k = 0; k < 8; ++k) acc += st.dw[a][k][v] * dot[k];
              gp[a][v] = acc;
            }
          }
        }
      } else if (sb) {
        // With the image gradient (a scatter: scalar, as corners of neighbouring voxels collide),
        // voxel by voxel, each channel's scatter and gather in one pass over its corners: this
        // measured faster than separate passes for GVSL's 32-channel features.
        for (int v = 0; v < n; ++v) {
          const S* gv = gb + (w0 + v) * ow;
          T pd = T(0), ph = T(0), pw = T(0);
          for (int c = c0; c < c1; ++c) {
            const T go = static_cast<T>(gv[c * g.os[1]]);
            T* sc = sb + c * g.is[1];
            GVSL_UNROLL
            for (int k = 0; k < 8; ++k) sc[st.off[k][v]] += st.w[k][v] * go;
            if constexpr (kPos) {
              const S* ic = ib + c * g.is[1];
              T der[3];
              if (guard) st.template sample<true, true>(ic, v, der);
              else st.template sample<true, false>(ic, v, der);
              pd += go * der[0];
              ph += go * der[1];
              pw += go * der[2];
            }
          }
          if constexpr (kPos) {
            gp[0][v] = pd;
            gp[1][v] = ph;
            gp[2][v] = pw;
          }
        }
      } else if constexpr (kPos) {
        // Position gradient alone: channel-major, the voxel loop vectorizes (gathers), hiding
        // the latency of the 8-term sums that a voxel-major loop serializes.
        for (int v = 0; v < n; ++v) gp[0][v] = gp[1][v] = gp[2][v] = T(0);
        for (int c = c0; c < c1; ++c) {
          const S* ic = ib + c * g.is[1];
          const S* gc = gb + c * g.os[1] + w0 * ow;
          with_guard(nonfinite_origin(ic), [&](auto guard) {
#pragma omp simd
            for (int v = 0; v < n; ++v) {
              T der[3];
              st.template sample<true, guard>(ic, v, der);
              const T go = static_cast<T>(gc[v * ow]);
              gp[0][v] += go * der[0];
              gp[1][v] += go * der[1];
              gp[2][v] += go * der[2];
            }
          });
        }
      }
      if constexpr (kPos) {
        for (int v = 0; v < n; ++v) {
          const T gv[3] = {gp[0][v], gp[1][v], gp[2][v]};
          if constexpr (Src::kind == kAffine)
            theta_moments(gv, d, h, w0 + v, g.out_size, m);
          else
            src.store_grad(b, d, h, w0 + v, gv);
        }
      }
    }
    if constexpr (kPos && Src::kind == kAffine) std::copy(m, m + kMoments, moments + r * kMoments);
  }
}

template <bool kPos, typename S, typename Src>
void backward_lane(const S* img, const S* gout, const Geometry& g, const Src& src, int mode,
                   int padding, int64_t r0, int64_t r1, int c0, int c1, acc_t<S>* scatter,
                   acc_t<S>* moments) {
  with_offset_type(g, [&](auto i) {
    backward_rows<kPos, decltype(i)>(img, gout, g, src, mode, padding, r0, r1, c0, c1, scatter,
                                     moments);
  });
}

// The backward of the sampler: returns d loss / d image (or an undefined tensor), writes the
// flow / grid gradient through `src` and, for theta, returns per-row moments (groups x rows x 12,
// rows in (b, d, h) order) in `moments`. The image gradient runs by lanes; the position gradient
// fuses into them for theta (per-group moments) and with one channel group, else runs apart.
template <typename S, typename Src>
at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& image, const Src& src, int mode,
                    int padding, bool image_grad, bool pos_grad, at::Tensor& moments) {
  using T = acc_t<S>;
  const auto acc_type = c10::CppTypeToScalarType<T>::value;
  const Geometry g = geometry(image, grad_out);
  const int64_t rows = g.rows();
  const int threads = std::max(1, at::get_num_threads());
  const int groups = image_grad ? std::min(g.C, threads) : 1;
  const int ranges = std::max(1, threads / groups);
  const S* img = image.const_data_ptr<S>();
  const S* gout = grad_out.const_data_ptr<S>();
  if (pos_grad && Src::kind == kAffine)
    moments = at::zeros({groups, rows, kMoments}, image.options().dtype(acc_type));
  T* mom = moments.defined() ? moments.data_ptr<T>() : nullptr;
  if (!image_grad) {
    if (pos_grad) {
      at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
        backward_lane<true>(img, gout, g, src, mode, padding, r0, r1, 0, g.C, nullptr, mom);
      });
    }
    return at::Tensor();
  }
  std::vector<at::Tensor> bufs;
  for (int v = 0; v < ranges; ++v) {
    bufs.push_back(huge_zeros_like(image, acc_type));
    TORCH_CHECK(bufs.back().strides() == image.strides(), "gvsl_fast: gradient buffer layout");
  }
  const bool fused = pos_grad && (groups == 1 || Src::kind == kAffine);
  at::parallel_for(0, int64_t(groups) * ranges, 1, [&](int64_t l0, int64_t l1) {
    for (int64_t lane = l0; lane < l1; ++lane) {
      const int grp = int(lane / ranges), v = int(lane % ranges);
      const int c0 = int(int64_t(g.C) * grp / groups);
      const int c1 = int(int64_t(g.C) * (grp + 1) / groups);
      const int64_t r0 = rows * v / ranges, r1 = rows * (v + 1) / ranges;
      T* sc = bufs[v].data_ptr<T>();
      T* mo = mom ? mom + grp * rows * kMoments : nullptr;
      if (fused)
        backward_lane<true>(img, gout, g, src, mode, padding, r0, r1, c0, c1, sc, mo);
      else
        backward_lane<false>(img, gout, g, src, mode, padding, r0, r1, c0, c1, sc, mo);
    }
  });
  if (pos_grad && !fused) {
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      backward_lane<true>(img, gout, g, src, mode, padding, r0, r1, 0, g.C, nullptr, mom);
    });
  }
  for (int v = 1; v < ranges; ++v) bufs[0].add_(bufs[v]);
  return bufs[0].to(image.scalar_type());
}

// Sums per-row moments (groups x rows x 12, rows in (b, d, h) order) per batch element in a fixed
// order, in double, and turns them into d loss / d theta (B, 3, 4).
inline at::Tensor theta_grad_cpu(const at::Tensor& moments, const Geometry& g, bool align_corners,
                             const at::Tensor& theta) {
  const auto m = moments.to(at::kDouble).view({moments.size(0), g.B, -1, kMoments}).sum(2).sum(0);
  auto out = at::empty({g.B, 3, 4}, theta.options().dtype(at::kDouble));
  const double* mp = m.const_data_ptr<double>();
  double* op = out.data_ptr<double>();
  for (int b = 0; b < g.B; ++b)
    theta_grad_from_moments(mp + b * kMoments, g.out_size, g.in_size, align_corners,
                            op + b * kMoments);
  return out.to(theta.scalar_type());
}

}  // namespace gvsl::cpu
