// GVSL's appearance transforms fused into one kernel (CPU): local pixel shuffling, the Bezier
// lookup table and in-painting of boxes with their own noise. Semantics, shared with
// kernels/appearance.py and the plain-torch composition in gvsl_fast/data/transforms.py:
//   - shuffle[b]: block i covers starts[b,i] + [0, block); the voxel at block-local index j takes
//     the original voxel at block-local index perm[b,j]; where blocks overlap the later one wins;
//   - nonlinear[b]: value -> lut[b] interpolated linearly at clamp(value, 0, 1) * (L - 1);
//   - box k of sample b (boxes[b,k] = lo_d, lo_h, lo_w, hi_d, hi_h, hi_w; empty when hi == lo)
//     fills its voxels with noise[noise_offset[b,k] + box-local linear index]; later boxes win.
// Noise is shared by the channels; arithmetic in float, output in the input dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

using at::Tensor;

inline float lut_apply(const float* lut, int64_t L, float v) {
  float t = std::min(std::max(v, 0.0f), 1.0f) * static_cast<float>(L - 1);
  int32_t i0 = std::min(static_cast<int32_t>(t), static_cast<int32_t>(L - 2));
  float w = t - static_cast<float>(i0);
  return lut[i0] + w * (lut[i0 + 1] - lut[i0]);
}

struct Sample {                 // one (sample, channel) volume and its parameters
  int64_t H, W, V, N, P, L, K;
  const int32_t* starts;        // (N, 3)
  const int64_t* offset;        // (P,) linear offset of block-local index j
  const int64_t* src_offset;    // (P,) linear offset of perm[j]
  bool shuffle, nonlinear;
  const float* lut;             // (L,)
  const int32_t* boxes;         // (K, 6)
  const int64_t* noise_offset;  // (K,)
  const float* noise;
};

// The CPU order of work (same result as the owner map of the Triton kernel): copy, rewrite the
// shuffle blocks in order so the later block wins (blocks read the original image, so overlaps
// never chain), map every voxel through the curve in place, then paint the boxes in order.
template <typename scalar_t>
void one_volume(const Sample& s, const scalar_t* x, scalar_t* out) {
  std::copy(x, x + s.V, out);
  if (s.shuffle) {
    for (int64_t i = 0; i < s.N; ++i) {
      const int32_t* c = s.starts + i * 3;
      const int64_t base = (static_cast<int64_t>(c[0]) * s.H + c[1]) * s.W + c[2];
      for (int64_t j = 0; j < s.P; ++j) out[base + s.offset[j]] = x[base + s.src_offset[j]];
    }
  }
  if (s.nonlinear) {
    for (int64_t v = 0; v < s.V; ++v)
      out[v] = static_cast<scalar_t>(lut_apply(s.lut, s.L, static_cast<float>(out[v])));
  }
  for (int64_t k = 0; k < s.K; ++k) {
    const int32_t* bx = s.boxes + k * 6;
    const int64_t lh = bx[4] - bx[1], lw = bx[5] - bx[2];
    const float* nz = s.noise + s.noise_offset[k];
    for (int64_t d = bx[0]; d < bx[3]; ++d)
      for (int64_t h = bx[1]; h < bx[4]; ++h) {
        scalar_t* row = out + (d * s.H + h) * s.W + bx[2];
        const float* nrow = nz + ((d - bx[0]) * lh + h - bx[1]) * lw;
        for (int64_t w = 0; w < lw; ++w) row[w] = static_cast<scalar_t>(nrow[w]);
      }
  }
}

Tensor appearance_cpu(const Tensor& x_, const Tensor& starts_, const Tensor& perm_,
                      at::IntArrayRef block, const Tensor& shuffle_, const Tensor& lut_,
                      const Tensor& nonlinear_, const Tensor& boxes_, const Tensor& noise_offset_,
                      const Tensor& noise_) {
  TORCH_CHECK(x_.dim() == 5 && x_.is_floating_point(),
              "appearance: x must be a floating (B, C, D, H, W) tensor");
  TORCH_CHECK(block.size() == 3, "appearance: block must have 3 sizes");
  const Tensor x = x_.contiguous();
  const Tensor starts = starts_.to(at::kInt).contiguous();
  const Tensor perm = perm_.to(at::kInt).contiguous();
  const Tensor shuffle = shuffle_.to(at::kInt).contiguous();
  const Tensor nonlinear = nonlinear_.to(at::kInt).contiguous();
  const Tensor lut = lut_.to(at::kFloat).contiguous();
  const Tensor boxes = boxes_.to(at::kInt).contiguous();
  const Tensor noise_offset = noise_offset_.to(at::kLong).contiguous();
  const Tensor noise = noise_.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(3), W = x.size(4);
  const int64_t V = x.size(2) * H * W, N = starts.size(1), P = perm.size(1);
  const int64_t L = lut.size(1), K = boxes.size(1), bh = block[1], bw = block[2];
  TORCH_CHECK(P == block[0] * bh * bw, "appearance: perm has ", P, " entries, block ", block);
  TORCH_CHECK(L >= 2, "appearance: the lookup table needs at least 2 entries");
  auto lin = [&](int64_t j) { return ((j / (bh * bw)) * H + (j / bw) % bh) * W + j % bw; };
  std::vector<int64_t> offset(P), src_offset(B * P);
  const int32_t* pm = perm.data_ptr<int32_t>();
  for (int64_t j = 0; j < P; ++j) offset[j] = lin(j);
  for (int64_t j = 0; j < B * P; ++j) src_offset[j] = lin(pm[j]);
  Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "appearance", [&] {
    at::parallel_for(0, B * C, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / C;
        const Sample s{H, W, V, N, P, L, K,
                       starts.data_ptr<int32_t>() + b * N * 3, offset.data(),
                       src_offset.data() + b * P, shuffle.data_ptr<int32_t>()[b] != 0,
                       nonlinear.data_ptr<int32_t>()[b] != 0, lut.data_ptr<float>() + b * L,
                       boxes.data_ptr<int32_t>() + b * K * 6,
                       noise_offset.data_ptr<int64_t>() + b * K, noise.data_ptr<float>()};
        one_volume<scalar_t>(s, x.data_ptr<scalar_t>() + r * V, out.data_ptr<scalar_t>() + r * V);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gvsl_fast, m) {
  m.def(
      "appearance(Tensor x, Tensor starts, Tensor perm, int[] block, Tensor shuffle, "
      "Tensor lut, Tensor nonlinear, Tensor boxes, Tensor noise_offset, Tensor noise) -> Tensor");
}

TORCH_LIBRARY_IMPL(gvsl_fast, CPU, m) { m.impl("appearance", &appearance_cpu); }
