// Activation preparation for the GEMM kernels: flattening, checks and uint8 quantization.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "gemm_common.h"
#include "quantize.h"

namespace weightlight {
namespace {

void quantize_static_scalar(const float* x, int64_t k, float scale, float zp, uint8_t* q) {
  for (int64_t i = 0; i < k; ++i) {
    float v = std::nearbyint(x[i] / scale) + zp;
    q[i] = static_cast<uint8_t>(std::min(std::max(v, 0.0f), 255.0f));
  }
}

__attribute__((target("avx2,fma"))) void quantize_static_avx2(const float* x, int64_t k, float scale,
                                                               float zp, uint8_t* q) {
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 vzp = _mm256_set1_ps(zp);
  const __m256 vzero = _mm256_setzero_ps();
  const __m256 vmax = _mm256_set1_ps(255.0f);
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + i), vscale);
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vzp), vzero), vmax);
    __m256i v32 = _mm256_cvtps_epi32(v);
    __m128i v16 = _mm_packus_epi32(_mm256_castsi256_si128(v32), _mm256_extracti128_si256(v32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packus_epi16(v16, v16));
  }
  quantize_static_scalar(x + i, k - i, scale, zp, q + i);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void quantize_static_avx512(
    const float* x, int64_t k, float scale, float zp, uint8_t* q) {
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 vzp = _mm512_set1_ps(zp);
  const __m512 vzero = _mm512_setzero_ps();
  const __m512 vmax = _mm512_set1_ps(255.0f);
  for (int64_t i = 0; i < k; i += 16) {
    __mmask16 mask = k - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                 : static_cast<__mmask16>((1u << (k - i)) - 1u);
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, x + i), vscale);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, vzp), vzero), vmax);
    _mm512_mask_cvtepi32_storeu_epi8(q + i, mask, _mm512_cvtps_epi32(v));
  }
}

float scalar_value(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.numel() == 1, op, ": expected ", name, " to have one element, but got shape ", t.sizes());
  if (t.device().is_cpu() && t.scalar_type() == at::kFloat) {
    return *t.const_data_ptr<float>();  // item() costs a dispatch, about 1 us
  }
  if (t.device().is_cpu() && t.scalar_type() == at::kInt) {
    return static_cast<float>(*t.const_data_ptr<int32_t>());
  }
  return t.to(at::kFloat).item<float>();
}

}  // namespace

void quantize_row_static(const float* x, int64_t k, float scale, int32_t zero_point, uint8_t* q, Isa isa) {
  const float zp = static_cast<float>(zero_point);
  if (has_avx512(isa)) {
    quantize_static_avx512(x, k, scale, zp, q);
  } else if (isa == Isa::kAvx2) {
    quantize_static_avx2(x, k, scale, zp, q);
  } else {
    quantize_static_scalar(x, k, scale, zp, q);
  }
}

at::Tensor rows_of(const at::Tensor& x, int64_t k, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": expected a float32 input, but got ", x.scalar_type(),
              "; convert it with .float()");
  TORCH_CHECK(x.dim() >= 1, op, ": expected an input with at least 1 dimension, but got a 0-dim tensor");
  TORCH_CHECK(x.size(-1) == k, op, ": expected the last dimension of the input to be ", k,
              " (in_features), but got shape ", x.sizes());
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    m *= x.size(d);
  }
  return x.contiguous().view({m, k});
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

const float* bias_data(const std::optional<at::Tensor>& bias, int64_t n, const char* op) {
  if (!bias.has_value()) {
    return nullptr;
  }
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == n && b.is_contiguous(), op,
              ": expected a contiguous float32 bias of shape (", n, ",), but got ", b.scalar_type(),
              " of shape ", b.sizes());
  return b.const_data_ptr<float>();
}

// Calls with few activations quantize into a buffer of the calling thread, kept from call to
// call: an allocation took about 0.35 us of a 6.6 us call of a 384x384 Int8Linear at M = 1 on
// AMD Zen 4. The buffer is used only until the operator returns, and no operator runs inside
// another on one thread.
namespace {

constexpr int64_t kReusedBytes = 64 * 1024;

uint8_t* reused_buffer() {
  thread_local std::unique_ptr<uint8_t[]> buffer;
  if (!buffer) {
    buffer.reset(new uint8_t[kReusedBytes + 64]);
  }
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.get());
  return buffer.get() + (64 - address % 64) % 64;  // 64-byte aligned, as at::empty's data
}

}  // namespace

QuantizedActivations quantize_activations(const at::Tensor& x, int64_t stride,
                                          const std::optional<at::Tensor>& x_scale,
                                          const std::optional<at::Tensor>& x_zero_point, Isa isa,
                                          const char* op) {
  TORCH_CHECK(x_scale.has_value() == x_zero_point.has_value(), op,
              ": expected x_scale and x_zero_point to be both given (static) or both omitted "
              "(dynamic), but got only one");
  const int64_t m = x.size(0);
  const int64_t k = x.size(1);
  // q, then the scales and zero points, each starting on a 64-byte boundary.
  const int64_t q_bytes = round_up(m * stride, 64);
  const int64_t scale_bytes = round_up(m * 4, 64);
  const int64_t bytes = q_bytes + scale_bytes + m * 4;
  at::Tensor storage;
  uint8_t* q_ptr = nullptr;
  if (bytes <= kReusedBytes) {
    q_ptr = reused_buffer();
  } else {
    storage = at::empty({bytes}, x.options().dtype(at::kByte));
    q_ptr = storage.mutable_data_ptr<uint8_t>();
  }
  float* scale_ptr = reinterpret_cast<float*>(q_ptr + q_bytes);
  int32_t* zp_ptr = reinterpret_cast<int32_t*>(q_ptr + q_bytes + scale_bytes);
  const float* x_ptr = x.const_data_ptr<float>();

  const bool is_static = x_scale.has_value();
  float static_scale = 1.0f;
  int32_t static_zp = 0;
  if (is_static) {
    static_scale = scalar_value(*x_scale, "x_scale", op);
    const float zp = scalar_value(*x_zero_point, "x_zero_point", op);
    TORCH_CHECK(static_scale > 0.0f && std::isfinite(static_scale), op,
                ": expected a positive finite x_scale, but got ", static_scale);
    TORCH_CHECK(zp >= 0.0f && zp <= 255.0f && zp == std::nearbyint(zp), op,
                ": expected an integer x_zero_point in [0, 255], but got ", zp);
    static_zp = static_cast<int32_t>(zp);
  }

  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      uint8_t* q_row = q_ptr + row * stride;
      if (is_static) {
        quantize_row_static(x_ptr + row * k, k, static_scale, static_zp, q_row, isa);
        scale_ptr[row] = static_scale;
        zp_ptr[row] = static_zp;
      } else {
        quantize_row(x_ptr + row * k, k, q_row, scale_ptr + row, zp_ptr + row, isa);
      }
      if (stride > k) {
        std::memset(q_row + k, 0, stride - k);
      }
    }
  });
  return {storage, q_ptr, scale_ptr, zp_ptr};
}

}  // namespace weightlight
