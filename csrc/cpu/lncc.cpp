// CPU kernels of the fused local NCC (DESIGN §3) and the schemas of its two ops.
//
// Every box sum is a streaming, separable running sum over one (D, H, W) volume: running sums
// along each row (W), then over a ring of the last k rows (H), then over a ring of the last k
// planes (D). Work per voxel does not depend on the window, and a thread touches only
// (k + 2) planes of M quantities at a time (cache-sized for 128^2 planes). Running sums
// accumulate in double, so they do not drift along long lines. Threads split the volumes and
// the depth into chunks; reductions sum per-chunk partials in a fixed order (reproducible).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "lncc.h"

namespace {

using gvsl::LnccParams;

struct Strides {
  int64_t b, c, d, h, w;
};

Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// Zero-padded window sums of M quantities over the slices [d0, d1) of one (D, H, W) volume.
// load(z, h, rows) writes the W values of each quantity in row h of slice z into rows[m][0..W);
// consume(d, sums) receives the window sums of slice d as M planes of H*W doubles.
template <int M, typename S>
class BoxStream {
 public:
  BoxStream(int64_t H, int64_t W, int k)
      : H_(H), W_(W), k_(k), r_(k / 2), pad_(k / 2 + 1), len_(W + 2 * pad_),
        row_(M * len_, S(0)), rowsum_(M * W), hring_(k * M * W), hacc_(M * W),
        pring_(k * M * H * W), pacc_(M * H * W) {}

  template <class Load, class Consume>
  void run(int64_t D, int64_t d0, int64_t d1, Load& load, Consume& consume) {
    std::fill(pring_.begin(), pring_.end(), S(0));
    std::fill(pacc_.begin(), pacc_.end(), 0.0);
    const int64_t zlo = std::max<int64_t>(0, d0 - r_);
    const int64_t plane = M * H_ * W_;
    for (int64_t z = zlo; z < d1 + r_; ++z) {
      S* slot = pring_.data() + ((z - zlo) % k_) * plane;  // holds slice z - k (or zeros)
      if (z < D) {
        slice(z, load, slot);
      } else {
        for (int64_t i = 0; i < plane; ++i) pacc_[i] -= slot[i];
      }
      if (z - r_ >= d0) consume(z - r_, pacc_.data());
    }
  }

 private:
  // Window sums along W of the loaded row, into rowsum_ (rows carry pad_ zeros on both sides).
  void wpass(S* const* rows) {
    double acc[M];
    for (int m = 0; m < M; ++m) {
      acc[m] = 0.0;
      for (int j = -r_; j <= r_; ++j) acc[m] += rows[m][j];
    }
    for (int64_t w = 0; w < W_; ++w) {
      for (int m = 0; m < M; ++m) {
        rowsum_[m * W_ + w] = S(acc[m]);
        acc[m] += double(rows[m][w + r_ + 1]) - double(rows[m][w - r_]);
      }
    }
  }

  // 2-D window sums of slice z into `slot`, with pacc_ += new - old (old: slice z - k).
  template <class Load> void slice(int64_t z, Load& load, S* slot) {
    std::fill(hring_.begin(), hring_.end(), S(0));
    std::fill(hacc_.begin(), hacc_.end(), 0.0);
    S* rows[M];
    for (int m = 0; m < M; ++m) rows[m] = row_.data() + m * len_ + pad_;
    const int64_t MW = M * W_, HW = H_ * W_;
    for (int64_t y = 0; y < H_ + r_; ++y) {
      S* hslot = hring_.data() + (y % k_) * MW;  // W-sums of row y - k (or zeros)
      if (y < H_) {
        load(z, y, rows);
        wpass(rows);
        for (int64_t i = 0; i < MW; ++i) {
          hacc_[i] += double(rowsum_[i]) - double(hslot[i]);
          hslot[i] = rowsum_[i];
        }
      } else {
        for (int64_t i = 0; i < MW; ++i) hacc_[i] -= hslot[i];
      }
      const int64_t h = y - r_;
      if (h < 0) continue;
      for (int m = 0; m < M; ++m) {
        const double* src = hacc_.data() + m * W_;
        S* dst = slot + m * HW + h * W_;
        double* acc = pacc_.data() + m * HW + h * W_;
        for (int64_t w = 0; w < W_; ++w) {
          const S v = S(src[w]);
          acc[w] += double(v) - double(dst[w]);
          dst[w] = v;
        }
      }
    }
  }

  const int64_t H_, W_;
  const int k_, r_, pad_;
  const int64_t len_;
  std::vector<S> row_, rowsum_, hring_;
  std::vector<double> hacc_;
  std::vector<S> pring_;
  std::vector<double> pacc_;
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
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "lncc: a and b must have one dtype");
  TORCH_CHECK(window >= 1 && window % 2 == 1, "lncc: window must be odd, got ", window);
  return {a.size(0), a.size(1), a.size(2), a.size(3), a.size(4), int(window)};
}

// Loads the five forward quantities I, J, I^2, J^2, IJ of one row of volume (bi, ci).
template <typename T, typename S> struct LoadInputs {
  const T *a, *b;
  Strides sa, sb;
  int64_t W;
  void operator()(int64_t z, int64_t h, S* const* rows) const {
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

gvsl::LnccStats<double> stats_at(const double* P, int64_t HW, int64_t i, double n) {
  return gvsl::lncc_stats<double>(P[i], P[HW + i], P[2 * HW + i], P[3 * HW + i], P[4 * HW + i],
                                  n);
}

// One pass over the forward window sums. Per voxel, as asked: the cc map (`cc`), the loss terms
// (kLoss: their sum is returned), and the Q coefficient maps (`coef`) for dL/dcc = `grad` (a map
// in the accumulation dtype), or 1 where `grad` is null: the maps are linear in dL/dcc, which mean
// and sum make one scalar, so the forward can leave them for the backward to scale.
template <int Q, bool kLoss, int kPreset, typename T, typename S>
double stats_pass(const Geometry& g, const LnccParams<double>& params, const at::Tensor& a,
                  const at::Tensor& b, const at::Tensor& cc, const at::Tensor& grad,
                  const at::Tensor& coef, bool need_a, bool need_b) {
  const int64_t HW = g.H * g.W, DHW = g.D * HW, qstride = g.B * g.C * DHW;
  T* po = cc.defined() ? cc.data_ptr<T>() : nullptr;
  const Strides so = strides_of(cc.defined() ? cc : a);
  const S* pg = grad.defined() ? grad.data_ptr<S>() : nullptr;
  const Strides sg = strides_of(grad.defined() ? grad : a);
  S* pc = coef.defined() ? coef.data_ptr<S>() : nullptr;
  std::vector<double> partial(g.B * g.C * g.D, 0.0);
  const int64_t tasks = for_chunks<gvsl::kLnccSums, S>(
      g.B * g.C, g.D, g.H, g.W, g.k,
      [&](auto& stream, int64_t bc, int64_t d0, int64_t d1, int64_t t) {
        const int64_t bi = bc / g.C, ci = bc % g.C;
        auto load = load_inputs<T, S>(a, b, bi, ci);
        double sum = 0.0;
        auto consume = [&](int64_t d, const double* P) {
          // a local copy with the preset a constant: the loops below compile one formula
          const LnccParams<double> p{params.n, params.eps, params.smooth_nr, kPreset};
          for (int64_t h = 0; h < g.H; ++h) {
            const double* Ph = P + h * g.W;
            if (po) {
              T* o = po + bi * so.b + ci * so.c + d * so.d + h * so.h;
#pragma omp simd
              for (int64_t w = 0; w < g.W; ++w) {
                o[w * so.w] = T(gvsl::lncc_cc(stats_at(Ph, HW, w, p.n), p));
              }
            }
            double row = 0.0;
            if (pc) {
              const S* gh = pg ? pg + bi * sg.b + ci * sg.c + d * sg.d + h * sg.h : nullptr;
              S* cp = pc + bc * DHW + d * HW + h * g.W;
#pragma omp simd reduction(+ : row)
              for (int64_t w = 0; w < g.W; ++w) {
                const auto st = stats_at(Ph, HW, w, p.n);
                if constexpr (kLoss) row += gvsl::lncc_term(gvsl::lncc_cc(st, p), p.preset);
                const auto k = gvsl::lncc_coefs(st, gh ? double(gh[w * sg.w]) : 1.0, p);
                double maps[7];
                gvsl::lncc_coef_maps(st, k, need_a, need_b, maps);
                for (int q = 0; q < Q; ++q) cp[q * qstride + w] = S(maps[q]);
              }
            } else if (kLoss) {
#pragma omp simd reduction(+ : row)
              for (int64_t w = 0; w < g.W; ++w) {
                row += gvsl::lncc_term(gvsl::lncc_cc(stats_at(Ph, HW, w, p.n), p), p.preset);
              }
            }
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
  const int64_t jo = (need_a ? 4 : 1) * HW;  // first of dL/dJ's three maps
  for_chunks<Q, S>(g.B * g.C, g.D, g.H, g.W, g.k,
                   [&](auto& stream, int64_t bc, int64_t d0, int64_t d1, int64_t) {
    const int64_t bi = bc / g.C, ci = bc % g.C;
    const S* cb = pc + bc * DHW;
    auto load = [&](int64_t z, int64_t h, S* const* rows) {
      for (int q = 0; q < Q; ++q) {
        const S* src = cb + q * qstride + z * HW + h * g.W;
        std::copy(src, src + g.W, rows[q]);
      }
    };
    auto consume = [&](int64_t d, const double* P) {
      for (int64_t h = 0; h < g.H; ++h) {
        const double* Ph = P + h * g.W;
        const T* ah = pa + bi * sa.b + ci * sa.c + d * sa.d + h * sa.h;
        const T* bh = pb + bi * sb.b + ci * sb.c + d * sb.d + h * sb.h;
        if (pga) {
          T* o = pga + bi * sga.b + ci * sga.c + d * sga.d + h * sga.h;
#pragma omp simd
          for (int64_t w = 0; w < g.W; ++w) {
            o[w * sga.w] = T(scale * gvsl::lncc_grad(double(ah[w * sa.w]), double(bh[w * sb.w]),
                                                     Ph[w], Ph[HW + w], Ph[2 * HW + w],
                                                     Ph[3 * HW + w]));
          }
        }
        if (pgb) {
          T* o = pgb + bi * sgb.b + ci * sgb.c + d * sgb.d + h * sgb.h;
#pragma omp simd
          for (int64_t w = 0; w < g.W; ++w) {
            o[w * sgb.w] = T(scale * gvsl::lncc_grad(double(bh[w * sb.w]), double(ah[w * sa.w]),
                                                     Ph[w], Ph[jo + w], Ph[jo + HW + w],
                                                     Ph[jo + 2 * HW + w]));
          }
        }
      }
    };
    stream.run(g.D, d0, d1, load, consume);
  });
}

// Q coefficient maps of one (B*C, D, H, W) volume each, in the accumulation dtype.
at::Tensor coef_buffer(const Geometry& g, int Q, const at::Tensor& a) {
  const auto acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({Q, g.B * g.C, g.D, g.H, g.W}, a.options().dtype(acc));
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
  const auto acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = map ? at::empty_like(a) : at::empty({}, a.options().dtype(acc));
  at::Tensor coef =
      maps ? coef_buffer(g, 1 + 3 * need_a + 3 * need_b, a) : at::empty({0}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lncc_forward", [&] {
    using S = gvsl::acc_t<scalar_t>;
    double total = 0.0;
    with_preset(preset, [&](auto k) {
      constexpr int kP = decltype(k)::value;
      if (map) {
        stats_pass<1, false, kP, scalar_t, S>(g, p, a, b, out, {}, {}, false, false);
      } else if (maps) {
        gvsl::with_maps(need_a, need_b, [&](auto q) {
          total = stats_pass<decltype(q)::value, true, kP, scalar_t, S>(g, p, a, b, {}, {}, coef,
                                                                        need_a, need_b);
        });
      } else {
        total = stats_pass<1, true, kP, scalar_t, S>(g, p, a, b, {}, {}, {}, false, false);
      }
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
  at::Tensor ga = need_a ? at::empty_like(a) : at::empty({0}, a.options());
  at::Tensor gb = need_b ? at::empty_like(b) : at::empty({0}, b.options());
  if (!need_a && !need_b) return {ga, gb};
  const int Q = 1 + 3 * need_a + 3 * need_b;
  const bool saved = coef.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lncc_backward", [&] {
    using S = gvsl::acc_t<scalar_t>;
    TORCH_CHECK(grad.scalar_type() == c10::CppTypeToScalarType<S>::value,
                "lncc_backward: grad must be in the accumulation dtype");
    TORCH_CHECK(saved ? grad.numel() == 1 : grad.sizes() == a.sizes(),
                "lncc_backward: grad must be a scalar with coef, else a map of a's shape");
    TORCH_CHECK(!saved || (coef.size(0) == Q && coef.scalar_type() == grad.scalar_type()),
                "lncc_backward: coef must hold the maps of the inputs that need gradients");
    gvsl::with_maps(need_a, need_b, [&](auto q) {
      if (saved) {
        grad_pass<decltype(q)::value, scalar_t, S>(g, coef, grad.item<double>(), a, b, ga, gb);
      } else {
        const at::Tensor maps = coef_buffer(g, Q, a);
        with_preset(preset, [&](auto k) {
          stats_pass<decltype(q)::value, false, decltype(k)::value, scalar_t, S>(
              g, p, a, b, {}, grad, maps, need_a, need_b);
        });
        grad_pass<decltype(q)::value, scalar_t, S>(g, maps, 1.0, a, b, ga, gb);
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
