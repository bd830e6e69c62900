// Checks of the block-compressed sparse row (BSR) weight format shared by the sparse kernels.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include <ATen/core/Tensor.h>

namespace weightlight {

// Check row_ptr (int32, block_rows + 1, non-decreasing from 0 to nblocks) and col_idx (int16
// containing unsigned block column indices, each below block_cols_total). A kernel that masks its
// reads by the index range and reports an index out of range itself passes check_indices = false,
// which skips the scan of col_idx (a read of 2 bytes per block on every call). `index_name` names
// the index tensor in the error messages.
void check_block_rows(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t block_rows,
                      int64_t block_cols_total, const char* op, bool check_indices = true,
                      const char* index_name = "col_idx");

// Raise the error of an index at or above block_cols_total, naming the largest index. The kernels
// that found such an index while reading call it. It scans col_idx again, so only on that error.
[[noreturn]] void raise_index_out_of_range(const at::Tensor& col_idx, int64_t block_cols_total, const char* op,
                                           const char* index_name = "col_idx");

// Return whether every index of idx[0, count) is below limit, reading 16 indices per step.
__attribute__((target("avx2"))) inline bool indices_below_avx2(const uint16_t* idx, int64_t count, int64_t limit) {
  if (limit > 65535 || count == 0) {
    return true;
  }
  __m256i largest = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    largest = _mm256_max_epu16(largest, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + i)));
  }
  const __m128i half = _mm_max_epu16(_mm256_castsi256_si128(largest), _mm256_extracti128_si256(largest, 1));
  // The largest of 8 unsigned words: minpos finds the smallest of their complements.
  const __m128i smallest = _mm_minpos_epu16(_mm_xor_si128(half, _mm_set1_epi32(-1)));
  uint32_t top = 0xFFFFu - (static_cast<uint32_t>(_mm_cvtsi128_si32(smallest)) & 0xFFFFu);
  for (; i < count; ++i) {
    top = std::max<uint32_t>(top, idx[i]);
  }
  return top < limit;
}

// Return whether every index of idx[begin, end) is below limit, with AVX-512, 32 indices per step.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline bool indices_below_avx512(const uint16_t* idx,
                                                                                      int32_t begin, int32_t end,
                                                                                      int64_t limit) {
  if (limit > 65535 || begin == end) {
    return true;  // an empty row, or a limit above every 16-bit index
  }
  if (limit <= 0) {
    return false;
  }
  __m512i largest = _mm512_setzero_si512();
  int32_t i = begin;
  for (; i + 32 <= end; i += 32) {
    largest = _mm512_max_epu16(largest, _mm512_loadu_si512(idx + i));
  }
  if (i < end) {
    const __mmask32 tail = static_cast<__mmask32>((1ull << (end - i)) - 1u);
    largest = _mm512_max_epu16(largest, _mm512_maskz_loadu_epi16(tail, idx + i));
  }
  const __m512i bound = _mm512_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(limit)));
  return _mm512_cmpge_epu16_mask(largest, bound) == 0;
}

// The kernels that take a batch of rows check its indices in one pass when the batch has at most
// this many, and otherwise row by row just before each row is read, while its indices are in
// L1. One pass over 8 rows of 2048 indices made SparseLinear at (4096, 4096) with 50% sparsity
// 18% slower on AMD Zen 4.
constexpr int64_t kIndicesCheckedAtOnce = 8192;

// Return whether the batch of rows [n, n + rows) is checked row by row (kIndicesCheckedAtOnce).
inline bool check_each_row(const int32_t* row_ptr, int64_t n, int64_t rows) {
  return row_ptr[n + rows] - row_ptr[n] > kIndicesCheckedAtOnce;
}

// Return whether every index of the rows [n, n + rows), idx[row_ptr[n] .. row_ptr[n + rows]), is
// below limit. Otherwise set *out_of_range and return false.
__attribute__((target("avx2"))) inline bool rows_checked(const int32_t* row_ptr, const uint16_t* idx, int64_t n,
                                                         int64_t rows, int64_t limit,
                                                         std::atomic<bool>* out_of_range) {
  if (indices_below_avx2(idx + row_ptr[n], row_ptr[n + rows] - row_ptr[n], limit)) {
    return true;
  }
  out_of_range->store(true, std::memory_order_relaxed);
  return false;
}

// The same with indices_below_avx512.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline bool rows_checked_avx512(
    const int32_t* row_ptr, const uint16_t* idx, int64_t n, int64_t rows, int64_t limit,
    std::atomic<bool>* out_of_range) {
  if (indices_below_avx512(idx, row_ptr[n], row_ptr[n + rows], limit)) {
    return true;
  }
  out_of_range->store(true, std::memory_order_relaxed);
  return false;
}

// Transpose the 8 x 8 floats of v in place: lane i of v[j] moves to lane j of v[i].
__attribute__((target("avx2"))) inline void transpose8(__m256* v) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Store the first `count` lanes of v (at most 8) to out[0], out[stride], out[2 * stride], ...
// On AMD Zen 4, one scalar store per lane made the AVX-512 kernels for 2 to 128 tokens 3-10%
// faster than vscatterdps.
__attribute__((target("avx"))) inline void store_lanes_strided(__m256 v, float* out, int64_t stride, int64_t count) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  for (int64_t t = 0; t < count && t < 8; ++t) {
    out[t * stride] = lanes[t];
  }
}

// The same for the 16 lanes of an AVX-512 vector.
__attribute__((target("avx512f"))) inline void store_lanes_strided(__m512 v, float* out, int64_t stride,
                                                                    int64_t count) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  for (int64_t t = 0; t < count && t < 16; ++t) {
    out[t * stride] = lanes[t];
  }
}

}  // namespace weightlight
