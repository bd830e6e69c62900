// Per-row dynamic quantization of an activation matrix to uint8 with a zero point.
//
// Numerics (the contract of kernels/reference.py, bit for bit):
//   lo = min(min(row), 0), hi = max(max(row), 0)
//   scale = (hi - lo) / 255, or 1 when hi == lo
//   zero_point = clamp(round(-lo / scale), 0, 255)
//   q = clamp(round(x / scale) + zero_point, 0, 255)
// in float32, with round half to even and a true division (no reciprocal). A row with NaN, an
// infinity or a range beyond float32 (so a scale that is not finite) gets scale NaN, zero point
// INT32_MIN and q = 0, so its outputs are NaN, as in the reference.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "isa.h"
#include "quantize.h"

namespace weightlight {
namespace {

struct RowParams {
  float scale;
  float zero_point;
};

RowParams params_from_range(float lo, float hi) {
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  float scale = (hi - lo) / 255.0f;
  if (scale == 0.0f) {
    scale = 1.0f;
  }
  float zero_point = std::nearbyint(-lo / scale);
  zero_point = std::min(std::max(zero_point, 0.0f), 255.0f);
  return {scale, zero_point};
}

// Set the q row to zeros and return the parameters of a row without a usable scale.
RowParams nan_row(int64_t k, uint8_t* q) {
  std::fill(q, q + k, uint8_t{0});
  return {std::numeric_limits<float>::quiet_NaN(), -2147483648.0f};
}

void quantize_row_scalar(const float* x, int64_t k, uint8_t* q, RowParams* out) {
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t i = 0; i < k; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    nan |= std::isnan(x[i]);
  }
  RowParams p = params_from_range(lo, hi);
  if (nan || !std::isfinite(p.scale)) {
    *out = nan_row(k, q);
    return;
  }
  for (int64_t i = 0; i < k; ++i) {
    float v = std::nearbyint(x[i] / p.scale) + p.zero_point;
    q[i] = static_cast<uint8_t>(std::min(std::max(v, 0.0f), 255.0f));
  }
  *out = p;
}

__attribute__((target("avx2,fma"))) void quantize_row_avx2(const float* x, int64_t k,
                                                            uint8_t* q, RowParams* out) {
  __m256 vlo = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 vhi = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vnan = _mm256_setzero_ps();  // min and max drop NaN, so a separate mask records it
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lo_lanes[8];
  alignas(32) float hi_lanes[8];
  _mm256_store_ps(lo_lanes, vlo);
  _mm256_store_ps(hi_lanes, vhi);
  float lo = lo_lanes[0];
  float hi = hi_lanes[0];
  for (int lane = 1; lane < 8; ++lane) {
    lo = std::min(lo, lo_lanes[lane]);
    hi = std::max(hi, hi_lanes[lane]);
  }
  bool nan = _mm256_movemask_ps(vnan) != 0;
  for (int64_t j = i; j < k; ++j) {
    lo = std::min(lo, x[j]);
    hi = std::max(hi, x[j]);
    nan |= std::isnan(x[j]);
  }
  RowParams p = params_from_range(lo, hi);
  if (nan || !std::isfinite(p.scale)) {
    *out = nan_row(k, q);
    return;
  }

  const __m256 vscale = _mm256_set1_ps(p.scale);
  const __m256 vzp = _mm256_set1_ps(p.zero_point);
  const __m256 vzero = _mm256_setzero_ps();
  const __m256 vmax = _mm256_set1_ps(255.0f);
  for (i = 0; i + 8 <= k; i += 8) {
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + i), vscale);
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vzp), vzero), vmax);
    __m256i v32 = _mm256_cvtps_epi32(v);
    __m128i v16 = _mm_packus_epi32(_mm256_castsi256_si128(v32), _mm256_extracti128_si256(v32, 1));
    __m128i v8 = _mm_packus_epi16(v16, v16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), v8);
  }
  for (; i < k; ++i) {
    float v = std::nearbyint(x[i] / p.scale) + p.zero_point;
    q[i] = static_cast<uint8_t>(std::min(std::max(v, 0.0f), 255.0f));
  }
  *out = p;
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void quantize_row_avx512(
    const float* x, int64_t k, uint8_t* q, RowParams* out) {
  // Two pairs of running extremes, so that the 4-cycle latency of min and max does not bound the pass.
  __m512 vlo0 = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 vhi0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vlo1 = vlo0;
  __m512 vhi1 = vhi0;
  __mmask16 nan = 0;  // min and max drop NaN, so a separate mask records it
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    const __m512 v0 = _mm512_loadu_ps(x + i);
    const __m512 v1 = _mm512_loadu_ps(x + i + 16);
    vlo0 = _mm512_min_ps(vlo0, v0);
    vhi0 = _mm512_max_ps(vhi0, v0);
    vlo1 = _mm512_min_ps(vlo1, v1);
    vhi1 = _mm512_max_ps(vhi1, v1);
    nan |= _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
  }
  for (; i < k; i += 16) {
    const __mmask16 tail = k - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                       : static_cast<__mmask16>((1u << (k - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(tail, x + i);
    vlo0 = _mm512_mask_min_ps(vlo0, tail, vlo0, v);
    vhi0 = _mm512_mask_max_ps(vhi0, tail, vhi0, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  RowParams p = params_from_range(_mm512_reduce_min_ps(_mm512_min_ps(vlo0, vlo1)),
                                  _mm512_reduce_max_ps(_mm512_max_ps(vhi0, vhi1)));
  if (nan != 0 || !std::isfinite(p.scale)) {
    *out = nan_row(k, q);
    return;
  }

  const __m512 vscale = _mm512_set1_ps(p.scale);
  const __m512 vzp = _mm512_set1_ps(p.zero_point);
  const __m512 vzero = _mm512_setzero_ps();
  const __m512 vmax = _mm512_set1_ps(255.0f);
  // The quotient x / scale must round as a true float32 division rounds it (round half to even
  // of the correctly rounded quotient). With r = 1 / scale correctly rounded, x * r lies within
  // |x / scale| * 2^-23 of the true quotient, and |x / scale| <= 255 here because the scale spans
  // the row's range, so round(x * r) equals the reference unless x * r lies within 1.2e-4 of a
  // half-integer. Those lanes, rare in real data, are divided; a vector without them skips the
  // divider, whose throughput bounds this loop otherwise.
  const float reciprocal = 1.0f / p.scale;
  const bool multiply = std::isnormal(reciprocal) && std::isfinite(p.scale);
  const __m512 vreciprocal = _mm512_set1_ps(reciprocal);
  const __m512 half = _mm512_set1_ps(0.5f);
  const __m512 margin = _mm512_set1_ps(1.2e-4f);
  for (i = 0; i < k; i += 16) {
    __mmask16 mask = k - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                 : static_cast<__mmask16>((1u << (k - i)) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i);
    __m512 v;
    if (multiply) {
      const __m512 approx = _mm512_mul_ps(xv, vreciprocal);
      v = _mm512_roundscale_ps(approx, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 from_half = _mm512_abs_ps(_mm512_sub_ps(_mm512_abs_ps(_mm512_sub_ps(approx, v)), half));
      const __mmask16 near_half = _mm512_cmp_ps_mask(from_half, margin, _CMP_NGT_UQ);
      if (near_half != 0) {
        const __m512 exact = _mm512_roundscale_ps(_mm512_div_ps(xv, vscale), _MM_FROUND_TO_NEAREST_INT |
                                                                                  _MM_FROUND_NO_EXC);
        v = _mm512_mask_mov_ps(v, near_half, exact);
      }
    } else {
      v = _mm512_roundscale_ps(_mm512_div_ps(xv, vscale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, vzp), vzero), vmax);
    _mm512_mask_cvtepi32_storeu_epi8(q + i, mask, _mm512_cvtps_epi32(v));
  }
  *out = p;
}

}  // namespace

void quantize_row(const float* x, int64_t k, uint8_t* q, float* scale, int32_t* zero_point, Isa isa) {
  RowParams p;
  if (has_avx512(isa)) {
    quantize_row_avx512(x, k, q, &p);
  } else if (isa == Isa::kAvx2) {
    quantize_row_avx2(x, k, q, &p);
  } else {
    quantize_row_scalar(x, k, q, &p);
  }
  *scale = p.scale;
  *zero_point = static_cast<int32_t>(p.zero_point);
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_row_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "quantize_per_row: expected a 2-D tensor, but got ", x_in.dim(),
              " dimensions");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat,
              "quantize_per_row: expected a float32 tensor, but got ", x_in.scalar_type());
  at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0);
  const int64_t k = x.size(1);
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty({m}, x.options());
  at::Tensor zero_point = at::empty({m}, x.options().dtype(at::kInt));

  const float* x_ptr = x.const_data_ptr<float>();
  uint8_t* q_ptr = q.mutable_data_ptr<uint8_t>();
  float* scale_ptr = scale.mutable_data_ptr<float>();
  int32_t* zp_ptr = zero_point.mutable_data_ptr<int32_t>();
  const Isa isa = active_isa();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));

  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      RowParams p;
      if (has_avx512(isa)) {
        quantize_row_avx512(x_ptr + row * k, k, q_ptr + row * k, &p);
      } else if (isa == Isa::kAvx2) {
        quantize_row_avx2(x_ptr + row * k, k, q_ptr + row * k, &p);
      } else {
        quantize_row_scalar(x_ptr + row * k, k, q_ptr + row * k, &p);
      }
      scale_ptr[row] = p.scale;
      zp_ptr[row] = static_cast<int32_t>(p.zero_point);
    }
  });
  return {q, scale, zero_point};
}

}  // namespace
}  // namespace weightlight

TORCH_LIBRARY_IMPL(weightlight, CPU, m) {
  m.impl("quantize_per_row", &weightlight::quantize_per_row_cpu);
}
