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

template <typename T, typename S>
at::Tensor lncc_forward_impl(const Geometry& g, const LnccParams<double>& p, const at::Tensor& a,
                             const at::Tensor& b, int64_t reduction) {
  const bool map = reduction == gvsl::kLnccNone;
  const int64_t HW = g.H * g.W;
  at::Tensor out =
      map ? at::empty_like(a) : at::empty({}, a.options().dtype(c10::CppTypeToScalarType<S>::value));
  const Strides so = strides_of(map ? out : a);
  T* po = map ? out.data_ptr<T>() : nullptr;
  std::vector<double> partial(g.B * g.C * g.D, 0.0);
  const int64_t tasks = for_chunks<gvsl::kLnccSums, S>(
      g.B * g.C, g.D, g.H, g.W, g.k,
      [&](auto& stream, int64_t bc, int64_t d0, int64_t d1, int64_t t) {
        const int64_t bi = bc / g.C, ci = bc % g.C;
        auto load = load_inputs<T, S>(a, b, bi, ci);
        double sum = 0.0;
        auto consume = [&](int64_t d, const double* P) {
          for (int64_t h = 0; h < g.H; ++h) {
            const double* Ph = P + h * g.W;
            if (po) {
              T* o = po + bi * so.b + ci * so.c + d * so.d + h * so.h;
#pragma omp simd
              for (int64_t w = 0; w < g.W; ++w) {
                o[w * so.w] = T(gvsl::lncc_cc(stats_at(Ph, HW, w, p.n), p));
              }
            } else {
              double row = 0.0;
#pragma omp simd reduction(+ : row)
              for (int64_t w = 0; w < g.W; ++w) {
                row += gvsl::lncc_term(gvsl::lncc_cc(stats_at(Ph, HW, w, p.n), p), p.preset);
              }
              sum += row;
            }
          }
        };
        stream.run(g.D, d0, d1, load, consume);
        partial[t] = sum;
      });
  if (!map) {
    double total = 0.0;
    for (int64_t t = 0; t < tasks; ++t) total += partial[t];
    if (reduction == gvsl::kLnccMean) total /= double(a.numel());
    out.fill_(total);
  }
  return out;
}

at::Tensor lncc_forward_cpu(const at::Tensor& a, const at::Tensor& b, int64_t window, double eps,
                            int64_t preset, double smooth_nr, int64_t reduction) {
  const Geometry g = check_inputs(a, b, window);
  const auto p = params_of(window, eps, preset, smooth_nr);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lncc_forward",
                                         [&] {
    return lncc_forward_impl<scalar_t, gvsl::acc_t<scalar_t>>(g, p, a, b, reduction);
  });
}

// dL/da and dL/db (where their tensors are non-empty) from g = dL/dcc, with Q coefficient maps.
template <int Q, typename T, typename S>
void lncc_backward_impl(const Geometry& g, const LnccParams<double>& p, const at::Tensor& grad,
                        const at::Tensor& a, const at::Tensor& b, at::Tensor& ga, at::Tensor& gb) {
  const bool need_a = ga.numel() > 0, need_b = gb.numel() > 0;
  const int64_t HW = g.H * g.W, DHW = g.D * HW, qstride = g.B * g.C * DHW;
  at::Tensor coef = at::empty({Q, g.B * g.C, g.D, g.H, g.W}, grad.options());
  S* pc = coef.data_ptr<S>();
  const S* pg = grad.data_ptr<S>();
  const Strides sg = strides_of(grad);
  // Pass 1: the forward window sums give the per-voxel coefficient maps.
  for_chunks<gvsl::kLnccSums, S>(
      g.B * g.C, g.D, g.H, g.W, g.k, [&](auto& stream, int64_t bc, int64_t d0, int64_t d1, int64_t) {
        const int64_t bi = bc / g.C, ci = bc % g.C;
        auto load = load_inputs<T, S>(a, b, bi, ci);
        auto consume = [&](int64_t d, const double* P) {
          for (int64_t h = 0; h < g.H; ++h) {
            const double* Ph = P + h * g.W;
            const S* gp = pg + bi * sg.b + ci * sg.c + d * sg.d + h * sg.h;
            S* cp = pc + bc * DHW + d * HW + h * g.W;
#pragma omp simd
            for (int64_t w = 0; w < g.W; ++w) {
              const auto st = stats_at(Ph, HW, w, p.n);
              const auto k = gvsl::lncc_coefs(st, double(gp[w * sg.w]), p);
              double maps[Q];
              gvsl::lncc_coef_maps(st, k, need_a, need_b, maps);
              for (int q = 0; q < Q; ++q) cp[q * qstride + w] = S(maps[q]);
            }
          }
        };
        stream.run(g.D, d0, d1, load, consume);
      });
  // Pass 2: box-sum the maps (the box is its own adjoint) and combine them into the gradients.
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
            o[w * sga.w] = T(gvsl::lncc_grad(double(ah[w * sa.w]), double(bh[w * sb.w]), Ph[w],
                                             Ph[HW + w], Ph[2 * HW + w], Ph[3 * HW + w]));
          }
        }
        if (pgb) {
          T* o = pgb + bi * sgb.b + ci * sgb.c + d * sgb.d + h * sgb.h;
#pragma omp simd
          for (int64_t w = 0; w < g.W; ++w) {
            o[w * sgb.w] = T(gvsl::lncc_grad(double(bh[w * sb.w]), double(ah[w * sa.w]), Ph[w],
                                             Ph[jo + w], Ph[jo + HW + w], Ph[jo + 2 * HW + w]));
          }
        }
      }
    };
    stream.run(g.D, d0, d1, load, consume);
  });
}

std::tuple<at::Tensor, at::Tensor> lncc_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                     const at::Tensor& b, int64_t window,
                                                     double eps, int64_t preset, double smooth_nr,
                                                     bool need_a, bool need_b) {
  const Geometry g = check_inputs(a, b, window);
  TORCH_CHECK(grad.sizes() == a.sizes(), "lncc_backward: grad must have the shape of a");
  const auto p = params_of(window, eps, preset, smooth_nr);
  at::Tensor ga = need_a ? at::empty_like(a) : at::empty({0}, a.options());
  at::Tensor gb = need_b ? at::empty_like(b) : at::empty({0}, b.options());
  if (!need_a && !need_b) return {ga, gb};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lncc_backward", [&] {
    using S = gvsl::acc_t<scalar_t>;
    TORCH_CHECK(grad.scalar_type() == c10::CppTypeToScalarType<S>::value,
                "lncc_backward: grad must be in the accumulation dtype");
    if (need_a && need_b) {
      lncc_backward_impl<7, scalar_t, S>(g, p, grad, a, b, ga, gb);
    } else {
      lncc_backward_impl<4, scalar_t, S>(g, p, grad, a, b, ga, gb);
    }
  });
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gvsl_fast, m) {
  m.def(
      "lncc_forward(Tensor a, Tensor b, int window, float eps, int preset, float smooth_nr, "
      "int reduction) -> Tensor");
  m.def(
      "lncc_backward(Tensor grad, Tensor a, Tensor b, int window, float eps, int preset, "
      "float smooth_nr, bool need_a, bool need_b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gvsl_fast, CPU, m) {
  m.impl("lncc_forward", &lncc_forward_cpu);
  m.impl("lncc_backward", &lncc_backward_cpu);
}
