// Sparse int8 GEMM: the int8 numerics of int8_gemm.cpp over a sparse int8 weight.
//
// Format (built in Python by kernels/packing.py): the weight is split into groups of 4
// consecutive inputs of one output row (1x4 blocks, the operand of vpdpbusd), and only the
// groups that contain a nonzero are kept.
//   row_ptr    int32 (N + 1): groups of output row n are row_ptr[n] .. row_ptr[n + 1]
//   group_idx  int16 (ngroups): the group's first input divided by 4, read as unsigned
//   values     int8 (ngroups, 4): inputs past K are zero
//   w_sums     int32 (N,): per-row sums of the int8 weight, for the zero-point correction
//
// With several tokens the uint8 activations are repacked into chunks of `width` tokens,
// (chunks, K_pad / 4, width) words of 4 inputs, and one group multiplies a vector of 16 or
// more tokens (AVX-512) or 8 or 16 (AVX2). With a single token the AVX-512 kernel gathers 16
// groups' inputs at a time on Intel CPUs, and loads 8 by index elsewhere, as the AVX2 kernel does
// (isa.h, use_gathers). With 2 to 8 tokens AVX-512 puts
// two groups of 8 tokens in one vector. AVX2 puts two groups of 4 tokens in one at 2 to 4 tokens.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "gemm_common.h"
#include "isa.h"
#include "sparse_common.h"

namespace weightlight {
namespace {

struct SparseInt8Args {
  const int32_t* row_ptr;
  const uint16_t* group_idx;
  const int32_t* values;  // one word of 4 int8 per group
  const int32_t* xw;      // (chunks, K_pad / 4, width) words; width 1 is the quantized rows
  const uint8_t* q;       // (M, K_pad) uint8
  int64_t k_pad;
  const float* x_scale;
  const int32_t* x_zero_point;
  const int32_t* w_sums;
  const float* w_scale;
  const float* bias;
  float* out;  // (M, N)
  int64_t m;
  int64_t n;
  int64_t groups;
  std::atomic<bool>* index_out_of_range;  // set by the kernels that check indices as they read them
};

inline float dequantize(const SparseInt8Args& a, int32_t acc, int64_t m, int64_t n) {
  const int32_t centered = static_cast<int32_t>(static_cast<uint32_t>(acc) -
                                                static_cast<uint32_t>(a.x_zero_point[m]) *
                                                    static_cast<uint32_t>(a.w_sums[n]));
  float y = static_cast<float>(centered) * (a.x_scale[m] * a.w_scale[n]);
  return a.bias == nullptr ? y : y + a.bias[n];
}

// ---------------------------------------------------------------------------------------------
// Scalar

// The sum of the 4 products of a group's activation bytes and its weight word, modulo 2^32.
inline uint32_t group_dot(const uint8_t* xg, const int32_t* weight_word) {
  const int8_t* wg = reinterpret_cast<const int8_t*>(weight_word);
  uint32_t sum = 0;
  for (int j = 0; j < 4; ++j) {
    sum += static_cast<uint32_t>(static_cast<int32_t>(xg[j]) * static_cast<int32_t>(wg[j]));
  }
  return sum;
}

void row_scalar(const SparseInt8Args& a, int64_t n, int64_t m) {
  uint32_t sum = 0;
  const uint8_t* q_row = a.q + m * a.k_pad;
  for (int32_t b = a.row_ptr[n]; b < a.row_ptr[n + 1]; ++b) {
    sum += group_dot(q_row + static_cast<int64_t>(a.group_idx[b]) * 4, a.values + b);
  }
  a.out[m * a.n + n] = dequantize(a, static_cast<int32_t>(sum), m, n);
}

// ---------------------------------------------------------------------------------------------
// AVX2: the bytes of a word are split into even and odd int16 halves and multiplied with
// vpmaddwd, so that no product saturates.

// Row n's sums for the 8 * V tokens of `chunk`, in acc, modulo 2^32.
template <int V>
__attribute__((target("avx2,fma"))) inline void row_sums_avx2(const SparseInt8Args& a, int64_t n, int64_t chunk,
                                                              __m256i* acc) {
  constexpr int64_t kWidth = 8 * V;
  const __m256i low_bytes = _mm256_set1_epi32(0x00FF00FF);
  const int32_t* x = a.xw + chunk * a.groups * kWidth;
  #pragma GCC unroll 16
  for (int v = 0; v < V; ++v) {
    acc[v] = _mm256_setzero_si256();
  }
  for (int32_t b = a.row_ptr[n]; b < a.row_ptr[n + 1]; ++b) {
    const __m256i w = _mm256_set1_epi32(a.values[b]);
    const __m256i w_even = _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8);
    const __m256i w_odd = _mm256_srai_epi16(w, 8);
    const int32_t* x_row = x + static_cast<int64_t>(a.group_idx[b]) * kWidth;
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_row + 8 * v));
      const __m256i x_even = _mm256_and_si256(xv, low_bytes);
      const __m256i x_odd = _mm256_srli_epi16(xv, 8);
      acc[v] = _mm256_add_epi32(acc[v], _mm256_add_epi32(_mm256_madd_epi16(x_even, w_even),
                                                         _mm256_madd_epi16(x_odd, w_odd)));
    }
  }
}

template <int V>
__attribute__((target("avx2,fma"))) void row_avx2(const SparseInt8Args& a, int64_t n, int64_t chunk) {
  constexpr int64_t kWidth = 8 * V;
  __m256i acc[V];
  row_sums_avx2<V>(a, n, chunk, acc);
  const int64_t m0 = chunk * kWidth;
  alignas(32) int32_t lanes[8];
  #pragma GCC unroll 16
  for (int v = 0; v < V; ++v) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[v]);
    const int64_t count = std::min<int64_t>(8, a.m - m0 - 8 * v);
    for (int64_t l = 0; l < count; ++l) {
      const int64_t m = m0 + 8 * v + l;
      a.out[m * a.n + n] = dequantize(a, lanes[l], m, n);
    }
  }
}

// Sums of the 4 byte products of each 32-bit lane of x (uint8) and w (int8), exact.
__attribute__((target("avx2"))) inline __m256i dot_words_avx2(__m256i x, __m256i w) {
  const __m256i x_even = _mm256_and_si256(x, _mm256_set1_epi32(0x00FF00FF));
  const __m256i x_odd = _mm256_srli_epi16(x, 8);
  const __m256i w_even = _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8);
  const __m256i w_odd = _mm256_srai_epi16(w, 8);
  return _mm256_add_epi32(_mm256_madd_epi16(x_even, w_even), _mm256_madd_epi16(x_odd, w_odd));
}

__attribute__((target("avx2"))) inline __m256i eight_words(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// The activation words of the four groups whose 16-bit indices are packed in w, lowest first.
__attribute__((target("avx2"))) inline __m128i four_words(const int32_t* x, uint64_t w) {
  return _mm_set_epi32(x[w >> 48], x[(w >> 32) & 0xFFFF], x[(w >> 16) & 0xFFFF], x[w & 0xFFFF]);
}

// The activation words of four groups whose 16-bit indices start at idx.
__attribute__((target("avx2"))) inline __m128i four_words(const int32_t* x, const uint16_t* idx) {
  uint64_t w;
  std::memcpy(&w, idx, 8);
  return four_words(x, w);
}

// Return a vector whose lane j is the sum of the 8 lanes of v[j], modulo 2^32.
__attribute__((target("avx2"))) inline __m256i sum_lanes8_avx2(const __m256i* v) {
  const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  // u0 has the sums of lanes 0-3 of v[0..3] in its low half and of lanes 4-7 in its high half.
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

// Dequantize and store the sums of rows n .. n + rows - 1, where v[t] contains token t's sums for
// each of the a.m tokens. The operations are those of dequantize(), so the results are the same
// bits. A full batch of 8 rows takes unmasked loads and stores.
__attribute__((target("avx2"))) inline void store_token_rows(const SparseInt8Args& a, const __m256* v, int64_t n,
                                                             int64_t rows) {
  const bool full = rows == 8;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i in_batch = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(rows)), lane);
  const __m256i w_sums = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.w_sums + n))
                              : _mm256_maskload_epi32(a.w_sums + n, in_batch);
  const __m256 w_scale = full ? _mm256_loadu_ps(a.w_scale + n) : _mm256_maskload_ps(a.w_scale + n, in_batch);
  __m256 bias = _mm256_setzero_ps();
  if (a.bias != nullptr) {
    bias = full ? _mm256_loadu_ps(a.bias + n) : _mm256_maskload_ps(a.bias + n, in_batch);
  }
  for (int64_t t = 0; t < a.m; ++t) {
    const __m256i zp_sums = _mm256_mullo_epi32(_mm256_set1_epi32(a.x_zero_point[t]), w_sums);
    const __m256i centered = _mm256_sub_epi32(_mm256_castps_si256(v[t]), zp_sums);
    __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(centered), _mm256_mul_ps(_mm256_set1_ps(a.x_scale[t]), w_scale));
    if (a.bias != nullptr) {
      y = _mm256_add_ps(y, bias);
    }
    if (full) {
      _mm256_storeu_ps(a.out + t * a.n + n, y);
    } else {
      _mm256_maskstore_ps(a.out + t * a.n + n, in_batch, y);
    }
  }
}

// The activation words of the last 1 to 7 groups of a row, from position i of count: lanes past
// the row repeat the row's last group.
__attribute__((target("avx2"))) inline __m256i last_words(const int32_t* x, const uint16_t* idx, int64_t i,
                                                          int64_t count) {
  const int64_t last = count - 1;
  return _mm256_setr_epi32(x[idx[i]], x[idx[std::min(i + 1, last)]], x[idx[std::min(i + 2, last)]],
                           x[idx[std::min(i + 3, last)]], x[idx[std::min(i + 4, last)]],
                           x[idx[std::min(i + 5, last)]], x[idx[std::min(i + 6, last)]],
                           x[idx[std::min(i + 7, last)]]);
}

// One token on AVX2, row n's products in 8 lanes whose sum modulo 2^32 is the row's sum: vectors
// of 8 activation words built from scalar loads and multiplied with 8 weight words. The last 1 to
// 7 groups take one step whose lanes past the row have a zero weight. The caller checks the
// indices.
__attribute__((target("avx2"))) inline __m256i row_lanes_avx2(const SparseInt8Args& a, int64_t n) {
  const int32_t begin = a.row_ptr[n];
  const int64_t count = a.row_ptr[n + 1] - begin;
  const uint16_t* idx = a.group_idx + begin;
  const int32_t* vals = a.values + begin;
  const int32_t* x = a.xw;
  __m256i acc0 = _mm256_setzero_si256();
  __m256i acc1 = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m256i x0 = _mm256_set_m128i(four_words(x, idx + i + 4), four_words(x, idx + i));
    const __m256i x1 = _mm256_set_m128i(four_words(x, idx + i + 12), four_words(x, idx + i + 8));
    acc0 = _mm256_add_epi32(acc0, dot_words_avx2(x0, eight_words(vals + i)));
    acc1 = _mm256_add_epi32(acc1, dot_words_avx2(x1, eight_words(vals + i + 8)));
  }
  if (i + 8 <= count) {
    const __m256i x0 = _mm256_set_m128i(four_words(x, idx + i + 4), four_words(x, idx + i));
    acc0 = _mm256_add_epi32(acc0, dot_words_avx2(x0, eight_words(vals + i)));
    i += 8;
  }
  if (i < count) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i in_row = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count - i)), lane);
    const __m256i weights = _mm256_maskload_epi32(vals + i, in_row);
    acc1 = _mm256_add_epi32(acc1, dot_words_avx2(last_words(x, idx, i, count), weights));
  }
  return _mm256_add_epi32(acc0, acc1);
}

// One token on AVX2, output rows [n0, n1), 16 at a time: the 16 rows' indices are checked
// (kIndicesCheckedAtOnce), then the lanes of 8 rows are summed and dequantized together.
__attribute__((target("avx2"))) void single_rows_avx2(const SparseInt8Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 16) {
    const int64_t rows = std::min<int64_t>(16, n1 - n);
    const bool each_row = check_each_row(a.row_ptr, n, rows);
    if (!each_row && !rows_checked(a.row_ptr, a.group_idx, n, rows, a.groups, a.index_out_of_range)) {
      return;
    }
    for (int64_t half = 0; half < rows; half += 8) {
      __m256i lanes[8];
      #pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const int64_t row = n + half + j;
        if (half + j >= rows) {
          lanes[j] = _mm256_setzero_si256();
        } else if (each_row && !rows_checked(a.row_ptr, a.group_idx, row, 1, a.groups, a.index_out_of_range)) {
          return;
        } else {
          lanes[j] = row_lanes_avx2(a, row);
        }
      }
      const __m256 sums = _mm256_castsi256_ps(sum_lanes8_avx2(lanes));
      store_token_rows(a, &sums, n + half, std::min<int64_t>(8, rows - half));
    }
  }
}

// The products of groups b (lanes 0-3) and b + 1 (lanes 4-7) with their 4 token words.
__attribute__((target("avx2"))) inline __m256i pair_dot_avx2(const int32_t* x, const uint16_t* idx,
                                                             const int32_t* vals, int32_t b) {
  const __m256i xv = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(x + idx[b + 1] * 4),
                                         reinterpret_cast<const __m128i*>(x + idx[b] * 4));
  const __m128i two = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vals + b));
  const __m256i halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  return dot_words_avx2(xv, _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(two), halves));
}

// 2 to 4 tokens on AVX2, in one chunk of 4, row n's sums for the 4 token lanes: one vector
// carries the 4 token words of two groups. The caller checks the indices.
__attribute__((target("avx2"))) inline __m128i pair_row_sums_avx2(const SparseInt8Args& a, int64_t n) {
  const int32_t end = a.row_ptr[n + 1];
  const uint16_t* idx = a.group_idx;
  const int32_t* vals = a.values;
  const int32_t* x = a.xw;
  __m256i acc0 = _mm256_setzero_si256();
  __m256i acc1 = _mm256_setzero_si256();
  int32_t b = a.row_ptr[n];
  for (; b + 4 <= end; b += 4) {
    acc0 = _mm256_add_epi32(acc0, pair_dot_avx2(x, idx, vals, b));
    acc1 = _mm256_add_epi32(acc1, pair_dot_avx2(x, idx, vals, b + 2));
  }
  for (; b + 2 <= end; b += 2) {
    acc0 = _mm256_add_epi32(acc0, pair_dot_avx2(x, idx, vals, b));
  }
  const __m256i sum = _mm256_add_epi32(acc0, acc1);
  __m128i tokens = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  if (b < end) {
    // The low half of the product vector: the words of group b for the 4 tokens.
    const __m128i words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + idx[b] * 4));
    const __m256i last = dot_words_avx2(_mm256_castsi128_si256(words), _mm256_set1_epi32(vals[b]));
    tokens = _mm_add_epi32(tokens, _mm256_castsi256_si128(last));
  }
  return tokens;
}

// 2 to 4 (kTokens = 4) or 5 to 8 (kTokens = 8) tokens on AVX2, output rows [n0, n1), 8 at a time:
// the rows' indices are checked (kIndicesCheckedAtOnce), their token sums are transposed, and
// each token's 8 outputs are dequantized and stored as one vector. The dequantization uses the
// operations of dequantize(), so the results are the same bits.
template <int kTokens>
__attribute__((target("avx2,fma"))) void few_rows_avx2(const SparseInt8Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t rows = std::min<int64_t>(8, n1 - n);
    const bool each_row = check_each_row(a.row_ptr, n, rows);
    if (!each_row && !rows_checked(a.row_ptr, a.group_idx, n, rows, a.groups, a.index_out_of_range)) {
      return;
    }
    __m256 v[8];
    #pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if (j >= rows) {
        v[j] = _mm256_setzero_ps();
      } else if (each_row && !rows_checked(a.row_ptr, a.group_idx, n + j, 1, a.groups, a.index_out_of_range)) {
        return;
      } else if constexpr (kTokens == 4) {
        v[j] = _mm256_castsi256_ps(_mm256_set_m128i(_mm_setzero_si128(), pair_row_sums_avx2(a, n + j)));
      } else {
        __m256i acc[1];
        row_sums_avx2<1>(a, n + j, 0, acc);
        v[j] = _mm256_castsi256_ps(acc[0]);
      }
    }
    transpose8(v);
    store_token_rows(a, v, n, rows);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI

__attribute__((target("avx512f"))) inline __mmask16 tail_mask(int64_t lanes) {
  return lanes >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : lanes <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << lanes) - 1u);
}

// Several tokens: two sets of V accumulators take the groups in turn, to hide the latency.
template <int V>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void row_avx512(const SparseInt8Args& a, int64_t n,
                                                                                int64_t chunk) {
  constexpr int64_t kWidth = 16 * V;
  const int32_t begin = a.row_ptr[n];
  const int32_t end = a.row_ptr[n + 1];
  const int32_t* x = a.xw + chunk * a.groups * kWidth;
  __m512i acc0[V];
  __m512i acc1[V];
  #pragma GCC unroll 16
  for (int v = 0; v < V; ++v) {
    acc0[v] = _mm512_setzero_si512();
    acc1[v] = _mm512_setzero_si512();
  }
  int32_t b = begin;
  for (; b + 2 <= end; b += 2) {
    const __m512i w0 = _mm512_set1_epi32(a.values[b]);
    const __m512i w1 = _mm512_set1_epi32(a.values[b + 1]);
    const int32_t* x0 = x + static_cast<int64_t>(a.group_idx[b]) * kWidth;
    const int32_t* x1 = x + static_cast<int64_t>(a.group_idx[b + 1]) * kWidth;
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      acc0[v] = _mm512_dpbusd_epi32(acc0[v], _mm512_loadu_si512(x0 + 16 * v), w0);
      acc1[v] = _mm512_dpbusd_epi32(acc1[v], _mm512_loadu_si512(x1 + 16 * v), w1);
    }
  }
  if (b < end) {
    const __m512i w0 = _mm512_set1_epi32(a.values[b]);
    const int32_t* x0 = x + static_cast<int64_t>(a.group_idx[b]) * kWidth;
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      acc0[v] = _mm512_dpbusd_epi32(acc0[v], _mm512_loadu_si512(x0 + 16 * v), w0);
    }
  }
  const __m512 w_scale = _mm512_set1_ps(a.w_scale[n]);
  const __m512i w_sum = _mm512_set1_epi32(a.w_sums[n]);
  const __m512 bias = _mm512_set1_ps(a.bias == nullptr ? 0.0f : a.bias[n]);
  #pragma GCC unroll 16
  for (int v = 0; v < V; ++v) {
    const int64_t m = chunk * kWidth + 16 * v;
    const __mmask16 mask = tail_mask(a.m - m);
    const __m512i zp = _mm512_maskz_loadu_epi32(mask, a.x_zero_point + m);
    const __m512 xs = _mm512_maskz_loadu_ps(mask, a.x_scale + m);
    __m512i centered = _mm512_sub_epi32(_mm512_add_epi32(acc0[v], acc1[v]), _mm512_mullo_epi32(zp, w_sum));
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(centered), _mm512_mul_ps(xs, w_scale));
    store_lanes_strided(_mm512_add_ps(y, bias), a.out + m * a.n + n, a.n, a.m - m);
  }
}

// One token where gathers are fast (use_gathers()), row n's products in 8 lanes whose sum modulo
// 2^32 is the row's sum: gather the activation words of 16 groups and multiply them with 16
// weight words. Each gather reads only the lanes whose group index is below the group count, and
// the lanes of an index out of range are added to out_of_range.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline __m256i row_lanes_gather_avx512(
    const SparseInt8Args& a, int64_t n, __mmask16& out_of_range) {
  const int32_t begin = a.row_ptr[n];
  const int64_t count = a.row_ptr[n + 1] - begin;
  const uint16_t* idx = a.group_idx + begin;
  const int32_t* vals = a.values + begin;
  const __m512i limit = _mm512_set1_epi32(static_cast<int32_t>(a.groups));
  const __m512i zero = _mm512_setzero_si512();
  __m512i acc0 = zero;
  __m512i acc1 = zero;
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    const __m512i g0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + i)));
    const __m512i g1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + i + 16)));
    const __mmask16 in0 = _mm512_cmplt_epu32_mask(g0, limit);
    const __mmask16 in1 = _mm512_cmplt_epu32_mask(g1, limit);
    out_of_range |= static_cast<__mmask16>(~(in0 & in1));
    acc0 = _mm512_dpbusd_epi32(acc0, _mm512_mask_i32gather_epi32(zero, in0, g0, a.xw, 4),
                               _mm512_loadu_si512(vals + i));
    acc1 = _mm512_dpbusd_epi32(acc1, _mm512_mask_i32gather_epi32(zero, in1, g1, a.xw, 4),
                               _mm512_loadu_si512(vals + i + 16));
  }
  for (; i < count; i += 16) {
    const __mmask16 mask = tail_mask(count - i);
    const __m512i g = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, idx + i));
    const __mmask16 in = _mm512_mask_cmplt_epu32_mask(mask, g, limit);
    out_of_range |= static_cast<__mmask16>(mask & ~in);
    const __m512i xv = _mm512_mask_i32gather_epi32(zero, in, g, a.xw, 4);
    acc0 = _mm512_dpbusd_epi32(acc0, xv, _mm512_maskz_loadu_epi32(mask, vals + i));
  }
  const __m512i sum = _mm512_add_epi32(acc0, acc1);
  return _mm256_add_epi32(_mm512_castsi512_si256(sum), _mm512_extracti64x4_epi64(sum, 1));
}

// One token where gathers are slow (use_gathers() is false), row n's products in 8 lanes as
// above: vectors of 8 activation words built from scalar loads, as on AVX2, multiplied with
// vpdpbusd. The last 1 to 15 groups take at most one full step of 8 and one last step, whose
// lanes past the row repeat the row's last group with a zero weight. The caller checks the
// indices.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline __m256i row_lanes_loads_avx512(
    const SparseInt8Args& a, int64_t n) {
  const int32_t begin = a.row_ptr[n];
  const int64_t count = a.row_ptr[n + 1] - begin;
  const uint16_t* idx = a.group_idx + begin;
  const int32_t* vals = a.values + begin;
  const int32_t* x = a.xw;
  __m256i acc0 = _mm256_setzero_si256();
  __m256i acc1 = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m256i x0 = _mm256_set_m128i(four_words(x, idx + i + 4), four_words(x, idx + i));
    const __m256i x1 = _mm256_set_m128i(four_words(x, idx + i + 12), four_words(x, idx + i + 8));
    acc0 = _mm256_dpbusd_epi32(acc0, x0, eight_words(vals + i));
    acc1 = _mm256_dpbusd_epi32(acc1, x1, eight_words(vals + i + 8));
  }
  if (i + 8 <= count) {
    const __m256i x0 = _mm256_set_m128i(four_words(x, idx + i + 4), four_words(x, idx + i));
    acc0 = _mm256_dpbusd_epi32(acc0, x0, eight_words(vals + i));
    i += 8;
  }
  if (i < count) {
    const __mmask8 lanes = static_cast<__mmask8>(tail_mask(count - i));
    acc1 = _mm256_dpbusd_epi32(acc1, last_words(x, idx, i, count), _mm256_maskz_loadu_epi32(lanes, vals + i));
  }
  return _mm256_add_epi32(acc0, acc1);
}

// One token on AVX-512, output rows [n0, n1), 16 at a time: the lanes of 8 rows are summed and
// dequantized together. With gathers the reads are masked by the index range. Otherwise the 16
// rows' indices are checked first (kIndicesCheckedAtOnce).
template <bool kGathers>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void single_rows_avx512(const SparseInt8Args& a,
                                                                                        int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 16) {
    const int64_t rows = std::min<int64_t>(16, n1 - n);
    const bool each_row = !kGathers && check_each_row(a.row_ptr, n, rows);
    if (!kGathers && !each_row &&
        !rows_checked_avx512(a.row_ptr, a.group_idx, n, rows, a.groups, a.index_out_of_range)) {
      return;
    }
    __mmask16 out_of_range = 0;
    for (int64_t half = 0; half < rows; half += 8) {
      __m256i lanes[8];
      #pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const int64_t row = n + half + j;
        if (half + j >= rows) {
          lanes[j] = _mm256_setzero_si256();
        } else if constexpr (kGathers) {
          lanes[j] = row_lanes_gather_avx512(a, row, out_of_range);
        } else if (each_row && !rows_checked_avx512(a.row_ptr, a.group_idx, row, 1, a.groups, a.index_out_of_range)) {
          return;
        } else {
          lanes[j] = row_lanes_loads_avx512(a, row);
        }
      }
      if (out_of_range != 0) {
        a.index_out_of_range->store(true, std::memory_order_relaxed);
        return;
      }
      const __m256 sums = _mm256_castsi256_ps(sum_lanes8_avx2(lanes));
      store_token_rows(a, &sums, n + half, std::min<int64_t>(8, rows - half));
    }
  }
}

// Write the words of q (M, K_pad) into xw (chunks, K_pad / 4, width): token t is lane t % width
// of chunk t / width. Lanes past M are zero.
void pack_words(const uint8_t* q, int64_t m, int64_t k_pad, int64_t width, int32_t* xw) {
  constexpr int64_t kTile = 64;
  const int64_t groups = k_pad / 4;
  const int64_t chunks = (m + width - 1) / width;
  const int64_t group_tiles = (groups + kTile - 1) / kTile;
  at::parallel_for(0, chunks * group_tiles, std::max<int64_t>(1, 4096 / (kTile * width)), [&](int64_t begin,
                                                                                               int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / group_tiles;
      const int64_t g0 = (task % group_tiles) * kTile;
      const int64_t g1 = std::min(groups, g0 + kTile);
      int32_t* dst = xw + chunk * groups * width;
      for (int64_t lane = 0; lane < width; ++lane) {
        const int64_t token = chunk * width + lane;
        for (int64_t g = g0; g < g1; ++g) {
          int32_t word = 0;
          if (token < m) {
            std::memcpy(&word, q + token * k_pad + 4 * g, 4);
          }
          dst[g * width + lane] = word;
        }
      }
    }
  });
}

// acc plus the products of groups b and b + 1 with their 8 token lanes (lanes 0-7 and 8-15).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline __m512i pair_group_product(
    const int32_t* x, const uint16_t* idx, const int32_t* vals, int32_t b, __m512i acc) {
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i xv = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + idx[b] * 8))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + idx[b + 1] * 8)), 1);
  const __m128i two_words = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vals + b));
  const __m512i wv = _mm512_permutexvar_epi32(halves, _mm512_castsi128_si512(two_words));
  return _mm512_dpbusd_epi32(acc, xv, wv);
}

// 2 to 8 tokens, in one chunk of 8, row n's sums for the 8 token lanes: one vector contains the
// token lanes of two groups, so no lane is padding at M = 8, as in the fp32 kernel for the same
// batches.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline __m256i pair_row_tokens_avx512(
    const SparseInt8Args& a, int64_t n) {
  const int32_t end = a.row_ptr[n + 1];
  const int32_t* x = a.xw;
  const uint16_t* idx = a.group_idx;
  const int32_t* vals = a.values;
  __m512i acc0 = _mm512_setzero_si512();
  __m512i acc1 = _mm512_setzero_si512();
  __m512i acc2 = _mm512_setzero_si512();
  __m512i acc3 = _mm512_setzero_si512();
  int32_t b = a.row_ptr[n];
  for (; b + 8 <= end; b += 8) {
    acc0 = pair_group_product(x, idx, vals, b, acc0);
    acc1 = pair_group_product(x, idx, vals, b + 2, acc1);
    acc2 = pair_group_product(x, idx, vals, b + 4, acc2);
    acc3 = pair_group_product(x, idx, vals, b + 6, acc3);
  }
  for (; b + 2 <= end; b += 2) {
    acc0 = pair_group_product(x, idx, vals, b, acc0);
  }
  const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(acc0, acc1), _mm512_add_epi32(acc2, acc3));
  __m256i tokens = _mm256_add_epi32(_mm512_castsi512_si256(sum), _mm512_extracti64x4_epi64(sum, 1));
  if (b < end) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + idx[b] * 8));
    tokens = _mm256_dpbusd_epi32(tokens, xv, _mm256_set1_epi32(vals[b]));
  }
  return tokens;
}

// The pair kernel's output rows [n0, n1), 8 at a time: the rows' token sums are transposed, and
// each token's 8 outputs are dequantized and stored as one vector. The dequantization uses the
// operations of dequantize(), so the results are the same bits.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void pair_rows_avx512(const SparseInt8Args& a,
                                                                                      int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t rows = std::min<int64_t>(8, n1 - n);
    __m256 v[8];
    #pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      v[j] = j < rows ? _mm256_castsi256_ps(pair_row_tokens_avx512(a, n + j)) : _mm256_setzero_ps();
    }
    transpose8(v);
    store_token_rows(a, v, n, rows);
  }
}

at::Tensor sparse_int8_linear_cpu(const at::Tensor& x_in, const at::Tensor& row_ptr, const at::Tensor& group_idx,
                                  const at::Tensor& values, const at::Tensor& w_sums, const at::Tensor& w_scale,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& x_scale,
                                  const std::optional<at::Tensor>& x_zero_point) {
  const char* op = "sparse_int8_linear";
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 && w_scale.is_contiguous(), op,
              ": expected w_scale to be a contiguous float32 vector, but got ", w_scale.scalar_type(), " of shape ",
              w_scale.sizes());
  const int64_t n = w_scale.size(0);
  TORCH_CHECK(w_sums.scalar_type() == at::kInt && w_sums.dim() == 1 && w_sums.size(0) == n &&
                  w_sums.is_contiguous(),
              op, ": expected w_sums to be a contiguous int32 vector of ", n, " elements, but got ",
              w_sums.scalar_type(), " of shape ", w_sums.sizes());
  TORCH_CHECK(values.scalar_type() == at::kChar && values.dim() == 2 && values.size(1) == 4 &&
                  values.is_contiguous() && values.size(0) == group_idx.size(0),
              op, ": expected values to be a contiguous int8 tensor of shape (", group_idx.size(0),
              ", 4), one row per group index, but got ", values.scalar_type(), " of shape ", values.sizes());
  TORCH_CHECK(x_in.dim() >= 1, op, ": expected an input with at least 1 dimension, but got a 0-dim tensor");
  const int64_t k = x_in.size(-1);
  const int64_t groups = (k + 3) / 4;
  const at::Tensor x = rows_of(x_in, k, op);
  const int64_t m = x.size(0);
  const int64_t k_pad = groups * 4;
  const Isa isa = active_isa();

  void (*kernel)(const SparseInt8Args&, int64_t, int64_t) = row_scalar;
  // The vector kernels for 1 to 8 tokens take a range of output rows.
  void (*rows_kernel)(const SparseInt8Args&, int64_t, int64_t) = nullptr;
  int64_t width = 1;  // the scalar kernel and the single-token kernel read the rows of q
  if (has_avx512(isa)) {
    if (m == 1) {
      rows_kernel = use_gathers() ? single_rows_avx512<true> : single_rows_avx512<false>;
    } else if (m <= 8) {
      rows_kernel = pair_rows_avx512;
      width = 8;
    } else if (m <= 16) {
      kernel = row_avx512<1>;
      width = 16;
    } else {
      kernel = row_avx512<2>;
      width = 32;
    }
  } else if (isa == Isa::kAvx2) {
    if (m == 1) {
      rows_kernel = single_rows_avx2;
    } else if (m <= 4) {
      rows_kernel = few_rows_avx2<4>;
      width = 4;
    } else if (m <= 8) {
      rows_kernel = few_rows_avx2<8>;
      width = 8;
    } else {
      kernel = row_avx2<2>;
      width = 16;
    }
  }
  // The kernels for one token, and the AVX2 kernels for 2 to 8, check the group indices themselves.
  const bool kernel_checks_indices = rows_kernel != nullptr && rows_kernel != pair_rows_avx512;
  check_block_rows(row_ptr, group_idx, n, groups, op, !(kernel_checks_indices && m > 0), "group_idx");
  const float* bias_ptr = bias_data(bias, n, op);

  const QuantizedActivations qa = quantize_activations(x, k_pad, x_scale, x_zero_point, isa, op);
  const uint8_t* q_ptr = qa.q;

  const int64_t chunks = (m + width - 1) / width;
  at::Tensor xw;
  const int32_t* xw_ptr = reinterpret_cast<const int32_t*>(q_ptr);
  if (width > 1) {
    xw = at::empty({chunks, groups, width}, x.options().dtype(at::kInt));
    pack_words(q_ptr, m, k_pad, width, xw.mutable_data_ptr<int32_t>());
    xw_ptr = xw.const_data_ptr<int32_t>();
  }
  at::Tensor out = at::empty({m, n}, x.options());

  std::atomic<bool> index_out_of_range{false};
  const SparseInt8Args args{row_ptr.const_data_ptr<int32_t>(),
                            reinterpret_cast<const uint16_t*>(group_idx.const_data_ptr<int16_t>()),
                            reinterpret_cast<const int32_t*>(values.const_data_ptr<int8_t>()),
                            xw_ptr,
                            q_ptr,
                            k_pad,
                            qa.scale,
                            qa.zero_point,
                            w_sums.const_data_ptr<int32_t>(),
                            w_scale.const_data_ptr<float>(),
                            bias_ptr,
                            out.mutable_data_ptr<float>(),
                            m,
                            n,
                            groups,
                            &index_out_of_range};
  // Tasks run chunk by chunk, so that one activation chunk serves every output row from cache.
  const int64_t groups_per_row = std::max<int64_t>(1, values.size(0) / std::max<int64_t>(n, 1));
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / (groups_per_row * 4 * width));
  at::parallel_for(0, chunks * n, grain, [&](int64_t begin, int64_t end) {
    if (rows_kernel != nullptr) {
      rows_kernel(args, begin, end);  // one chunk (M <= 8): task t is output row t
      return;
    }
    // Task t is output row t % n of chunk t / n, stepped without divisions.
    int64_t chunk = begin / n;
    int64_t row = begin - chunk * n;
    for (int64_t task = begin; task < end; ++task) {
      kernel(args, row, chunk);
      if (++row == n) {
        row = 0;
        ++chunk;
      }
    }
  });
  if (index_out_of_range.load()) {
    raise_index_out_of_range(group_idx, groups, op, "group_idx");
  }
  return out.view(output_shape(x_in, n));
}

}  // namespace
}  // namespace weightlight

TORCH_LIBRARY_IMPL(weightlight, CPU, m) {
  m.impl("sparse_int8_linear", &weightlight::sparse_int8_linear_cpu);
}
