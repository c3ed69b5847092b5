// CUDA kernels of the fused local NCC (DESIGN §3); the per-voxel math is in csrc/lncc.h.
//
// One streaming kernel computes the zero-padded window sums of M quantities: a block owns a
// TH x TW tile of (h, w) columns and a chunk of depth. For each slice it stages the tile plus
// its halo in shared memory, sums along W then H there, and keeps the D sum as a running sum
// over a register ring of the last K slice sums (K is a template parameter, so the ring index is
// static). Loads and per-voxel consumers are functors: the forward (cc map, or per-block loss
// partials summed in a fixed order afterwards), the backward's coefficient maps, and the
// gradients (a gather: each voxel reads the window sums of the coefficient maps; no atomics).
// Each thread's (h, w) positions are fixed for the whole depth, so their addresses are resolved
// once, as column pointers, and a slice only adds d times the depth stride. (Index arithmetic
// redone per load and store, a division by C and 64-bit strided products, had been about 60% of
// the forward's instructions per slice in the sm_90 SASS.)
//
// Precision, as the CPU backend: every running sum accumulates in double. (A float one drifts:
// what it adds and later subtracts does not cancel exactly, so a constant window after varying
// data gets a variance and a cross term of rounding noise, and the gradient there, about
// cross / eps, is wrong by orders of magnitude.) The W and W+H sums are stored rounded to float
// (shared memory, the ring); the D sums stay double, and the consumers compute the statistics
// (SII - SI^2/n and the like, where float rounding and FMA contraction would again leave noise
// of the order of eps) and the gradients in double from them, the other per-voxel formulas in
// float.
#include <tuple>

#include "cuda/launch.cuh"
#include "lncc.h"

namespace {

constexpr int TW = 32, TH = 8, THREADS = TW * TH;
constexpr int MAX_WINDOW = 15;

using gvsl::LnccParams;
using gvsl::cuda::DeviceGuard;

struct Strides {
  int64_t b, c, d, h, w;
};

Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

struct Shape {
  int C, D, H, W;
  // Offset of (volume bc, 0, h, w) in a tensor of strides st: the start of that column.
  __device__ int64_t column(const Strides& st, int bc, int h, int w) const {
    return (bc / C) * st.b + (bc % C) * st.c + int64_t(h) * st.h + int64_t(w) * st.w;
  }
  // Offset of (volume bc, 0, h, w) in a contiguous (B*C, D, H, W) buffer; depth stride H*W.
  __device__ int64_t dense(int bc, int h, int w) const {
    return (int64_t(bc) * D * H + h) * W + w;
  }
};

// Loaders and consumers address their tensors through `column(s, bc, h, w)`, which resolves a
// (h, w) position once into a Col (column pointers); `fetch` / `operator()` then take the Col
// and the slice d. Loaders fetch the raw values of one voxel (RAW floats) and expand them into
// the M quantities to box-sum (`expand`), so the next slice's global loads can be issued early.

// I, J, I^2, J^2, IJ from the two inputs.
template <typename T> struct LoadInputs {
  static constexpr int M = gvsl::kLnccSums, RAW = 2;
  const T *a, *b;
  Strides sa, sb;
  struct Col {
    const T *a, *b;
  };
  __device__ Col column(const Shape& s, int bc, int h, int w) const {
    return {a + s.column(sa, bc, h, w), b + s.column(sb, bc, h, w)};
  }
  __device__ void fetch(const Col& c, int d, float* raw) const {
    raw[0] = static_cast<float>(c.a[d * sa.d]);
    raw[1] = static_cast<float>(c.b[d * sb.d]);
  }
  __device__ static void expand(const float* raw, float* q) {
    q[gvsl::kSI] = raw[0];
    q[gvsl::kSJ] = raw[1];
    q[gvsl::kSII] = raw[0] * raw[0];
    q[gvsl::kSJJ] = raw[1] * raw[1];
    q[gvsl::kSIJ] = raw[0] * raw[1];
  }
};

// The Q backward coefficient maps, stored (Q, B*C, D, H, W) contiguous.
template <int Q> struct LoadCoefs {
  static constexpr int M = Q, RAW = Q;
  const float* coef;
  int64_t qstride, dstride;  // map and depth strides
  using Col = const float*;
  __device__ Col column(const Shape& s, int bc, int h, int w) const {
    return coef + s.dense(bc, h, w);
  }
  __device__ void fetch(Col c, int d, float* raw) const {
    const float* p = c + d * dstride;
#pragma unroll
    for (int m = 0; m < Q; ++m) raw[m] = p[m * qstride];
  }
  __device__ static void expand(const float* raw, float* q) {
#pragma unroll
    for (int m = 0; m < Q; ++m) q[m] = raw[m];
  }
};

// The statistics of a voxel from its window sums, computed in double.
__device__ gvsl::LnccStats<float> stats_of(const double* S, const LnccParams<float>& p) {
  return gvsl::lncc_stats_cast<float>(gvsl::lncc_stats<double>(
      S[gvsl::kSI], S[gvsl::kSJ], S[gvsl::kSII], S[gvsl::kSJJ], S[gvsl::kSIJ], double(p.n)));
}

// Forward: the cc map (out != nullptr), else returns the loss term for the block partials.
template <typename T> struct ConsumeCC {
  LnccParams<float> p;
  T* out;
  Strides so;
  using Col = T*;
  __device__ Col column(const Shape& s, int bc, int h, int w) const {
    return out ? out + s.column(so, bc, h, w) : nullptr;
  }
  __device__ float operator()(Col c, int d, const double* S) const {
    const float cc = gvsl::lncc_cc(stats_of(S, p), p);
    if (c) {
      c[d * so.d] = static_cast<T>(cc);
      return 0.f;
    }
    return gvsl::lncc_term(cc, p.preset);
  }
};

// The coefficient maps from g = dL/dcc: a map (backward of reduction none), or null for a unit
// dL/dcc (the forward of a reduced loss, which also returns each voxel's loss term: the maps are
// linear in the scalar dL/dcc, so the backward only scales their window sums).
template <int Q> struct ConsumeCoefs {
  LnccParams<float> p;
  const float* g;
  Strides sg;
  float* coef;
  int64_t qstride, dstride;  // map and depth strides
  bool need_a, need_b;
  struct Col {
    const float* g;
    float* coef;
  };
  __device__ Col column(const Shape& s, int bc, int h, int w) const {
    return {g ? g + s.column(sg, bc, h, w) : nullptr, coef + s.dense(bc, h, w)};
  }
  __device__ float operator()(const Col& c, int d, const double* S) const {
    const auto st = stats_of(S, p);
    const auto k = gvsl::lncc_coefs(st, c.g ? c.g[d * sg.d] : 1.f, p);
    float maps[7];
    gvsl::lncc_coef_maps(st, k, need_a, need_b, maps);
    float* out = c.coef + d * dstride;
#pragma unroll
    for (int q = 0; q < Q; ++q) out[q * qstride] = maps[q];
    return c.g ? 0.f : gvsl::lncc_term(gvsl::lncc_cc(st, p), p.preset);
  }
};

// Backward pass 2: the gradients from the window sums of the coefficient maps, in double (the
// four terms cancel where the images are smooth), times the scalar at `scale`.
template <typename T> struct ConsumeGrads {
  const T *a, *b;
  T *ga, *gb;
  Strides sa, sb, sga, sgb;
  const float* scale;
  struct Col {
    const T *a, *b;
    T *ga, *gb;
  };
  __device__ Col column(const Shape& s, int bc, int h, int w) const {
    return {a + s.column(sa, bc, h, w), b + s.column(sb, bc, h, w),
            ga ? ga + s.column(sga, bc, h, w) : nullptr,
            gb ? gb + s.column(sgb, bc, h, w) : nullptr};
  }
  // Q = 7: dL/db's three maps follow dL/da's (S[4..6]); Q = 4: only one input needs a gradient,
  // and dL/db's maps are S[1..3]. A static index keeps S in registers (not on the stack).
  template <int Q> __device__ float operator()(const Col& c, int d, const double (&S)[Q]) const {
    constexpr int jo = Q == 7 ? 4 : 1;
    const double i = static_cast<float>(c.a[d * sa.d]);
    const double j = static_cast<float>(c.b[d * sb.d]);
    const double k = *scale;
    if (c.ga) {
      c.ga[d * sga.d] = static_cast<T>(float(k * gvsl::lncc_grad(i, j, S[0], S[1], S[2], S[3])));
    }
    if (c.gb) {
      c.gb[d * sgb.d] =
          static_cast<T>(float(k * gvsl::lncc_grad(j, i, S[0], S[jo], S[jo + 1], S[jo + 2])));
    }
    return 0.f;
  }
};

// Shared-memory tile of one slice: the halo'd quantities (rows padded to an odd pitch against
// bank conflicts), their W sums, and (aliasing the first) their W+H sums.
template <int K, int M> struct Tile {
  static constexpr int R = K / 2, HH = TH + 2 * R, WW = TW + 2 * R;
  static constexpr int WP = TW + 1, SEG = 8;
  // Odd row pitch (conflict-free W sums) where it fits in the 48 KB of static shared memory.
  static constexpr int XP =
      (M * HH * (WW + 1) + M * HH * WP) * 4 + 256 <= 48 * 1024 ? WW + 1 : WW;
  static constexpr int PER = (HH * WW + THREADS - 1) / THREADS;  // halo voxels per thread
  float x[M][HH][XP];
  float w[M][HH][WP];
};

// This thread's halo-tile positions: their columns, and whether each lies in the volume (the
// others load zeros).
template <int K, class Load> struct TileColumns {
  static constexpr int PER = Tile<K, Load::M>::PER;
  typename Load::Col col[PER];
  bool inside[PER];

  __device__ TileColumns(const Load& load, const Shape& s, int bc, int h0, int w0) {
    using TileT = Tile<K, Load::M>;
    const int tid = threadIdx.y * TW + threadIdx.x;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int e = tid + i * THREADS;
      const int h = h0 + e / TileT::WW - TileT::R, w = w0 + e % TileT::WW - TileT::R;
      inside[i] = e < TileT::HH * TileT::WW && h >= 0 && h < s.H && w >= 0 && w < s.W;
      col[i] = load.column(s, bc, inside[i] ? h : 0, inside[i] ? w : 0);
    }
  }

  // Issues the loads of slice d's halo tile into registers.
  __device__ void fetch(const Load& load, int d, float (*raw)[Load::RAW]) const {
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      if (inside[i]) {
        load.fetch(col[i], d, raw[i]);
      } else {
#pragma unroll
        for (int m = 0; m < Load::RAW; ++m) raw[i][m] = 0.f;
      }
    }
  }
};

// Stages the fetched slice, calls next(), and returns the window sums over W then H for this
// thread's (h, w):
// running sums over row segments (W) and tile columns (H), so that shared-memory traffic per
// voxel does not grow with K; they accumulate in double and store rounded to float.
template <int K, int M, class Load, class Next>
__device__ void slice_sums(Tile<K, M>& t, float (*raw)[Load::RAW], const Next& next, float* out) {
  using TileT = Tile<K, M>;
  constexpr int HH = TileT::HH, WW = TileT::WW, SEG = TileT::SEG, NSEG = TW / SEG;
  const int tid = threadIdx.y * TW + threadIdx.x;
  __syncthreads();  // the previous slice is done with the tile
#pragma unroll
  for (int i = 0; i < TileT::PER; ++i) {
    const int e = tid + i * THREADS;
    if (e < HH * WW) {
      float q[M];
      Load::expand(raw[i], q);
#pragma unroll
      for (int m = 0; m < M; ++m) t.x[m][e / WW][e % WW] = q[m];
    }
  }
  next();  // raw is free: issue the next slice's loads, to land while this one is summed
  __syncthreads();
  for (int task = tid; task < M * NSEG * HH; task += THREADS) {
    const int hh = task % HH, sg = (task / HH) % NSEG, m = task / (HH * NSEG);
    const float* row = &t.x[m][hh][sg * SEG];
    float* dst = &t.w[m][hh][sg * SEG];
    double acc = 0.0;
#pragma unroll
    for (int j = 0; j < K; ++j) acc += row[j];
    dst[0] = float(acc);
#pragma unroll
    for (int i = 1; i < SEG; ++i) {
      acc += double(row[i + K - 1]) - double(row[i - 1]);
      dst[i] = float(acc);
    }
  }
  __syncthreads();
  float(*hs)[TH][TW] = reinterpret_cast<float(*)[TH][TW]>(&t.x[0][0][0]);  // x is free now
  for (int task = tid; task < M * TW; task += THREADS) {
    const int x = task % TW, m = task / TW;
    double acc = 0.0;
#pragma unroll
    for (int j = 0; j < K; ++j) acc += t.w[m][j][x];
    hs[m][0][x] = float(acc);
#pragma unroll
    for (int i = 1; i < TH; ++i) {
      acc += double(t.w[m][i + K - 1][x]) - double(t.w[m][i - 1][x]);
      hs[m][i][x] = float(acc);
    }
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < M; ++m) out[m] = hs[m][threadIdx.y][threadIdx.x];
}

// float -> double, opaque to the compiler. Written plainly, the conversion of a ring entry when
// it leaves the window is merged with the one made when it entered, and the ring is then held in
// double: K * M more registers (ptxas, sm_90, K = 9 forward: 229 instead of 172).
__device__ __forceinline__ double widen(float x) {
#ifdef __CUDA_ARCH__
  double r;
  asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x));
  return r;
#else
  return x;  // the host (emulation) has no such merge to prevent
#endif
}

// Blocks per SM that ptxas must leave registers for (two: at most 128 per thread): two where the
// kernels fit, as they did with float sums (small windows; the gradient pass of one input up to
// K = 9, which the double sums would otherwise take to 149 registers), else one.
template <int K, int M> constexpr int min_blocks() { return K <= 5 || (M <= 4 && K <= 9) ? 2 : 1; }

template <int K, class Load, class Consume>
__global__ void __launch_bounds__(THREADS, (min_blocks<K, Load::M>()))
    box_stream_kernel(Shape s, int chunks, int chunk, Load load, Consume consume, float* partial,
                      int z0) {
  constexpr int M = Load::M, R = K / 2;
  using TileT = Tile<K, M>;
  __shared__ TileT tile;
  __shared__ float red[THREADS / 32];
  const int w0 = blockIdx.x * TW, h0 = blockIdx.y * TH;
  const int zb = z0 + int(blockIdx.z);  // (volume, depth chunk) of this block
  const int bc = zb / chunks, c = zb % chunks;
  const int d0 = c * chunk, d1 = min(s.D, d0 + chunk);
  const int h = h0 + threadIdx.y, w = w0 + threadIdx.x;
  const bool inside = h < s.H && w < s.W;
  const int zend = min(s.D, d1 + R);  // slices past this are zero
  const TileColumns<K, Load> tile_cols(load, s, bc, h0, w0);
  const typename Consume::Col out_col = consume.column(s, bc, inside ? h : 0, inside ? w : 0);
  float ring[K][M];  // the W+H sums of the last K slices, as summed into acc
  double acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    acc[m] = 0.0;
#pragma unroll
    for (int j = 0; j < K; ++j) ring[j][m] = 0.f;
  }
  float raw[TileT::PER][Load::RAW];
  if (d0 - R >= 0) tile_cols.fetch(load, d0 - R, raw);
  float sum = 0.f;
  for (int z0 = d0 - R; z0 < d1 + R; z0 += K) {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int z = z0 + j;  // ring[j] holds slice z - K
      if (z >= d1 + R) break;
      const auto next = [&] {
        if (z + 1 >= 0 && z + 1 < zend) tile_cols.fetch(load, z + 1, raw);
      };
      float p[M];
      if (z >= 0 && z < zend) {
        slice_sums<K, M, Load>(tile, raw, next, p);
      } else {
        next();
#pragma unroll
        for (int m = 0; m < M; ++m) p[m] = 0.f;
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        acc[m] += double(p[m]) - widen(ring[j][m]);
        ring[j][m] = p[m];
      }
      if (inside && z - R >= d0) sum += consume(out_col, z - R, acc);
    }
  }
  if (partial == nullptr) return;
  // Fixed-order block reduction of the loss terms: warp shuffles, then warp 0.
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
  const int tid = threadIdx.y * TW + threadIdx.x;
  if (tid % 32 == 0) red[tid / 32] = sum;
  __syncthreads();
  if (tid < 32) {
    sum = tid < THREADS / 32 ? red[tid] : 0.f;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
    if (tid == 0) {
      partial[(int64_t(zb) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] = sum;
    }
  }
}

struct Launch {
  dim3 grid;
  int chunks, chunk;
};

// Tiles over (h, w); the depth is split into chunks until the grid fills the GPU, keeping
// chunks at least 2K deep so the K - 1 warm-up slices of each stay a small overhead.
Launch plan(int64_t BC, int64_t D, int64_t H, int64_t W, int k) {
  const int64_t tiles = ((W + TW - 1) / TW) * ((H + TH - 1) / TH) * BC;
  const int sms = gvsl::cuda::multiprocessors();
  const int64_t want = (4 * sms + tiles - 1) / tiles;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(want, D / (2 * k)));
  const int64_t chunk = (D + chunks - 1) / chunks;
  const int64_t used = (D + chunk - 1) / chunk;
  // grid.z counts every (volume, chunk) block row; launch_box() splits it into slices that fit
  // the gridDim.z limit; grid.y (rows of tiles along H) is not split
  TORCH_CHECK(BC * used <= INT32_MAX, "lncc: too many volumes for one launch");
  TORCH_CHECK((H + TH - 1) / TH <= gvsl::cuda::kGridYZLimit, "lncc: H over ",
              gvsl::cuda::kGridYZLimit * TH, " on CUDA");
  return {dim3((W + TW - 1) / TW, (H + TH - 1) / TH, BC * used), int(used), int(chunk)};
}

template <class Load, class Consume>
void launch_box(int k, const Shape& s, const Launch& l, const Load& load, const Consume& consume,
                float* partial) {
  gvsl::cuda::in_grid_slices(l.grid.z, [&](unsigned nz, int z0) {  // (volume, chunk) rows: axis z
    const dim3 grid(l.grid.x, l.grid.y, nz);
    switch (k) {
#define GVSL_LNCC_CASE(K)                                                                 \
  case K:                                                                                 \
    gvsl::cuda::launch(box_stream_kernel<K, Load, Consume>, grid, dim3(TW, TH), s, l.chunks, \
                       l.chunk, load, consume, partial, z0);                              \
    break;
      GVSL_LNCC_CASE(1)
      GVSL_LNCC_CASE(3)
      GVSL_LNCC_CASE(5)
      GVSL_LNCC_CASE(7)
      GVSL_LNCC_CASE(9)
      GVSL_LNCC_CASE(11)
      GVSL_LNCC_CASE(13)
      GVSL_LNCC_CASE(15)
#undef GVSL_LNCC_CASE
      default:
        TORCH_CHECK(false, "lncc: the CUDA kernels support odd windows up to ", MAX_WINDOW,
                    ", got ", k);
    }
  });
}

struct Problem {
  Shape s;
  int64_t BC;
  int k;
  LnccParams<float> p;
};

Problem check_inputs(const at::Tensor& a, const at::Tensor& b, int64_t window, double eps,
                     int64_t preset, double smooth_nr) {
  TORCH_CHECK(a.device().type() == gvsl::cuda::kDevice && a.device() == b.device(),
              "lncc: a and b must be on one CUDA device");
  TORCH_CHECK(a.dim() == 5 && a.sizes() == b.sizes(), "lncc: a and b must be 5-D with one shape");
  TORCH_CHECK(a.numel() > 0, "lncc: a and b are empty");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "lncc: a and b must have one dtype");
  TORCH_CHECK(window >= 1 && window % 2 == 1 && window <= MAX_WINDOW,
              "lncc: the CUDA kernels support odd windows up to ", MAX_WINDOW, ", got ", window);
  const Shape s{int(a.size(1)), int(a.size(2)), int(a.size(3)), int(a.size(4))};
  const LnccParams<float> p{float(window * window * window), float(eps), float(smooth_nr),
                            int(preset)};
  return {s, a.size(0) * a.size(1), int(window), p};
}

at::Tensor coef_buffer(const Problem& pr, bool need_a, bool need_b, const at::Tensor& a) {
  return at::empty({gvsl::lncc_map_count(need_a, need_b), pr.BC, pr.s.D, pr.s.H, pr.s.W},
                   a.options().dtype(at::kFloat));
}

// Returns (the cc map or the loss, the coefficient maps for a unit dL/dcc): the maps only for a
// reduced loss with an input that needs a gradient, else empty.
template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const Problem& pr, const at::Tensor& a,
                                                const at::Tensor& b, int64_t reduction,
                                                bool need_a, bool need_b) {
  const Launch l = plan(pr.BC, pr.s.D, pr.s.H, pr.s.W, pr.k);
  const LoadInputs<T> load{a.data_ptr<T>(), b.data_ptr<T>(), strides_of(a), strides_of(b)};
  if (reduction == gvsl::kLnccNone) {
    at::Tensor out = at::empty_like(a);
    launch_box(pr.k, pr.s, l, load, ConsumeCC<T>{pr.p, out.data_ptr<T>(), strides_of(out)},
               nullptr);
    return {out, at::empty({0}, a.options())};
  }
  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({int64_t(l.grid.x) * l.grid.y * l.grid.z}, f32);
  at::Tensor coef = at::empty({0}, f32);
  if (need_a || need_b) {
    coef = coef_buffer(pr, need_a, need_b, a);
    gvsl::with_maps(need_a, need_b, [&](auto q) {
      launch_box(pr.k, pr.s, l, load,
             ConsumeCoefs<decltype(q)::value>{pr.p, nullptr, strides_of(a),
                                               coef.data_ptr<float>(), coef.stride(0),
                                               coef.stride(2), need_a, need_b},
             partial.data_ptr<float>());
    });
  } else {
    launch_box(pr.k, pr.s, l, load, ConsumeCC<T>{pr.p, nullptr, strides_of(a)},
           partial.data_ptr<float>());
  }
  at::Tensor total = partial.to(at::kDouble).sum();  // a fixed-order reduction
  if (reduction == gvsl::kLnccMean) total = total / double(a.numel());
  return {total.to(at::kFloat), coef};
}

std::tuple<at::Tensor, at::Tensor> lncc_forward_cuda(const at::Tensor& a, const at::Tensor& b,
                                                     int64_t window, double eps, int64_t preset,
                                                     double smooth_nr, int64_t reduction,
                                                     bool need_a, bool need_b) {
  const Problem pr = check_inputs(a, b, window, eps, preset, smooth_nr);
  const DeviceGuard guard(a.device());
  return GVSL_DISPATCH_FAST(a.scalar_type(), "lncc_forward_cuda", [&] {
    return forward_impl<scalar_t>(pr, a, b, reduction, need_a, need_b);
  });
}

// The gradients from coefficient maps `coef` times the scalar at `scale`.
template <int Q, typename T>
void grad_pass(const Problem& pr, const Launch& l, const at::Tensor& coef, const float* scale,
               const at::Tensor& a, const at::Tensor& b, at::Tensor& ga, at::Tensor& gb) {
  const bool need_a = ga.numel() > 0, need_b = gb.numel() > 0;
  const ConsumeGrads<T> consume{a.data_ptr<T>(), b.data_ptr<T>(),
                                need_a ? ga.data_ptr<T>() : nullptr,
                                need_b ? gb.data_ptr<T>() : nullptr,
                                strides_of(a), strides_of(b),
                                strides_of(need_a ? ga : a), strides_of(need_b ? gb : b), scale};
  const LoadCoefs<Q> load{coef.data_ptr<float>(), coef.stride(0), coef.stride(2)};
  launch_box(pr.k, pr.s, l, load, consume, nullptr);
}

// dL/da and dL/db for the inputs that need them. With the forward's coefficient maps `coef`,
// `grad` is the scalar dL/dcc that scales them; without (reduction none), `grad` is the dL/dcc
// map and the maps are recomputed from the inputs first.
std::tuple<at::Tensor, at::Tensor> lncc_backward_cuda(const at::Tensor& grad, const at::Tensor& a,
                                                      const at::Tensor& b, const at::Tensor& coef,
                                                      int64_t window, double eps, int64_t preset,
                                                      double smooth_nr, bool need_a,
                                                      bool need_b) {
  const Problem pr = check_inputs(a, b, window, eps, preset, smooth_nr);
  const bool saved = coef.numel() > 0;
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.device() == a.device() &&
                  (saved ? grad.numel() == 1 : grad.sizes() == a.sizes()),
              "lncc_backward: grad must be float32 on a's device: a scalar with coef, else a map "
              "of a's shape");
  const int Q = gvsl::lncc_map_count(need_a, need_b);
  TORCH_CHECK(!saved || (coef.size(0) == Q && coef.scalar_type() == at::kFloat &&
                         coef.is_contiguous()),
              "lncc_backward: coef must hold the maps of the inputs that need gradients");
  const DeviceGuard guard(a.device());
  at::Tensor ga = need_a ? at::empty_like(a) : at::empty({0}, a.options());
  at::Tensor gb = need_b ? at::empty_like(b) : at::empty({0}, b.options());
  if (!need_a && !need_b) return {ga, gb};
  const Launch l = plan(pr.BC, pr.s.D, pr.s.H, pr.s.W, pr.k);
  GVSL_DISPATCH_FAST(a.scalar_type(), "lncc_backward_cuda", [&] {
    gvsl::with_maps(need_a, need_b, [&](auto q) {
      constexpr int kQ = decltype(q)::value;
      if (saved) {
        const at::Tensor scale = grad.reshape({1}).contiguous();
        grad_pass<kQ, scalar_t>(pr, l, coef, scale.data_ptr<float>(), a, b, ga, gb);
        return;
      }
      const at::Tensor maps = coef_buffer(pr, need_a, need_b, a);
      const LoadInputs<scalar_t> load{a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                                      strides_of(a), strides_of(b)};
      launch_box(pr.k, pr.s, l, load,
             ConsumeCoefs<kQ>{pr.p, grad.data_ptr<float>(), strides_of(grad),
                              maps.data_ptr<float>(), maps.stride(0), maps.stride(2), need_a,
                              need_b},
             nullptr);
      const at::Tensor one = at::ones({1}, grad.options());
      grad_pass<kQ, scalar_t>(pr, l, maps, one.data_ptr<float>(), a, b, ga, gb);
    });
  });
  return {ga, gb};
}

}  // namespace

GVSL_CUDA_LIBRARY(m) {
  using gvsl::cuda::register_op;
  register_op(m, "lncc_forward", &lncc_forward_cuda);
  register_op(m, "lncc_backward", &lncc_backward_cuda);
}
