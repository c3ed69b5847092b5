// CPU kernels of the fused local NCC (DESIGN §3) and the schemas of its two ops.
//
// Every box sum is a streaming, separable sum over one (D, H, W) volume (BoxStream): a running
// sum over the last k slices, then over k rows of that plane, then along W. Work per voxel does
// not depend on the window, and a thread holds one plane of M quantities (in L2 for 128^2 and
// 160^2 planes). Every sum is in double, so running sums do not drift along long lines. Threads
// split the volumes and the depth into chunks; reductions sum per-chunk partials in a fixed
// order (reproducible).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "lncc.h"
#include "memory.h"

namespace {

using gvsl::LnccParams;

struct Strides {
  int64_t b, c, d, h, w;
};

Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// Zero-padded window sums of M quantities over the slices [d0, d1) of one (D, H, W) volume.
// load(z, h, buf, rows) points rows[m] at the W values of quantity m in row h of slice z: into
// memory, or into buf[m] where it computes them;
// consume(d, h, sums) receives the window sums of row h of slice d as M rows of W doubles.
//
// Depth first: a plane of running sums over the last k slices, plane += slice z - slice z - k,
// with slice z - k loaded again (two input reads per voxel rather than k planes of M sums to
// keep); then, per emitted slice, a running sum over k rows of the plane, and last the sums
// along W of that row as differences of a prefix sum (which vectorizes, where a running sum
// along W is one long chain). Every sum is in double.
template <int M, typename S>
class BoxStream {
 public:
  BoxStream(int64_t H, int64_t W, int k)
      : H_(H), W_(W), r_(k / 2), new_(M * W), old_(M * W), plane_(M * H * W), hacc_(M * W),
        zeros_(W, 0.0), prefix_(M * (W + k)), out_(M * W) {}

  template <class Load, class Consume>
  void run(int64_t D, int64_t d0, int64_t d1, Load& load, Consume& consume) {
    std::fill(plane_.begin(), plane_.end(), 0.0);
    const int64_t zlo = std::max<int64_t>(0, d0 - r_), k = 2 * r_ + 1;
    for (int64_t z = zlo; z < d1 + r_; ++z) {
      const bool add = z < D, sub = z - k >= zlo;
      if (add || sub) {
        for (int64_t h = 0; h < H_; ++h) update(z, h, add, sub, load);
      }
      if (z - r_ >= d0) emit(z - r_, consume);
    }
  }

 private:
  // plane row h += row h of slice z (zeros unless `add`) - row h of slice z - k (unless `sub`)
  template <class Load> void update(int64_t z, int64_t h, bool add, bool sub, Load& load) {
    S* bn[M];
    S* bo[M];
    const S* rn[M];
    const S* ro[M];
    for (int m = 0; m < M; ++m) {
      rn[m] = bn[m] = new_.data() + m * W_;
      ro[m] = bo[m] = old_.data() + m * W_;
    }
    if (add) {
      load(z, h, bn, rn);
    } else {
      std::fill(new_.begin(), new_.end(), S(0));
    }
    if (sub) {
      load(z - 2 * r_ - 1, h, bo, ro);
    } else {
      std::fill(old_.begin(), old_.end(), S(0));
    }
    const int64_t HW = H_ * W_;
    for (int m = 0; m < M; ++m) {
      double* __restrict__ acc = plane_.data() + m * HW + h * W_;
      const S* __restrict__ xn = rn[m];
      const S* __restrict__ xo = ro[m];
      for (int64_t w = 0; w < W_; ++w) acc[w] += double(xn[w]) - double(xo[w]);
    }
  }

  // The window sums of slice d, row by row: rows h - r .. h + r of the plane, then along W.
  template <class Consume> void emit(int64_t d, Consume& consume) {
    std::fill(hacc_.begin(), hacc_.end(), 0.0);
    for (int64_t y = 0; y < std::min<int64_t>(r_, H_); ++y) hrow(y, -1);
    for (int64_t h = 0; h < H_; ++h) {
      hrow(h + r_ < H_ ? h + r_ : -1, h - r_ - 1);
      wsum();
      consume(d, h, static_cast<const double*>(out_.data()));
    }
  }

  // hacc_ += plane row `in` - plane row `out`, where a row of -1 is zeros
  void hrow(int64_t in, int64_t out) {
    const int64_t HW = H_ * W_;
    for (int m = 0; m < M; ++m) {
      double* __restrict__ acc = hacc_.data() + m * W_;
      const double* xi = in >= 0 ? plane_.data() + m * HW + in * W_ : zeros_.data();
      const double* xo = out >= 0 ? plane_.data() + m * HW + out * W_ : zeros_.data();
      for (int64_t w = 0; w < W_; ++w) acc[w] += xi[w] - xo[w];
    }
  }

  // Zero-padded window sums along W of the M rows of hacc_, into out_: P[i] holds the sum of
  // x[0 .. i - r - 1] (zero for i <= r, the row total past its end), so the window of w is
  // P[w + k] - P[w]. The M running sums advance together: M independent chains in flight
  // rather than one chain of adds at a time.
  void wsum() {
    const int64_t k = 2 * r_ + 1, L = W_ + k;
    double* __restrict__ P = prefix_.data();
    const double* __restrict__ x = hacc_.data();
    double run[M];
    for (int m = 0; m < M; ++m) {
      run[m] = 0.0;
      for (int64_t i = 0; i <= r_; ++i) P[m * L + i] = 0.0;
    }
    for (int64_t w = 0; w < W_; ++w) {
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        run[m] += x[m * W_ + w];
        P[m * L + r_ + 1 + w] = run[m];
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int64_t i = W_ + r_ + 1; i < L; ++i) P[m * L + i] = run[m];
      double* __restrict__ out = out_.data() + m * W_;
      const double* __restrict__ Pm = P + m * L;
      for (int64_t w = 0; w < W_; ++w) out[w] = Pm[w + k] - Pm[w];
    }
  }

  const int64_t H_, W_;
  const int r_;
  std::vector<S> new_, old_;
  std::vector<double> plane_, hacc_, zeros_, prefix_, out_;
};

// Runs body(stream, bc, d0, d1, task) over all volumes and depth chunks, one BoxStream per thread.
// Returns the number of tasks; task indices are stable, so per-task partials sum reproducibly.
template <int M, typename S, class Body>
int64_t for_chunks(int64_t BC, int64_t D, int64_t H, int64_t W, int k, Body&& body) {
  const int64_t threads = omp_get_max_threads();
  const int64_t by_threads = (threads + BC - 1) / BC;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(by_threads, D / (2 * k)));
  const int64_t tasks = BC * chunks;
#pragma omp parallel num_threads(std::min<int64_t>(threads, tasks))
  {
    BoxStream<M, S> stream(H, W, k);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t c = t % chunks;
      body(stream, t / chunks, D * c / chunks, D * (c + 1) / chunks, t);
    }
  }
  return tasks;
}

LnccParams<double> params_of(int64_t window, double eps, int64_t preset, double smooth_nr) {
  return {double(window * window * window), eps, smooth_nr, int(preset)};
}

struct Geometry {
  int64_t B, C, D, H, W;
  int k;
};

Geometry check_inputs(const at::Tensor& a, const at::Tensor& b, int64_t window) {
  TORCH_CHECK(a.dim() == 5 && a.sizes() == b.sizes(), "lncc: a and b must be 5-D with one shape");
  TORCH_CHECK(a.numel() > 0, "lncc: a and b are empty");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "lncc: a and b must have one dtype");
  TORCH_CHECK(window >= 1 && window % 2 == 1, "lncc: window must be odd, got ", window);
  return {a.size(0), a.size(1), a.size(2), a.size(3), a.size(4), int(window)};
}

// Computes the five forward quantities I, J, I^2, J^2, IJ of one row of volume (bi, ci) into
// `rows`, the BoxStream's buffers (where its row pointers already point).
template <typename T, typename S> struct LoadInputs {
  const T *a, *b;
  Strides sa, sb;
  int64_t W;
  void operator()(int64_t z, int64_t h, S* const* rows, const S**) const {
    const T* pa = a + z * sa.d + h * sa.h;
    const T* pb = b + z * sb.d + h * sb.h;
    S* __restrict__ ri = rows[gvsl::kSI];
    S* __restrict__ rj = rows[gvsl::kSJ];
    S* __restrict__ rii = rows[gvsl::kSII];
    S* __restrict__ rjj = rows[gvsl::kSJJ];
    S* __restrict__ rij = rows[gvsl::kSIJ];
    if (sa.w == 1 && sb.w == 1) {
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) {
        ri[w] = S(pa[w]);
        rj[w] = S(pb[w]);
      }
    } else {
      for (int64_t w = 0; w < W; ++w) {
        ri[w] = S(pa[w * sa.w]);
        rj[w] = S(pb[w * sb.w]);
      }
    }
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) {
      rii[w] = ri[w] * ri[w];
      rjj[w] = rj[w] * rj[w];
      rij[w] = ri[w] * rj[w];
    }
  }
};

template <typename T, typename S>
LoadInputs<T, S> load_inputs(const at::Tensor& a, const at::Tensor& b, int64_t bi, int64_t ci) {
  const Strides sa = strides_of(a), sb = strides_of(b);
  return {a.data_ptr<T>() + bi * sa.b + ci * sa.c, b.data_ptr<T>() + bi * sb.b + ci * sb.c, sa,
          sb, a.size(4)};
}

// The statistics of voxel i of M rows of window sums (`stride` apart): computed in double
// (where SII - SI^2/n and the like cancel), returned in F for the formulas, as on CUDA.
template <typename F>
GVSL_HD gvsl::LnccStats<F> stats_at(const double* P, int64_t stride, int64_t i, double n) {
  return gvsl::lncc_stats_cast<F>(gvsl::lncc_stats<double>(
      P[i], P[stride + i], P[2 * stride + i], P[3 * stride + i], P[4 * stride + i], n));
}

// One pass over the forward window sums. Per voxel, as asked: the cc map (`cc`), the loss terms
// (kLoss: their sum is returned), and the coefficient maps (`coef`) of the inputs that need a
// gradient (kA, kB) for dL/dcc = `grad` (a map in the accumulation dtype), or 1 where `grad` is
// undefined: the maps are linear in dL/dcc, which mean and sum make one scalar, so the forward
// can leave them for the backward to scale. Compile-time flags keep the row loops branch-free,
// so that they vectorize.
template <bool kA, bool kB, bool kLoss, int kPreset, typename T, typename S>
double stats_pass(const Geometry& g, const LnccParams<double>& params, const at::Tensor& a,
                  const at::Tensor& b, const at::Tensor& cc, const at::Tensor& grad,
                  const at::Tensor& coef) {
  constexpr int Q = gvsl::lncc_map_count(kA, kB);
  const int64_t HW = g.H * g.W, DHW = g.D * HW, qstride = g.B * g.C * DHW;
  T* po = cc.defined() ? cc.data_ptr<T>() : nullptr;
  const Strides so = strides_of(cc.defined() ? cc : a);
  const S* pg = grad.defined() ? grad.data_ptr<S>() : nullptr;
  const Strides sg = strides_of(grad.defined() ? grad : a);
  S* pc = kA || kB ? coef.data_ptr<S>() : nullptr;
  std::vector<double> partial(g.B * g.C * g.D, 0.0);
  const int64_t tasks = for_chunks<gvsl::kLnccSums, S>(
      g.B * g.C, g.D, g.H, g.W, g.k,
      [&](auto& stream, int64_t bc, int64_t d0, int64_t d1, int64_t t) {
        const int64_t bi = bc / g.C, ci = bc % g.C;
        auto load = load_inputs<T, S>(a, b, bi, ci);
        double sum = 0.0;
        std::vector<S> terms(g.W);
        // The row loops carry no `omp simd`: GCC's simd lowering gives the per-voxel structs
        // per-lane stack arrays, and the loops then stay scalar; plain loops vectorize. The loss
        // terms of a row go through `terms` to a double sum of their own.
        auto consume = [&](int64_t d, int64_t h, const double* R) {
          // the formulas in the accumulation dtype (as CUDA), with the preset a constant: the
          // loops below compile one formula
          const LnccParams<S> p{S(params.n), S(params.eps), S(params.smooth_nr), kPreset};
          const double n = params.n;
          S* __restrict__ tr = terms.data();
          if (po) {
            T* o = po + bi * so.b + ci * so.c + d * so.d + h * so.h;
#pragma GCC ivdep
            for (int64_t w = 0; w < g.W; ++w) {
              o[w * so.w] = T(gvsl::lncc_cc(stats_at<S>(R, g.W, w, n), p));
            }
          }
          if constexpr (kA || kB) {
            S* cp = pc + bc * DHW + d * HW + h * g.W;
            auto maps = [&](auto grad_at) {
#pragma GCC ivdep
              for (int64_t w = 0; w < g.W; ++w) {
                const auto st = stats_at<S>(R, g.W, w, n);
                if constexpr (kLoss) tr[w] = gvsl::lncc_term(gvsl::lncc_cc(st, p), p.preset);
                S m[Q];
                gvsl::lncc_coef_maps(st, gvsl::lncc_coefs(st, grad_at(w), p), kA, kB, m);
                for (int q = 0; q < Q; ++q) cp[q * qstride + w] = m[q];
              }
            };
            if (pg) {
              const S* gh = pg + bi * sg.b + ci * sg.c + d * sg.d + h * sg.h;
              maps([&](int64_t w) { return gh[w * sg.w]; });
            } else {
              maps([](int64_t) { return S(1); });
            }
          } else if constexpr (kLoss) {
#pragma GCC ivdep
            for (int64_t w = 0; w < g.W; ++w) {
              tr[w] = gvsl::lncc_term(gvsl::lncc_cc(stats_at<S>(R, g.W, w, n), p), p.preset);
            }
          }
          if constexpr (kLoss) {
            double row = 0.0;
#pragma omp simd reduction(+ : row)
            for (int64_t w = 0; w < g.W; ++w) row += double(tr[w]);
            sum += row;
          }
        };
        stream.run(g.D, d0, d1, load, consume);
        partial[t] = sum;
      });
  double total = 0.0;
  for (int64_t t = 0; t < tasks; ++t) total += partial[t];  // a fixed order
  return total;
}

// Calls f(std::bool_constant<need_a>(), std::bool_constant<need_b>()).
template <class F> void with_needs(bool need_a, bool need_b, F&& f) {
  if (need_a && need_b) return f(std::true_type(), std::true_type());
  if (need_a) return f(std::true_type(), std::false_type());
  if (need_b) return f(std::false_type(), std::true_type());
  f(std::false_type(), std::false_type());
}

// The gradients from the Q coefficient maps: box-sum them (the box is its own adjoint) and
// combine, times `scale`, into dL/da and dL/db where their tensors are non-empty.
template <int Q, typename T, typename S>
void grad_pass(const Geometry& g, const at::Tensor& coef, double scale, const at::Tensor& a,
               const at::Tensor& b, at::Tensor& ga, at::Tensor& gb) {
  const bool need_a = ga.numel() > 0, need_b = gb.numel() > 0;
  const int64_t HW = g.H * g.W, DHW = g.D * HW, qstride = g.B * g.C * DHW;
  const S* pc = coef.data_ptr<S>();
  const Strides sa = strides_of(a), sb = strides_of(b);
  const Strides sga = strides_of(need_a ? ga : a), sgb = strides_of(need_b ? gb : b);
  const T *pa = a.data_ptr<T>(), *pb = b.data_ptr<T>();
  T* pga = need_a ? ga.data_ptr<T>() : nullptr;
  T* pgb = need_b ? gb.data_ptr<T>() : nullptr;
  const int64_t W = g.W, jo = (need_a ? 4 : 1) * W;  // first of dL/dJ's three maps
  for_chunks<Q, S>(g.B * g.C, g.D, g.H, g.W, g.k,
                   [&](auto& stream, int64_t bc, int64_t d0, int64_t d1, int64_t) {
    const int64_t bi = bc / g.C, ci = bc % g.C;
    const S* cb = pc + bc * DHW;
    auto load = [&](int64_t z, int64_t h, S* const*, const S** rows) {
      for (int q = 0; q < Q; ++q) rows[q] = cb + q * qstride + z * HW + h * g.W;
    };
    auto consume = [&](int64_t d, int64_t h, const double* R) {
      const T* ah = pa + bi * sa.b + ci * sa.c + d * sa.d + h * sa.h;
      const T* bh = pb + bi * sb.b + ci * sb.c + d * sb.d + h * sb.h;
      if (pga) {
        T* o = pga + bi * sga.b + ci * sga.c + d * sga.d + h * sga.h;
#pragma omp simd
        for (int64_t w = 0; w < g.W; ++w) {
          o[w * sga.w] = T(scale * gvsl::lncc_grad(double(ah[w * sa.w]), double(bh[w * sb.w]),
                                                   R[w], R[W + w], R[2 * W + w],
                                                   R[3 * W + w]));
        }
      }
      if (pgb) {
        T* o = pgb + bi * sgb.b + ci * sgb.c + d * sgb.d + h * sgb.h;
#pragma omp simd
        for (int64_t w = 0; w < g.W; ++w) {
          o[w * sgb.w] = T(scale * gvsl::lncc_grad(double(bh[w * sb.w]), double(ah[w * sa.w]),
                                                   R[w], R[jo + w], R[jo + W + w],
                                                   R[jo + 2 * W + w]));
        }
      }
    };
    stream.run(g.D, d0, d1, load, consume);
  });
}

// Q coefficient maps of one (B*C, D, H, W) volume each, in the accumulation dtype.
at::Tensor coef_buffer(const Geometry& g, int Q, const at::Tensor& a) {
  const auto opts = a.options().dtype(gvsl::acc_dtype(a));
  return gvsl::huge_pages(at::empty({Q, g.B * g.C, g.D, g.H, g.W}, opts));
}

// Calls f(std::integral_constant<int, preset>).
template <class F> void with_preset(int64_t preset, F&& f) {
  switch (preset) {
    case gvsl::kLnccGvsl: return f(std::integral_constant<int, gvsl::kLnccGvsl>());
    case gvsl::kLnccVoxelmorph: return f(std::integral_constant<int, gvsl::kLnccVoxelmorph>());
    case gvsl::kLnccMonai: return f(std::integral_constant<int, gvsl::kLnccMonai>());
  }
  TORCH_CHECK(false, "lncc: unknown preset ", preset);
}

// Returns (the cc map or the loss, the coefficient maps for a unit dL/dcc): the maps only for a
// reduced loss with an input that needs a gradient, else empty.
std::tuple<at::Tensor, at::Tensor> lncc_forward_cpu(const at::Tensor& a, const at::Tensor& b,
                                                    int64_t window, double eps, int64_t preset,
                                                    double smooth_nr, int64_t reduction,
                                                    bool need_a, bool need_b) {
  const Geometry g = check_inputs(a, b, window);
  const auto p = params_of(window, eps, preset, smooth_nr);
  const bool map = reduction == gvsl::kLnccNone, maps = !map && (need_a || need_b);
  const auto acc = a.options().dtype(gvsl::acc_dtype(a));
  at::Tensor out = map ? at::empty_like(a) : at::empty({}, acc);
  at::Tensor coef = maps ? coef_buffer(g, gvsl::lncc_map_count(need_a, need_b), a)
                         : at::empty({0}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lncc_forward", [&] {
    using S = gvsl::acc_t<scalar_t>;
    double total = 0.0;
    with_preset(preset, [&](auto k) {
      constexpr int kP = decltype(k)::value;
      if (map) {
        stats_pass<false, false, false, kP, scalar_t, S>(g, p, a, b, out, {}, {});
        return;
      }
      with_needs(need_a, need_b, [&](auto na, auto nb) {
        total = stats_pass<decltype(na)::value, decltype(nb)::value, true, kP, scalar_t, S>(
            g, p, a, b, {}, {}, coef);
      });
    });
    if (!map) out.fill_(reduction == gvsl::kLnccMean ? total / double(a.numel()) : total);
  });
  return {out, coef};
}

// dL/da and dL/db for the inputs that need them. With the forward's coefficient maps `coef`,
// `grad` is the scalar dL/dcc that scales them; without (reduction none), `grad` is the dL/dcc
// map and the maps are recomputed from the inputs first.
std::tuple<at::Tensor, at::Tensor> lncc_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                     const at::Tensor& b, const at::Tensor& coef,
                                                     int64_t window, double eps, int64_t preset,
                                                     double smooth_nr, bool need_a, bool need_b) {
  const Geometry g = check_inputs(a, b, window);
  const auto p = params_of(window, eps, preset, smooth_nr);
  at::Tensor ga = need_a ? gvsl::huge_pages(at::empty_like(a)) : at::empty({0}, a.options());
  at::Tensor gb = need_b ? gvsl::huge_pages(at::empty_like(b)) : at::empty({0}, b.options());
  if (!need_a && !need_b) return {ga, gb};
  const int Q = gvsl::lncc_map_count(need_a, need_b);
  const bool saved = coef.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lncc_backward", [&] {
    using S = gvsl::acc_t<scalar_t>;
    TORCH_CHECK(grad.scalar_type() == c10::CppTypeToScalarType<S>::value,
                "lncc_backward: grad must be in the accumulation dtype");
    TORCH_CHECK(saved ? grad.numel() == 1 : grad.sizes() == a.sizes(),
                "lncc_backward: grad must be a scalar with coef, else a map of a's shape");
    TORCH_CHECK(!saved || (coef.size(0) == Q && coef.scalar_type() == grad.scalar_type()),
                "lncc_backward: coef must hold the maps of the inputs that need gradients");
    with_needs(need_a, need_b, [&](auto na, auto nb) {
      constexpr bool kA = decltype(na)::value, kB = decltype(nb)::value;
      constexpr int kQ = gvsl::lncc_map_count(kA, kB);
      if constexpr (kA || kB) {
        if (saved) {
          grad_pass<kQ, scalar_t, S>(g, coef, grad.item<double>(), a, b, ga, gb);
          return;
        }
        const at::Tensor maps = coef_buffer(g, kQ, a);
        with_preset(preset, [&](auto k) {
          stats_pass<kA, kB, false, decltype(k)::value, scalar_t, S>(g, p, a, b, {}, grad, maps);
        });
        grad_pass<kQ, scalar_t, S>(g, maps, 1.0, a, b, ga, gb);
      }
    });
  });
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gvsl_fast, m) {
  m.def(
      "lncc_forward(Tensor a, Tensor b, int window, float eps, int preset, float smooth_nr, "
      "int reduction, bool need_a, bool need_b) -> (Tensor, Tensor)");
  m.def(
      "lncc_backward(Tensor grad, Tensor a, Tensor b, Tensor coef, int window, float eps, "
      "int preset, float smooth_nr, bool need_a, bool need_b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gvsl_fast, CPU, m) {
  m.impl("lncc_forward", &lncc_forward_cpu);
  m.impl("lncc_backward", &lncc_backward_cpu);
}
