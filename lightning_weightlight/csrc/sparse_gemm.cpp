// Sparse fp32 GEMM: y = x @ W.T + bias with W (N, K) in block-compressed sparse rows.
//
// Format (built in Python by kernels/packing.py): blocks of R output rows by C input columns,
// R x C in {1x1, 1x4, 4x1, 8x1, 16x16}.
//   row_ptr  int32 (ceil(N / R) + 1): blocks of block row i are row_ptr[i] .. row_ptr[i + 1]
//   col_idx  int16 (nblocks): the block's first input column divided by C, read as unsigned
//   values   float32 (nblocks, C, R): column-major inside a block, so R outputs share one input
// Rows past N and inputs past K inside a block are zero.
//
// The activations are repacked into chunks of `width` tokens, (chunks, K_pad, width), so that
// one block entry multiplies a vector of 16 or 32 tokens (AVX-512) or 8 or 16 (AVX2), and one
// chunk (K_pad * width floats) stays in cache while every block row passes over it. With a
// single token the kernels read inputs by index instead (width 1): AVX-512 with gathers on Intel
// CPUs, and with the AVX2 kernels' scalar loads elsewhere (isa.h, use_gathers). For unstructured
// weights at 2 to 8 tokens the AVX-512 kernel uses one chunk of 8 tokens and puts two nonzeros in
// a vector. AVX2 does the same with chunks of 4 tokens at 2 to 4 tokens. At 5 to 8 it uses one
// nonzero per vector.
// Each output is summed by one thread in a fixed order, whatever the thread count.
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

struct SparseArgs {
  const int32_t* row_ptr;
  const uint16_t* col_idx;
  const float* values;
  const float* xt;  // (chunks, K_pad, width)
  const float* bias;
  float* out;  // (M, N)
  int64_t m;
  int64_t n;
  int64_t k_pad;
  int64_t width;
  int r;
  int c;
  std::atomic<bool>* index_out_of_range;  // set by the kernels that check indices as they read them
  float* out_t;  // (chunks, N, width): output of the AVX2 block kernels, copied to out afterwards
};

inline float bias_at(const SparseArgs& a, int64_t n) { return a.bias == nullptr ? 0.0f : a.bias[n]; }

// ---------------------------------------------------------------------------------------------
// Scalar (width 1: chunk i is token i)

void block_row_scalar(const SparseArgs& a, int64_t br, int64_t token) {
  const int64_t n0 = br * a.r;
  const int rows = static_cast<int>(std::min<int64_t>(a.r, a.n - n0));
  const float* x = a.xt + token * a.k_pad;
  float acc[16] = {};
  for (int32_t b = a.row_ptr[br]; b < a.row_ptr[br + 1]; ++b) {
    const int64_t col0 = static_cast<int64_t>(a.col_idx[b]) * a.c;
    const float* vals = a.values + static_cast<int64_t>(b) * a.r * a.c;
    for (int c = 0; c < a.c; ++c) {
      for (int r = 0; r < a.r; ++r) {
        acc[r] += vals[c * a.r + r] * x[col0 + c];
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    a.out[token * a.n + n0 + r] = acc[r] + bias_at(a, n0 + r);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2: chunks of 8 * V tokens. S sets of accumulators take the blocks in turn, as in the
// AVX-512 kernel below. Without the unroll pragmas GCC 12 kept the accumulators on the stack.
// The store-to-load latency then made the kernel 1.4x slower at (4096, 4096), M = 128 on Zen 2.

template <int R, int C, int V, int S>
__attribute__((target("avx2,fma"))) void block_row_avx2(const SparseArgs& a, int64_t br, int64_t chunk) {
  constexpr int64_t kWidth = 8 * V;
  const int64_t n0 = br * R;
  const int rows = static_cast<int>(std::min<int64_t>(R, a.n - n0));
  const float* x = a.xt + chunk * a.k_pad * kWidth;
  const int32_t end = a.row_ptr[br + 1];
  __m256 acc[S][R][V];
  #pragma GCC unroll 16
  for (int set = 0; set < S; ++set) {
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        acc[set][r][v] = _mm256_setzero_ps();
      }
    }
  }
  int32_t b = a.row_ptr[br];
  for (; b + S <= end; b += S) {
    #pragma GCC unroll 16
    for (int set = 0; set < S; ++set) {
      const int64_t col0 = static_cast<int64_t>(a.col_idx[b + set]) * C;
      const float* vals = a.values + static_cast<int64_t>(b + set) * R * C;
      #pragma GCC unroll 16
      for (int c = 0; c < C; ++c) {
        const float* x_row = x + (col0 + c) * kWidth;
        __m256 xv[V];
        #pragma GCC unroll 16
        for (int v = 0; v < V; ++v) {
          xv[v] = _mm256_loadu_ps(x_row + 8 * v);
        }
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const __m256 wv = _mm256_broadcast_ss(vals + c * R + r);
          #pragma GCC unroll 16
          for (int v = 0; v < V; ++v) {
            acc[set][r][v] = _mm256_fmadd_ps(wv, xv[v], acc[set][r][v]);
          }
        }
      }
    }
  }
  for (; b < end; ++b) {
    const int64_t col0 = static_cast<int64_t>(a.col_idx[b]) * C;
    const float* vals = a.values + static_cast<int64_t>(b) * R * C;
    #pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const float* x_row = x + (col0 + c) * kWidth;
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        const __m256 xv = _mm256_loadu_ps(x_row + 8 * v);
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          acc[0][r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(vals + c * R + r), xv, acc[0][r][v]);
        }
      }
    }
  }
  // Token lanes are stored contiguously in out_t; untranspose_output() writes them to out.
  float* out_t = a.out_t + (chunk * a.n + n0) * kWidth;
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (r == rows) {
      break;  // rows past N in the last block row
    }
    const __m256 bias = _mm256_set1_ps(bias_at(a, n0 + r));
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      __m256 sum = acc[0][r][v];
      #pragma GCC unroll 16
      for (int set = 1; set < S; ++set) {
        sum = _mm256_add_ps(sum, acc[set][r][v]);
      }
      _mm256_storeu_ps(out_t + r * kWidth + 8 * v, _mm256_add_ps(sum, bias));
    }
  }
}

// The inputs of four nonzeros whose 16-bit indices start at idx, from 4 loads and 3 inserts.
__attribute__((target("avx2,fma"))) inline __m128 four_inputs(const float* x, const uint16_t* idx) {
  uint64_t w;
  std::memcpy(&w, idx, 8);
  return _mm_set_ps(x[w >> 48], x[(w >> 32) & 0xFFFF], x[(w >> 16) & 0xFFFF], x[w & 0xFFFF]);
}

// Unstructured weights at M = 1 on AVX2, row n's products in 8 lanes: each vector of 8 inputs is
// built from scalar loads. On Zen 2 this took 0.6 ns per nonzero at (4096, 4096), and vgatherdps
// 0.9 ns. The last 1 to 7 nonzeros take one masked step, whose lanes past the row multiply zero
// by zero. The caller checks the indices.
__attribute__((target("avx2,fma"))) inline __m256 row_lanes_avx2(const SparseArgs& a, int64_t n) {
  const int32_t begin = a.row_ptr[n];
  const int64_t count = a.row_ptr[n + 1] - begin;
  const float* vals = a.values + begin;
  const uint16_t* idx = a.col_idx + begin;
  const float* x = a.xt;
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m256 x0 = _mm256_set_m128(four_inputs(x, idx + i + 4), four_inputs(x, idx + i));
    const __m256 x1 = _mm256_set_m128(four_inputs(x, idx + i + 12), four_inputs(x, idx + i + 8));
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + i), x0, acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + i + 8), x1, acc1);
  }
  if (i + 8 <= count) {
    const __m256 x0 = _mm256_set_m128(four_inputs(x, idx + i + 4), four_inputs(x, idx + i));
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + i), x0, acc0);
    i += 8;
  }
  if (i < count) {
    // Lanes past the row repeat the row's last input and are then zeroed.
    const int64_t last = count - 1;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 in_row =
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count - i)), lane));
    const __m256 xv = _mm256_setr_ps(x[idx[i]], x[idx[std::min(i + 1, last)]], x[idx[std::min(i + 2, last)]],
                                     x[idx[std::min(i + 3, last)]], x[idx[std::min(i + 4, last)]],
                                     x[idx[std::min(i + 5, last)]], x[idx[std::min(i + 6, last)]],
                                     x[idx[std::min(i + 7, last)]]);
    const __m256 wv = _mm256_maskload_ps(vals + i, _mm256_castps_si256(in_row));
    acc1 = _mm256_fmadd_ps(wv, _mm256_and_ps(xv, in_row), acc1);
  }
  return _mm256_add_ps(acc0, acc1);
}

// Return a vector whose lane j is the sum of the 8 lanes of v[j].
__attribute__((target("avx2,fma"))) inline __m256 sum_lanes8(const __m256* v) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // u0 has the sums of lanes 0-3 of v[0..3] in its low half and of lanes 4-7 in its high half.
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Broadcast lanes for the pair kernel: value 2j of a 4-value load in lanes 0-3, value 2j + 1 in
// lanes 4-7 (vpermilps works inside each 128-bit half of a 4-value broadcast).
__attribute__((target("avx2,fma"))) inline __m256 pair_values(const float* vals, int j) {
  const __m256 four = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(vals));
  return j == 0 ? _mm256_permutevar_ps(four, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1))
                : _mm256_permutevar_ps(four, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3));
}

// The 4 token lanes of nonzeros b (lanes 0-3) and b + 1 (lanes 4-7).
__attribute__((target("avx2,fma"))) inline __m256 pair_inputs(const float* x, const uint16_t* idx, int32_t b) {
  return _mm256_loadu2_m128(x + idx[b + 1] * 4, x + idx[b] * 4);
}

// Unstructured weights at 2 to 4 tokens on AVX2, in one chunk of 4 tokens, row n's 4 token lanes:
// one vector carries the 4 token lanes of two nonzeros, so that 4 tokens fill a vector as 8 do.
// The caller checks the indices.
__attribute__((target("avx2,fma"))) inline __m128 pair_row_tokens_avx2(const SparseArgs& a, int64_t n) {
  const int32_t end = a.row_ptr[n + 1];
  const uint16_t* idx = a.col_idx;
  const float* vals = a.values;
  const float* x = a.xt;
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps();
  __m256 acc3 = _mm256_setzero_ps();
  int32_t b = a.row_ptr[n];
  for (; b + 8 <= end; b += 8) {
    acc0 = _mm256_fmadd_ps(pair_values(vals + b, 0), pair_inputs(x, idx, b), acc0);
    acc1 = _mm256_fmadd_ps(pair_values(vals + b, 1), pair_inputs(x, idx, b + 2), acc1);
    acc2 = _mm256_fmadd_ps(pair_values(vals + b + 4, 0), pair_inputs(x, idx, b + 4), acc2);
    acc3 = _mm256_fmadd_ps(pair_values(vals + b + 4, 1), pair_inputs(x, idx, b + 6), acc3);
  }
  const __m256 sum8 = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  __m128 tokens = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
  for (; b < end; ++b) {
    tokens = _mm_fmadd_ps(_mm_set1_ps(vals[b]), _mm_loadu_ps(x + idx[b] * 4), tokens);
  }
  return tokens;
}

// Unstructured weights at 5 to 8 tokens on AVX2, in one chunk of 8, row n's 8 token lanes. Each
// value is broadcast from a 4-value load by an in-lane shuffle, so a nonzero costs one load of
// its 8 token lanes. The caller checks the indices.
__attribute__((target("avx2,fma"))) inline __m256 octet_row_tokens_avx2(const SparseArgs& a, int64_t n) {
  const int32_t end = a.row_ptr[n + 1];
  const uint16_t* idx = a.col_idx;
  const float* vals = a.values;
  const float* x = a.xt;
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int32_t b = a.row_ptr[n];
  for (; b + 4 <= end; b += 4) {
    const __m256 four = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(vals + b));
    uint64_t w;
    std::memcpy(&w, idx + b, 8);
    acc[0] = _mm256_fmadd_ps(_mm256_permute_ps(four, 0x00), _mm256_loadu_ps(x + (w & 0xFFFF) * 8), acc[0]);
    acc[1] = _mm256_fmadd_ps(_mm256_permute_ps(four, 0x55), _mm256_loadu_ps(x + ((w >> 16) & 0xFFFF) * 8), acc[1]);
    acc[2] = _mm256_fmadd_ps(_mm256_permute_ps(four, 0xAA), _mm256_loadu_ps(x + ((w >> 32) & 0xFFFF) * 8), acc[2]);
    acc[3] = _mm256_fmadd_ps(_mm256_permute_ps(four, 0xFF), _mm256_loadu_ps(x + (w >> 48) * 8), acc[3]);
  }
  for (; b < end; ++b) {
    acc[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(vals + b), _mm256_loadu_ps(x + idx[b] * 8), acc[0]);
  }
  return _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
}

// Store the outputs of rows n .. n + rows - 1 plus the bias, where v[t] contains token t's
// outputs for each of the a.m tokens. A full batch of 8 rows takes unmasked loads and stores.
__attribute__((target("avx2"))) inline void store_token_rows(const SparseArgs& a, const __m256* v, int64_t n,
                                                             int64_t rows) {
  if (rows == 8) {
    const __m256 bias = a.bias == nullptr ? _mm256_setzero_ps() : _mm256_loadu_ps(a.bias + n);
    for (int64_t t = 0; t < a.m; ++t) {
      _mm256_storeu_ps(a.out + t * a.n + n, _mm256_add_ps(v[t], bias));
    }
    return;
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i in_batch = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(rows)), lane);
  const __m256 bias = a.bias == nullptr ? _mm256_setzero_ps() : _mm256_maskload_ps(a.bias + n, in_batch);
  for (int64_t t = 0; t < a.m; ++t) {
    _mm256_maskstore_ps(a.out + t * a.n + n, in_batch, _mm256_add_ps(v[t], bias));
  }
}

// Unstructured weights at 2 to 4 (kTokens = 4) or 5 to 8 (kTokens = 8) tokens on AVX2, output
// rows [n0, n1), 8 at a time: the rows' indices are checked (kIndicesCheckedAtOnce), their token
// lanes are transposed, and each token's 8 outputs are stored as one vector.
template <int kTokens>
__attribute__((target("avx2,fma"))) void few_rows_avx2(const SparseArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t rows = std::min<int64_t>(8, n1 - n);
    const bool each_row = check_each_row(a.row_ptr, n, rows);
    if (!each_row && !rows_checked(a.row_ptr, a.col_idx, n, rows, a.k_pad, a.index_out_of_range)) {
      return;
    }
    __m256 v[8];
    #pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if (j >= rows) {
        v[j] = _mm256_setzero_ps();
      } else if (each_row && !rows_checked(a.row_ptr, a.col_idx, n + j, 1, a.k_pad, a.index_out_of_range)) {
        return;
      } else if constexpr (kTokens == 4) {
        v[j] = _mm256_set_m128(_mm_setzero_ps(), pair_row_tokens_avx2(a, n + j));
      } else {
        v[j] = octet_row_tokens_avx2(a, n + j);
      }
    }
    transpose8(v);
    store_token_rows(a, v, n, rows);
  }
}

// 1x4 blocks at M = 1 on AVX2, row n's products in 8 lanes: one vector carries the 4 inputs of two
// blocks, loaded directly. The caller checks the indices.
__attribute__((target("avx2,fma"))) inline __m256 row_quad_lanes_avx2(const SparseArgs& a, int64_t n) {
  const int32_t begin = a.row_ptr[n];
  const int32_t end = a.row_ptr[n + 1];
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc[4] = {zero, zero, zero, zero};
  auto quad = [&](int32_t b) { return a.xt + 4 * static_cast<int64_t>(a.col_idx[b]); };
  int32_t b = begin;
  for (; b + 8 <= end; b += 8) {
    for (int s = 0; s < 4; ++s) {
      const __m256 xv = _mm256_loadu2_m128(quad(b + 2 * s + 1), quad(b + 2 * s));
      acc[s] = _mm256_fmadd_ps(_mm256_loadu_ps(a.values + 4 * static_cast<int64_t>(b + 2 * s)), xv, acc[s]);
    }
  }
  for (; b + 2 <= end; b += 2) {
    const __m256 xv = _mm256_loadu2_m128(quad(b + 1), quad(b));
    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.values + 4 * static_cast<int64_t>(b)), xv, acc[0]);
  }
  if (b < end) {
    const __m128 last = _mm_mul_ps(_mm_loadu_ps(a.values + 4 * static_cast<int64_t>(b)), _mm_loadu_ps(quad(b)));
    acc[1] = _mm256_add_ps(acc[1], _mm256_set_m128(_mm_setzero_ps(), last));
  }
  return _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
}

// Unstructured weights (C = 1) and 1x4 blocks (C = 4) at M = 1 on AVX2, output rows [n0, n1), 8 at
// a time: the 8 rows' indices are checked (kIndicesCheckedAtOnce), then the lanes of the 8 rows
// are summed together and stored as one vector.
template <int C>
__attribute__((target("avx2,fma"))) void single_rows_avx2(const SparseArgs& a, int64_t n0, int64_t n1) {
  const int64_t limit = a.k_pad / C;
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t rows = std::min<int64_t>(8, n1 - n);
    const bool each_row = check_each_row(a.row_ptr, n, rows);
    if (!each_row && !rows_checked(a.row_ptr, a.col_idx, n, rows, limit, a.index_out_of_range)) {
      return;
    }
    __m256 lanes[8];
    #pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if (j >= rows) {
        lanes[j] = _mm256_setzero_ps();
        continue;
      }
      if (each_row && !rows_checked(a.row_ptr, a.col_idx, n + j, 1, limit, a.index_out_of_range)) {
        return;
      }
      if constexpr (C == 1) {
        lanes[j] = row_lanes_avx2(a, n + j);
      } else {
        lanes[j] = row_quad_lanes_avx2(a, n + j);
      }
    }
    const __m256 sums = sum_lanes8(lanes);
    store_token_rows(a, &sums, n, rows);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512: chunks of 16 * V tokens.

__attribute__((target("avx512f"))) inline __mmask16 tail_mask_avx512(int64_t lanes) {
  return lanes >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : lanes <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << lanes) - 1u);
}

// S sets of accumulators take the blocks in turn, so that S * R * V independent FMA chains hide
// the 4-cycle FMA latency when a block has few outputs and the batch is small.
template <int R, int C, int V, int S>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void block_row_avx512(const SparseArgs& a, int64_t br,
                                                                           int64_t chunk) {
  constexpr int64_t kWidth = 16 * V;
  const int64_t n0 = br * R;
  const int rows = static_cast<int>(std::min<int64_t>(R, a.n - n0));
  const float* x = a.xt + chunk * a.k_pad * kWidth;
  const int32_t begin = a.row_ptr[br];
  const int32_t end = a.row_ptr[br + 1];
  __m512 acc[S][R][V];
  #pragma GCC unroll 16
  for (int set = 0; set < S; ++set) {
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        acc[set][r][v] = _mm512_setzero_ps();
      }
    }
  }
  int32_t b = begin;
  for (; b + S <= end; b += S) {
    #pragma GCC unroll 16
    for (int set = 0; set < S; ++set) {
      const int64_t col0 = static_cast<int64_t>(a.col_idx[b + set]) * C;
      const float* vals = a.values + static_cast<int64_t>(b + set) * R * C;
      #pragma GCC unroll 16
      for (int c = 0; c < C; ++c) {
        const float* x_row = x + (col0 + c) * kWidth;
        __m512 xv[V];
        #pragma GCC unroll 16
        for (int v = 0; v < V; ++v) {
          xv[v] = _mm512_loadu_ps(x_row + 16 * v);
        }
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const __m512 wv = _mm512_set1_ps(vals[c * R + r]);
          #pragma GCC unroll 16
          for (int v = 0; v < V; ++v) {
            acc[set][r][v] = _mm512_fmadd_ps(wv, xv[v], acc[set][r][v]);
          }
        }
      }
    }
  }
  for (; b < end; ++b) {
    const int64_t col0 = static_cast<int64_t>(a.col_idx[b]) * C;
    const float* vals = a.values + static_cast<int64_t>(b) * R * C;
    #pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const float* x_row = x + (col0 + c) * kWidth;
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) {
        const __m512 xv = _mm512_loadu_ps(x_row + 16 * v);
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          acc[0][r][v] = _mm512_fmadd_ps(_mm512_set1_ps(vals[c * R + r]), xv, acc[0][r][v]);
        }
      }
    }
  }
  const int64_t m0 = chunk * kWidth;
  for (int r = 0; r < rows; ++r) {
    const __m512 bias = _mm512_set1_ps(bias_at(a, n0 + r));
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      __m512 sum = acc[0][r][v];
      for (int set = 1; set < S; ++set) {
        sum = _mm512_add_ps(sum, acc[set][r][v]);
      }
      store_lanes_strided(_mm512_add_ps(sum, bias), a.out + (m0 + 16 * v) * a.n + n0 + r, a.n, a.m - m0 - 16 * v);
    }
  }
}

// Input indices of the 16 values starting at value i of a row, of which `valid` are in the row.
// For C = 4, lane l reads input 4 * idx[l / 4] + l % 4.
template <int C>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i gather_indices(const uint16_t* idx, int64_t i,
                                                                                   int64_t valid) {
  if constexpr (C == 1) {
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail_mask_avx512(valid), idx + i));
  } else {
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i within = _mm512_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
    const __mmask16 block_mask = tail_mask_avx512((valid + 3) / 4);
    __m512i blocks = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(block_mask, idx + i / 4));
    return _mm512_add_epi32(_mm512_slli_epi32(_mm512_permutexvar_epi32(spread, blocks), 2), within);
  }
}

// Unstructured and 1x4 blocks at M = 1 where gathers are fast (use_gathers(); otherwise the AVX2
// kernels above run), row n's products in 8 lanes: gather 16 inputs per step, two accumulators in
// turn. Each gather reads only the lanes whose input index is below K_pad, and the lanes of an index
// out of range are added to out_of_range.
template <int C>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256 row_lanes_gather_avx512(
    const SparseArgs& a, int64_t n, __mmask16& out_of_range) {
  const int32_t begin = a.row_ptr[n];
  const int64_t count = static_cast<int64_t>(a.row_ptr[n + 1] - begin) * C;  // values in this row
  const float* vals = a.values + static_cast<int64_t>(begin) * C;
  const uint16_t* idx = a.col_idx + begin;
  const __m512i limit = _mm512_set1_epi32(static_cast<int32_t>(a.k_pad));
  const __m512 zero = _mm512_setzero_ps();
  __m512 acc0 = zero;
  __m512 acc1 = zero;
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    const __m512i i0 = gather_indices<C>(idx, i, 16);
    const __m512i i1 = gather_indices<C>(idx, i + 16, 16);
    const __mmask16 in0 = _mm512_cmplt_epu32_mask(i0, limit);
    const __mmask16 in1 = _mm512_cmplt_epu32_mask(i1, limit);
    out_of_range |= static_cast<__mmask16>(~(in0 & in1));
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(vals + i), _mm512_mask_i32gather_ps(zero, in0, i0, a.xt, 4), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(vals + i + 16), _mm512_mask_i32gather_ps(zero, in1, i1, a.xt, 4),
                           acc1);
  }
  for (; i < count; i += 16) {
    const __mmask16 mask = tail_mask_avx512(count - i);
    const __m512i indices = gather_indices<C>(idx, i, count - i);
    const __mmask16 in = _mm512_mask_cmplt_epu32_mask(mask, indices, limit);
    out_of_range |= static_cast<__mmask16>(mask & ~in);
    __m512 xv = _mm512_mask_i32gather_ps(zero, in, indices, a.xt, 4);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, vals + i), xv, acc0);
  }
  const __m512 sum = _mm512_add_ps(acc0, acc1);
  return _mm256_add_ps(_mm512_castps512_ps256(sum), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1)));
}

// The gather kernel's output rows [n0, n1), 8 at a time: the lanes of 8 rows are summed together
// and stored as one vector.
template <int C>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void single_rows_gather_avx512(const SparseArgs& a, int64_t n0,
                                                                                    int64_t n1) {
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t rows = std::min<int64_t>(8, n1 - n);
    __mmask16 out_of_range = 0;
    __m256 lanes[8];
    #pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      lanes[j] = j < rows ? row_lanes_gather_avx512<C>(a, n + j, out_of_range) : _mm256_setzero_ps();
    }
    if (out_of_range != 0) {
      a.index_out_of_range->store(true, std::memory_order_relaxed);
      return;
    }
    const __m256 sums = sum_lanes8(lanes);
    store_token_rows(a, &sums, n, rows);
  }
}

// acc plus the products of nonzeros b and b + 1 with their 8 token lanes (lanes 0-7 and 8-15).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 pair_product(
    const float* x, const uint16_t* idx, const float* vals, int32_t b, __m512 acc) {
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512 xv = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(x + idx[b] * 8)),
                                       _mm256_loadu_ps(x + idx[b + 1] * 8), 1);
  const __m128 two_values = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(vals + b)));
  const __m512 wv = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(two_values));
  return _mm512_fmadd_ps(wv, xv, acc);
}

// Unstructured weights at 2 to 8 tokens, in one chunk of 8 tokens, row n's 8 token lanes: one
// vector contains the token lanes of two nonzeros (lanes 0-7 the first, 8-15 the second), so no
// lane is padding at M = 8 and the packed activations (K_pad x 8 floats) take half the cache of
// 16-token chunks. The caller checks the indices.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) inline __m256 pair_row_tokens_avx512(
    const SparseArgs& a, int64_t n) {
  const int32_t end = a.row_ptr[n + 1];
  const float* x = a.xt;
  const uint16_t* idx = a.col_idx;
  const float* vals = a.values;
  __m512 acc0 = _mm512_setzero_ps();
  __m512 acc1 = _mm512_setzero_ps();
  __m512 acc2 = _mm512_setzero_ps();
  __m512 acc3 = _mm512_setzero_ps();
  int32_t b = a.row_ptr[n];
  for (; b + 8 <= end; b += 8) {
    acc0 = pair_product(x, idx, vals, b, acc0);
    acc1 = pair_product(x, idx, vals, b + 2, acc1);
    acc2 = pair_product(x, idx, vals, b + 4, acc2);
    acc3 = pair_product(x, idx, vals, b + 6, acc3);
  }
  for (; b + 2 <= end; b += 2) {
    acc0 = pair_product(x, idx, vals, b, acc0);
  }
  __m512 sum = _mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3));
  __m256 tokens = _mm256_add_ps(_mm512_castps512_ps256(sum), _mm512_extractf32x8_ps(sum, 1));
  if (b < end) {
    tokens = _mm256_fmadd_ps(_mm256_set1_ps(vals[b]), _mm256_loadu_ps(x + idx[b] * 8), tokens);
  }
  return tokens;
}

// The pair kernel's output rows [n0, n1), 8 at a time: the rows' indices are checked (in one
// pass up to kIndicesCheckedAtOnce), their token lanes are transposed, and each token's 8
// outputs are stored as one vector.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void pair_rows_avx512(const SparseArgs& a,
                                                                                   int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t rows = std::min<int64_t>(8, n1 - n);
    const int32_t first = a.row_ptr[n];
    const bool each_row = a.row_ptr[n + rows] - first > kIndicesCheckedAtOnce;
    if (!each_row && !indices_below_avx512(a.col_idx, first, a.row_ptr[n + rows], a.k_pad)) {
      a.index_out_of_range->store(true, std::memory_order_relaxed);
      return;
    }
    __m256 v[8];
    #pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if (j >= rows) {
        v[j] = _mm256_setzero_ps();
        continue;
      }
      if (each_row && !indices_below_avx512(a.col_idx, a.row_ptr[n + j], a.row_ptr[n + j + 1], a.k_pad)) {
        a.index_out_of_range->store(true, std::memory_order_relaxed);
        return;
      }
      v[j] = pair_row_tokens_avx512(a, n + j);
    }
    transpose8(v);
    store_token_rows(a, v, n, rows);
  }
}

// Column blocks (R > 1) at M = 1: each input feeds R outputs, held in the lanes of one vector.
template <int R, int C>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void single_row_blocks_avx512(const SparseArgs& a,
                                                                                   int64_t br, int64_t) {
  const int64_t n0 = br * R;
  const int rows = static_cast<int>(std::min<int64_t>(R, a.n - n0));
  const __mmask16 lanes = tail_mask_avx512(R);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int step = 0;
  for (int32_t b = a.row_ptr[br]; b < a.row_ptr[br + 1]; ++b) {
    const int64_t col0 = static_cast<int64_t>(a.col_idx[b]) * C;
    const float* vals = a.values + static_cast<int64_t>(b) * R * C;
    #pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      __m512 wv = _mm512_maskz_loadu_ps(lanes, vals + c * R);
      acc[step & 3] = _mm512_fmadd_ps(wv, _mm512_set1_ps(a.xt[col0 + c]), acc[step & 3]);
      ++step;
    }
  }
  __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
  const __mmask16 out_lanes = tail_mask_avx512(rows);
  if (a.bias != nullptr) {
    sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(out_lanes, a.bias + n0));
  }
  _mm512_mask_storeu_ps(a.out + n0, out_lanes, sum);
}

// ---------------------------------------------------------------------------------------------
// Kernel choice

using BlockRowFn = void (*)(const SparseArgs&, int64_t, int64_t);

struct KernelChoice {
  BlockRowFn fn;  // (args, block row, chunk), or with `rows`, (args, first row, end row)
  int64_t width;                // tokens per activation chunk
  bool checks_indices = false;  // the kernel reports an index out of range itself
  bool stores_transposed = false;  // the kernel writes SparseArgs::out_t instead of out
  bool rows = false;               // fn takes a range of rows (one chunk, R = 1)
};

// Accumulator sets for one vector of tokens: enough for 4 or more independent FMA chains.
constexpr int accumulator_sets(int rows) {
  if (rows == 1) {
    return 4;
  }
  return rows == 4 ? 2 : 1;
}

template <int R, int C>
KernelChoice avx512_kernel(int64_t m) {
  if (m == 1) {
    if constexpr (R == 1) {
      if (!use_gathers()) {
        return {single_rows_avx2<C>, 1, true, false, true};
      }
      return {single_rows_gather_avx512<C>, 1, true, false, true};
    } else {
      return {single_row_blocks_avx512<R, C>, 1};
    }
  }
  if constexpr (R == 1 && C == 1) {
    if (m <= 8) {
      return {pair_rows_avx512, 8, true, false, true};
    }
  }
  // One vector of 16 tokens for small batches, two (a 32-token chunk) above.
  // 64-token chunks (four vectors per block) measured slower at 128 and 512 rows on an Intel Xeon.
  if (m <= 16) {
    constexpr int kSets = accumulator_sets(R);
    return {block_row_avx512<R, C, 1, kSets>, 16};
  }
  constexpr int kSets = R == 1 ? 2 : 1;
  return {block_row_avx512<R, C, (R == 16 ? 1 : 2), kSets>, R == 16 ? 16 : 32};
}

template <int R, int C>
KernelChoice avx2_kernel(int64_t m) {
  if constexpr (R == 1) {
    if (m == 1) {
      return {single_rows_avx2<C>, 1, true, false, true};
    }
  }
  if constexpr (R == 1 && C == 1) {
    if (m <= 4) {
      return {few_rows_avx2<4>, 4, true, false, true};
    }
    if (m <= 8) {
      return {few_rows_avx2<8>, 8, true, false, true};
    }
  }
  // Accumulator sets for one vector of 8 tokens: enough for 8 or more independent FMA chains.
  constexpr int kSets = R == 1 ? 8 : (R == 4 ? 2 : 1);
  if (m <= 8 || R >= 8) {
    return {block_row_avx2<R, C, 1, kSets>, 8, false, true};
  }
  return {block_row_avx2<R, C, 2, (R == 1 ? 4 : 1)>, 16, false, true};
}

KernelChoice pick_kernel(Isa isa, int r, int c, int64_t m) {
  const int shape = r * 100 + c;
  if (has_avx512(isa)) {
    switch (shape) {
      case 101:
        return avx512_kernel<1, 1>(m);
      case 104:
        return avx512_kernel<1, 4>(m);
      case 401:
        return avx512_kernel<4, 1>(m);
      case 801:
        return avx512_kernel<8, 1>(m);
      default:
        return avx512_kernel<16, 16>(m);
    }
  }
  if (isa == Isa::kAvx2) {
    switch (shape) {
      case 101:
        return avx2_kernel<1, 1>(m);
      case 104:
        return avx2_kernel<1, 4>(m);
      case 401:
        return avx2_kernel<4, 1>(m);
      case 801:
        return avx2_kernel<8, 1>(m);
      default:
        return avx2_kernel<16, 16>(m);
    }
  }
  return {block_row_scalar, 1};
}

// Write x (M, K) into xt (chunks, K_pad, width): token t is lane t % width of chunk t / width.
// Lanes past M and rows past K are zero.
void pack_activations(const float* x, int64_t m, int64_t k, int64_t k_pad, int64_t width, float* xt) {
  constexpr int64_t kTile = 64;
  const int64_t chunks = (m + width - 1) / width;
  const int64_t col_tiles = (k_pad + kTile - 1) / kTile;
  at::parallel_for(0, chunks * col_tiles, std::max<int64_t>(1, 4096 / (kTile * width)), [&](int64_t begin,
                                                                                             int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / col_tiles;
      const int64_t c0 = (task % col_tiles) * kTile;
      const int64_t c1 = std::min(k_pad, c0 + kTile);
      float* dst = xt + chunk * k_pad * width;
      for (int64_t lane = 0; lane < width; ++lane) {
        const int64_t token = chunk * width + lane;
        for (int64_t col = c0; col < c1; ++col) {
          dst[col * width + lane] = token < m && col < k ? x[token * k + col] : 0.0f;
        }
      }
    }
  });
}

// Copy out_t (chunks, N, width) into out (M, N). The AVX2 block kernels store each output row's
// token lanes as one vector into out_t. Stored straight into out, those lanes would lie N * 4 bytes
// apart. With N a multiple of 1024 they would all map to one L1 set (4K aliasing).
void untranspose_output(const float* out_t, int64_t m, int64_t n, int64_t width, float* out) {
  constexpr int64_t kRows = 64;
  const int64_t chunks = (m + width - 1) / width;
  const int64_t row_blocks = (n + kRows - 1) / kRows;
  at::parallel_for(0, chunks * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / row_blocks;
      const int64_t n0 = (task % row_blocks) * kRows;
      const int64_t n1 = std::min(n, n0 + kRows);
      const int64_t lanes = std::min(width, m - chunk * width);
      for (int64_t lane = 0; lane < lanes; ++lane) {
        float* dst = out + (chunk * width + lane) * n;
        const float* src = out_t + chunk * n * width + lane;
        for (int64_t j = n0; j < n1; ++j) {
          dst[j] = src[j * width];
        }
      }
    }
  });
}

bool supported_block(int64_t r, int64_t c) {
  return (r == 1 && c == 1) || (r == 1 && c == 4) || (r == 4 && c == 1) || (r == 8 && c == 1) ||
         (r == 16 && c == 16);
}

at::Tensor sparse_linear_cpu(const at::Tensor& x_in, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, const std::optional<at::Tensor>& bias,
                             int64_t out_features) {
  const char* op = "sparse_linear";
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.dim() == 3 && values.is_contiguous(), op,
              ": expected values to be a contiguous float32 tensor of shape (nblocks, C, R), but got ",
              values.scalar_type(), " of shape ", values.sizes());
  const int64_t c = values.size(1);
  const int64_t r = values.size(2);
  TORCH_CHECK(supported_block(r, c), op, ": expected a block shape R x C in 1x1, 1x4, 4x1, 8x1, 16x16, but got ",
              r, "x", c);
  TORCH_CHECK(out_features >= 0, op, ": expected out_features >= 0, but got ", out_features);
  TORCH_CHECK(x_in.dim() >= 1, op, ": expected an input with at least 1 dimension, but got a 0-dim tensor");
  const int64_t k = x_in.size(-1);
  const int64_t n = out_features;
  const int64_t block_rows = (n + r - 1) / r;
  const int64_t block_cols = (k + c - 1) / c;
  const at::Tensor x = rows_of(x_in, k, op);
  const int64_t m = x.size(0);
  const Isa isa = active_isa();
  const KernelChoice choice = pick_kernel(isa, static_cast<int>(r), static_cast<int>(c), m);
  // With no rows the kernels read nothing, so the indices are checked here as for any other call.
  check_block_rows(row_ptr, col_idx, block_rows, block_cols, op, !(choice.checks_indices && m > 0));
  TORCH_CHECK(values.size(0) == col_idx.size(0), op, ": expected one value block per column index (",
              col_idx.size(0), "), but got ", values.size(0));
  const float* bias_ptr = bias_data(bias, n, op);

  const int64_t k_pad = block_cols * c;
  const int64_t chunks = (m + choice.width - 1) / choice.width;
  at::Tensor xt;
  if (choice.width == 1 && k_pad == k) {
    xt = x;  // rows of x are already chunks of one token
  } else {
    xt = at::empty({chunks, k_pad, choice.width}, x.options());
    pack_activations(x.const_data_ptr<float>(), m, k, k_pad, choice.width, xt.mutable_data_ptr<float>());
  }
  at::Tensor out = at::empty({m, n}, x.options());
  at::Tensor out_t;
  if (choice.stores_transposed) {
    out_t = at::empty({chunks, n, choice.width}, x.options());
  }

  std::atomic<bool> index_out_of_range{false};
  const SparseArgs args{row_ptr.const_data_ptr<int32_t>(),
                        reinterpret_cast<const uint16_t*>(col_idx.const_data_ptr<int16_t>()),
                        values.const_data_ptr<float>(),
                        xt.const_data_ptr<float>(),
                        bias_ptr,
                        out.mutable_data_ptr<float>(),
                        m,
                        n,
                        k_pad,
                        choice.width,
                        static_cast<int>(r),
                        static_cast<int>(c),
                        &index_out_of_range,
                        choice.stores_transposed ? out_t.mutable_data_ptr<float>() : nullptr};
  // Tasks run chunk by chunk, so that one activation chunk serves every block row from cache.
  const int64_t blocks_per_row = std::max<int64_t>(1, col_idx.size(0) / std::max<int64_t>(block_rows, 1));
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (blocks_per_row * r * c * choice.width));
  at::parallel_for(0, chunks * block_rows, grain, [&](int64_t begin, int64_t end) {
    if (choice.rows) {
      choice.fn(args, begin, end);  // one chunk and R = 1: task t is output row t
      return;
    }
    // Task t is block row t % block_rows of chunk t / block_rows, stepped without divisions.
    int64_t chunk = begin / block_rows;
    int64_t br = begin - chunk * block_rows;
    for (int64_t task = begin; task < end; ++task) {
      choice.fn(args, br, chunk);
      if (++br == block_rows) {
        br = 0;
        ++chunk;
      }
    }
  });
  if (index_out_of_range.load()) {
    raise_index_out_of_range(col_idx, block_cols, op);
  }
  if (choice.stores_transposed) {
    untranspose_output(out_t.const_data_ptr<float>(), m, n, choice.width, out.mutable_data_ptr<float>());
  }
  return out.view(output_shape(x_in, n));
}

}  // namespace
}  // namespace weightlight

TORCH_LIBRARY_IMPL(weightlight, CPU, m) { m.impl("sparse_linear", &weightlight::sparse_linear_cpu); }
