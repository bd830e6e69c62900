// Int8 GEMM: y = dequantize(quantize(x) @ w_int8.T) + bias, with uint8 activations quantized per
// row at run time (dynamic) or with a static per-tensor scale and zero point, and symmetric
// per-channel int8 weights.
//
// Weight layout (packed once, in Python): int8 (N_pad / 16, K_pad / 4, 16, 4), so that one 64-byte
// load contains 4 consecutive inputs of 16 output columns, the operand layout of vpdpbusd.
// Rows past N and inputs past K are zero.
//
// The activation zero point is not subtracted in the inner loop: acc = sum_k q_x * q_w is
// corrected afterwards by zero_point * w_sums[n], with w_sums the per-channel weight sums.
// The integer accumulator equals reference.int8_linear_accumulators modulo 2^32; the float
// epilogue is float(acc) * (x_scale * w_scale[n]) + bias[n].
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "gemm_common.h"
#include "isa.h"

namespace weightlight {
namespace {

constexpr int64_t kBlockCols = 16;  // output columns per packed weight block
constexpr int kMaxTileRows = 8;
constexpr int kMaxTileBlocks = 8;
constexpr int64_t kAccStride = kMaxTileBlocks * kBlockCols;  // int32 per row of the tile buffer

inline int32_t load_word(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

struct Epilogue {
  const float* x_scale;
  const int32_t* x_zero_point;
  const int32_t* w_sums;
  const float* w_scale;
  const float* bias;
  float* out;
  int64_t n;
};

// ---------------------------------------------------------------------------------------------
// Scalar

void tile_scalar(const uint8_t* qx, int64_t ldx, const int8_t* w, int64_t groups, int rows, int blocks,
                 int32_t* acc) {
  for (int i = 0; i < rows; ++i) {
    for (int b = 0; b < blocks; ++b) {
      for (int64_t c = 0; c < kBlockCols; ++c) {
        uint32_t sum = 0;
        for (int64_t g = 0; g < groups; ++g) {
          const int8_t* wg = w + ((b * groups + g) * kBlockCols + c) * 4;
          const uint8_t* xg = qx + i * ldx + 4 * g;
          for (int j = 0; j < 4; ++j) {
            sum += static_cast<uint32_t>(static_cast<int32_t>(xg[j]) * static_cast<int32_t>(wg[j]));
          }
        }
        acc[i * kAccStride + b * kBlockCols + c] = static_cast<int32_t>(sum);
      }
    }
  }
}

void epilogue_scalar(const int32_t* acc, int rows, int64_t m0, int64_t n0, int64_t cols, const Epilogue& e) {
  for (int i = 0; i < rows; ++i) {
    const int64_t m = m0 + i;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t n = n0 + c;
      int32_t centered = static_cast<int32_t>(static_cast<uint32_t>(acc[i * kAccStride + c]) -
                                              static_cast<uint32_t>(e.x_zero_point[m]) *
                                                  static_cast<uint32_t>(e.w_sums[n]));
      float scale = e.x_scale[m] * e.w_scale[n];
      float y = static_cast<float>(centered) * scale;
      if (e.bias != nullptr) {
        y += e.bias[n];
      }
      e.out[m * e.n + n] = y;
    }
  }
}

// The scalar epilogue with 8 columns per step: the same operations in the same order (a multiply,
// then an add, never fused), so both give the same bits.
__attribute__((target("avx2,fma"))) void epilogue_avx2(const int32_t* acc, int rows, int64_t m0, int64_t n0,
                                                        int64_t cols, const Epilogue& e) {
  const int64_t vector_cols = cols / 8 * 8;
  for (int i = 0; i < rows; ++i) {
    const int64_t m = m0 + i;
    const __m256i zp = _mm256_set1_epi32(e.x_zero_point[m]);
    const __m256 xs = _mm256_set1_ps(e.x_scale[m]);
    float* out_row = e.out + m * e.n + n0;
    for (int64_t c = 0; c < vector_cols; c += 8) {
      __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + i * kAccStride + c));
      const __m256i sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.w_sums + n0 + c));
      a = _mm256_sub_epi32(a, _mm256_mullo_epi32(zp, sums));
      const __m256 scale = _mm256_mul_ps(xs, _mm256_loadu_ps(e.w_scale + n0 + c));
      __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(a), scale);
      if (e.bias != nullptr) {
        y = _mm256_add_ps(y, _mm256_loadu_ps(e.bias + n0 + c));
      }
      _mm256_storeu_ps(out_row + c, y);
    }
  }
  if (vector_cols < cols) {
    epilogue_scalar(acc + vector_cols, rows, m0, n0 + vector_cols, cols - vector_cols, e);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2: no u8 x s8 dot product without saturation, so both operands are widened to int16 and
// multiplied with vpmaddwd, which sums pairs into exact int32 lanes.

template <int MR>
__attribute__((target("avx2,fma"))) void tile_avx2(const uint8_t* qx, int64_t ldx, const int8_t* w,
                                                    int64_t groups, int32_t* acc_out) {
  __m256i acc[MR][4];
  for (int i = 0; i < MR; ++i) {
    for (int q = 0; q < 4; ++q) {
      acc[i][q] = _mm256_setzero_si256();
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m256i xv[MR];
    for (int i = 0; i < MR; ++i) {
      xv[i] = _mm256_cvtepu8_epi16(_mm_set1_epi32(load_word(qx + i * ldx + 4 * g)));
    }
    const int8_t* wg = w + g * 64;
    // Prefetching the weights 16 groups ahead made M = 1 at (4096, 4096) 1.35x faster on Zen 2.
    _mm_prefetch(reinterpret_cast<const char*>(wg + 1024), _MM_HINT_T0);
    for (int q = 0; q < 4; ++q) {
      __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + q * 16)));
      for (int i = 0; i < MR; ++i) {
        acc[i][q] = _mm256_add_epi32(acc[i][q], _mm256_madd_epi16(wv, xv[i]));
      }
    }
  }
  // Each accumulator contains two partial sums per column, so add the pairs and restore column order.
  for (int i = 0; i < MR; ++i) {
    __m256i low = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][0], acc[i][1]), 0xD8);
    __m256i high = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][2], acc[i][3]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc_out + i * kAccStride), low);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc_out + i * kAccStride + 8), high);
  }
}

// AVX2 for 3 rows or more: tiles of 4 rows by 8 columns (half a packed block). tile_avx2 above
// widens the weights of 16 columns for every pair of rows. Here each group of 8 columns is widened
// once per 4 rows, and the activations once per call. On Zen 2, which issues one vpmaddwd per
// cycle (16 products), (4096, 4096) at M = 128 took 45 ms: about that peak, and 1.2x faster than
// with tile_avx2. Tiles of 8 rows by 4 columns were 5-15% slower.

constexpr int kAvx2TileRows = 4;
constexpr int64_t kAvx2MinRows = 3;

// acc_out[i * kAccStride + c], c < 8: the sums of MR rows of x16 (int16, ldx per row) times 8
// columns of a packed weight block. `w` points at the first of those columns in group 0, and
// group g's 8 columns x 4 inputs are the 32 bytes at w + 64 g.
template <int MR>
__attribute__((target("avx2,fma"))) void tile8_avx2(const int16_t* x16, int64_t ldx, const int8_t* w, int64_t groups,
                                                     int32_t* acc_out) {
  __m256i acc[MR][2];
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = _mm256_setzero_si256();
    acc[i][1] = _mm256_setzero_si256();
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = w + g * 64;
    _mm_prefetch(reinterpret_cast<const char*>(wg + 1024), _MM_HINT_T0);  // as in tile_avx2
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16)));
    #pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int64_t word;
      std::memcpy(&word, x16 + i * ldx + 4 * g, sizeof(word));
      const __m256i xv = _mm256_set1_epi64x(word);  // the group's 4 inputs, repeated
      acc[i][0] = _mm256_add_epi32(_mm256_madd_epi16(w0, xv), acc[i][0]);
      acc[i][1] = _mm256_add_epi32(_mm256_madd_epi16(w1, xv), acc[i][1]);
    }
  }
  // As in tile_avx2, each lane pair contains two partial sums of one column.
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m256i sums = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][0], acc[i][1]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc_out + i * kAccStride), sums);
  }
}

void tile8_avx2_rows(int rows, const int16_t* x16, int64_t ldx, const int8_t* w, int64_t groups, int32_t* acc) {
  switch (rows) {
    case 1:
      tile8_avx2<1>(x16, ldx, w, groups, acc);
      break;
    case 2:
      tile8_avx2<2>(x16, ldx, w, groups, acc);
      break;
    case 3:
      tile8_avx2<3>(x16, ldx, w, groups, acc);
      break;
    default:
      tile8_avx2<4>(x16, ldx, w, groups, acc);
      break;
  }
}

__attribute__((target("avx2,fma"))) void widen_to_int16(const uint8_t* q, int64_t count, int16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_cvtepu8_epi16(bytes));
  }
  for (; i < count; ++i) {
    out[i] = q[i];
  }
}

// A task multiplies one weight block of 16 columns by up to kAvx2ChunkRows rows. Consecutive tasks
// take the row chunks of one block, so the block is read from memory once. Its second half and the
// later row tiles then find it in cache. Chunks of rows keep both threads busy when N is one block.
// Measured on Zen 2: widening each block to int16 once per task, instead of once per 4 rows, was
// no faster at any M (the extra stores and the doubled size cost what the conversions saved).
constexpr int64_t kAvx2ChunkRows = 64;

void blocked_gemm_avx2(const uint8_t* q_ptr, const int8_t* w_ptr, int64_t m, int64_t n, int64_t groups,
                       int64_t col_blocks, const Epilogue& e) {
  const int64_t ldx = groups * 4;
  const at::Tensor x16_tensor = at::empty({m * ldx}, at::TensorOptions().dtype(at::kShort));
  int16_t* x16 = x16_tensor.mutable_data_ptr<int16_t>();
  const int64_t rows_grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(ldx, 1));
  at::parallel_for(0, m, rows_grain, [&](int64_t begin, int64_t end) {
    widen_to_int16(q_ptr + begin * ldx, (end - begin) * ldx, x16 + begin * ldx);
  });
  const int64_t chunks = (m + kAvx2ChunkRows - 1) / kAvx2ChunkRows;
  at::parallel_for(0, col_blocks * chunks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t acc[kAvx2TileRows * kAccStride];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int64_t chunk_end = std::min(m, (task % chunks + 1) * kAvx2ChunkRows);
      const int8_t* block = w_ptr + b * groups * 64;
      const int64_t n0 = b * kBlockCols;
      const int64_t cols = std::min<int64_t>(kBlockCols, n - n0);
      for (int64_t m0 = task % chunks * kAvx2ChunkRows; m0 < chunk_end; m0 += kAvx2TileRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kAvx2TileRows, chunk_end - m0));
        const int16_t* x = x16 + m0 * ldx;
        tile8_avx2_rows(rows, x, ldx, block, groups, acc);
        tile8_avx2_rows(rows, x, ldx, block + 32, groups, acc + 8);
        epilogue_avx2(acc, rows, m0, n0, cols, e);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI

// Multiply `groups` groups of 4 inputs of MR activation rows by NB weight blocks that lie
// `block_bytes` apart. With `accumulate` the products are added to the sums already in acc_out.
template <int MR, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void tile_avx512(
    const uint8_t* qx, int64_t ldx, const int8_t* w, int64_t block_bytes, int64_t groups, bool accumulate,
    int32_t* acc_out) {
  __m512i acc[MR][NB];
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    #pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      acc[i][j] = accumulate ? _mm512_loadu_si512(acc_out + i * kAccStride + j * kBlockCols)
                             : _mm512_setzero_si512();
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512i xv[MR];
    #pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      xv[i] = _mm512_set1_epi32(load_word(qx + i * ldx + 4 * g));
    }
    #pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      __m512i wv = _mm512_loadu_si512(w + j * block_bytes + g * 64);
      #pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv[i], wv);
      }
    }
  }
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    #pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      _mm512_storeu_si512(acc_out + i * kAccStride + j * kBlockCols, acc[i][j]);
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void epilogue_avx512(
    const int32_t* acc, int rows, int64_t m0, int64_t n0, int64_t cols, const Epilogue& e) {
  for (int i = 0; i < rows; ++i) {
    const int64_t m = m0 + i;
    const __m512i zp = _mm512_set1_epi32(e.x_zero_point[m]);
    const __m512 xs = _mm512_set1_ps(e.x_scale[m]);
    float* out_row = e.out + m * e.n + n0;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 mask = cols - c >= 16 ? static_cast<__mmask16>(0xFFFF)
                                            : static_cast<__mmask16>((1u << (cols - c)) - 1u);
      __m512i a = _mm512_loadu_si512(acc + i * kAccStride + c);
      __m512i sums = _mm512_maskz_loadu_epi32(mask, e.w_sums + n0 + c);
      a = _mm512_sub_epi32(a, _mm512_mullo_epi32(zp, sums));
      __m512 scale = _mm512_mul_ps(xs, _mm512_maskz_loadu_ps(mask, e.w_scale + n0 + c));
      __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(a), scale);
      if (e.bias != nullptr) {
        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, e.bias + n0 + c));
      }
      _mm512_mask_storeu_ps(out_row + c, mask, y);
    }
  }
}

using TileFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, bool, int32_t*);

// Weight blocks per tile for MR activation rows: at most 24 accumulators, 8 for a single row.
constexpr int max_tile_blocks(int rows) {
  if (rows == 1) {
    return 8;
  }
  if (rows <= 4) {
    return 4;
  }
  return rows <= 6 ? 4 : 3;
}

template <int MR>
TileFn avx512_tile_for_rows(int blocks) {
  constexpr int kMaxBlocks = max_tile_blocks(MR);
  static const TileFn table[8] = {
      tile_avx512<MR, 1>,
      kMaxBlocks >= 2 ? tile_avx512<MR, (kMaxBlocks >= 2 ? 2 : 1)> : nullptr,
      kMaxBlocks >= 3 ? tile_avx512<MR, (kMaxBlocks >= 3 ? 3 : 1)> : nullptr,
      kMaxBlocks >= 4 ? tile_avx512<MR, (kMaxBlocks >= 4 ? 4 : 1)> : nullptr,
      kMaxBlocks >= 5 ? tile_avx512<MR, (kMaxBlocks >= 5 ? 5 : 1)> : nullptr,
      kMaxBlocks >= 6 ? tile_avx512<MR, (kMaxBlocks >= 6 ? 6 : 1)> : nullptr,
      kMaxBlocks >= 7 ? tile_avx512<MR, (kMaxBlocks >= 7 ? 7 : 1)> : nullptr,
      kMaxBlocks >= 8 ? tile_avx512<MR, (kMaxBlocks >= 8 ? 8 : 1)> : nullptr,
  };
  return table[blocks - 1];
}

TileFn avx512_tile(int rows, int blocks) {
  switch (rows) {
    case 1:
      return avx512_tile_for_rows<1>(blocks);
    case 2:
      return avx512_tile_for_rows<2>(blocks);
    case 3:
      return avx512_tile_for_rows<3>(blocks);
    case 4:
      return avx512_tile_for_rows<4>(blocks);
    case 5:
      return avx512_tile_for_rows<5>(blocks);
    case 6:
      return avx512_tile_for_rows<6>(blocks);
    case 7:
      return avx512_tile_for_rows<7>(blocks);
    default:
      return avx512_tile_for_rows<8>(blocks);
  }
}

// ---------------------------------------------------------------------------------------------

struct TileShape {
  int rows;    // activation rows per tile
  int blocks;  // weight blocks of 16 columns per tile
};

TileShape tile_shape(Isa isa, int64_t m) {
  if (has_avx512(isa)) {
    // One activation row uses 8 independent accumulators to cover the 4-cycle latency of
    // vpdpbusd. Up to 4 rows share one pass over the weights, so small batches read them once;
    // larger batches take the cache-blocked path.
    const int rows = static_cast<int>(std::clamp<int64_t>(m, 1, 4));
    return {rows, max_tile_blocks(rows)};
  }
  if (isa == Isa::kAvx2) {
    return {2, 1};
  }
  return {4, 1};
}

void check_weight(const at::Tensor& w_packed, const at::Tensor& w_sums, const at::Tensor& w_scale, int64_t k) {
  TORCH_CHECK(w_packed.scalar_type() == at::kChar && w_packed.dim() == 4 && w_packed.size(2) == kBlockCols &&
                  w_packed.size(3) == 4 && w_packed.is_contiguous(),
              "int8_linear: expected w_packed to be a contiguous int8 tensor of shape (N_pad / 16, K_pad / 4, "
              "16, 4), but got ",
              w_packed.scalar_type(), " of shape ", w_packed.sizes());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 && w_scale.is_contiguous(),
              "int8_linear: expected w_scale to be a contiguous float32 vector, but got ", w_scale.scalar_type(),
              " of shape ", w_scale.sizes());
  const int64_t n = w_scale.size(0);
  TORCH_CHECK(w_packed.size(0) == (n + kBlockCols - 1) / kBlockCols,
              "int8_linear: expected w_packed.size(0) == ceil(N / 16) == ", (n + kBlockCols - 1) / kBlockCols,
              " for N = ", n, " output features, but got ", w_packed.size(0));
  TORCH_CHECK(w_packed.size(1) == (k + 3) / 4, "int8_linear: the input's last dimension is K = ", k,
              ", but w_packed holds ", w_packed.size(1), " groups of 4 inputs, for K in [",
              4 * w_packed.size(1) - 3, ", ", 4 * w_packed.size(1), "]");
  TORCH_CHECK(w_sums.scalar_type() == at::kInt && w_sums.dim() == 1 && w_sums.size(0) == n &&
                  w_sums.is_contiguous(),
              "int8_linear: expected w_sums to be a contiguous int32 vector of ", n, " elements, but got ",
              w_sums.scalar_type(), " of shape ", w_sums.sizes());
}

// Cache blocking of the AVX-512 kernel for batches above 4 rows. A task owns a panel of up to
// kPanelRows activation rows by kPanelBlocks weight blocks (64 output columns) and walks K in
// slabs of kSlabGroups groups of 4 inputs: the slab of weights (128 KiB) stays in L2 while every
// 4-row tile of the panel passes over it, and the panel's int32 sums wait in a buffer between
// slabs. Consecutive tasks take the row panels of one column tile, so its weights (K x 64 bytes)
// stay in L2 from one panel to the next.
// Measured on Zen 5 at (4096, 4096), M = 512: slabs of 256 or 1024 inputs, or 6-row tiles, were
// no faster; the kernel reaches about 85% of the vpdpbusd peak once the tile sums stay in registers.
constexpr int64_t kPanelRows = 96;
constexpr int kPanelTileRows = 4;
constexpr int kPanelBlocks = 4;
constexpr int64_t kSlabGroups = 512;

// Rows per panel: at most kPanelRows, spread evenly over the panels that M needs (in multiples of
// 16, one AMX tile), so that threads splitting the tasks get equal work.
int64_t panel_rows_for(int64_t m) {
  const int64_t panels = std::max<int64_t>(1, (m + kPanelRows - 1) / kPanelRows);
  return std::min<int64_t>(kPanelRows, round_up((m + panels - 1) / panels, 16));
}

// Task t of the blocked kernels: column tile t / row_panels, row panel t % row_panels. Each half of
// the task range, as at::parallel_for gives it to two threads, contains whole column tiles.
struct Panel {
  int64_t m0;    // first activation row
  int64_t b0;    // first weight block
  int64_t rows;  // activation rows, at most kPanelRows
  int blocks;    // weight blocks, at most kPanelBlocks
  int64_t n0;    // first output column
};

Panel panel_at(int64_t t, int64_t m, int64_t panel_rows, int64_t row_panels, int64_t col_blocks) {
  const int64_t m0 = (t % row_panels) * panel_rows;
  const int64_t b0 = (t / row_panels) * kPanelBlocks;
  return {m0, b0, std::min<int64_t>(panel_rows, m - m0),
          static_cast<int>(std::min<int64_t>(kPanelBlocks, col_blocks - b0)), b0 * kBlockCols};
}

void blocked_gemm_avx512(const uint8_t* q_ptr, const int8_t* w_ptr, int64_t m, int64_t n, int64_t groups,
                         int64_t col_blocks, const Epilogue& e) {
  const int64_t ldx = groups * 4;
  const int64_t block_bytes = groups * 64;
  const int64_t panel_rows_max = panel_rows_for(m);
  const int64_t row_panels = (m + panel_rows_max - 1) / panel_rows_max;
  const int64_t col_tiles = (col_blocks + kPanelBlocks - 1) / kPanelBlocks;
  at::parallel_for(0, row_panels * col_tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t acc[kPanelRows * kAccStride];
    for (int64_t t = begin; t < end; ++t) {
      const Panel panel = panel_at(t, m, panel_rows_max, row_panels, col_blocks);
      const int64_t m0 = panel.m0, b0 = panel.b0, panel_rows = panel.rows, n0 = panel.n0;
      const int blocks = panel.blocks;
      // At least one slab, so that K = 0 still writes zero sums.
      for (int64_t g0 = 0; g0 == 0 || g0 < groups; g0 += kSlabGroups) {
        const int64_t slab = std::min<int64_t>(kSlabGroups, groups - g0);
        const int8_t* w = w_ptr + b0 * block_bytes + g0 * 64;
        for (int64_t i0 = 0; i0 < panel_rows; i0 += kPanelTileRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kPanelTileRows, panel_rows - i0));
          avx512_tile(rows, blocks)(q_ptr + (m0 + i0) * ldx + 4 * g0, ldx, w, block_bytes, slab, g0 > 0,
                                    acc + i0 * kAccStride);
        }
      }
      const int64_t cols = std::min<int64_t>(blocks * kBlockCols, n - n0);
      epilogue_avx512(acc, static_cast<int>(panel_rows), m0, n0, cols, e);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// AMX: the tile form of the same product. An A tile is 16 activation rows by 64 inputs (uint8). A B
// tile is 16 groups of 4 inputs of one 16-column weight block, which is exactly one block of the
// packed layout (16 rows of 64 bytes). tdpbusd adds their product to a 16 x 16 int32 tile and wraps
// around as vpdpbusd does. A task walks the same panels as the AVX-512 path, 32 rows by 2 blocks at
// a time, and holds the four sum tiles (tmm0-3) over the whole of K. The AVX-512 tiles add the
// inputs past the last multiple of 64.

struct alignas(64) AmxConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0, tmm1: sums of the first 16 rows (blocks j, j + 1); tmm2, tmm3: of the next rows1 rows;
// tmm4, tmm5: their activations; tmm6, tmm7: the two weight blocks.
__attribute__((target("amx-tile,amx-int8"))) void configure_amx(int rows0, int rows1) {
  AmxConfig config{};
  config.palette_id = 1;
  const int rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, 16, 16};
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = static_cast<uint8_t>(std::max(rows[t], 1));
    config.colsb[t] = 64;
  }
  // GCC 12's _tile_loadconfig declares a read of only part of the 64 bytes, so the compiler may drop
  // the stores above. This barrier keeps them.
  __asm__ __volatile__("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

template <bool kTwoRowTiles, bool kTwoBlocks>
__attribute__((target("amx-tile,amx-int8"))) void amx_tiles(const uint8_t* qx, int64_t ldx, const int8_t* w,
                                                             int64_t block_bytes, int64_t steps, int32_t* acc) {
  constexpr int64_t kAccBytes = kAccStride * sizeof(int32_t);
  _tile_zero(0);
  if constexpr (kTwoBlocks) {
    _tile_zero(1);
  }
  if constexpr (kTwoRowTiles) {
    _tile_zero(2);
    if constexpr (kTwoBlocks) {
      _tile_zero(3);
    }
  }
  for (int64_t step = 0; step < steps; ++step) {
    _tile_loadd(4, qx + 64 * step, ldx);
    _tile_loadd(6, w + 1024 * step, 64);
    if constexpr (kTwoBlocks) {
      _tile_loadd(7, w + block_bytes + 1024 * step, 64);
    }
    _tile_dpbusd(0, 4, 6);
    if constexpr (kTwoBlocks) {
      _tile_dpbusd(1, 4, 7);
    }
    if constexpr (kTwoRowTiles) {
      _tile_loadd(5, qx + 16 * ldx + 64 * step, ldx);
      _tile_dpbusd(2, 5, 6);
      if constexpr (kTwoBlocks) {
        _tile_dpbusd(3, 5, 7);
      }
    }
  }
  _tile_stored(0, acc, kAccBytes);
  if constexpr (kTwoBlocks) {
    _tile_stored(1, acc + kBlockCols, kAccBytes);
  }
  if constexpr (kTwoRowTiles) {
    _tile_stored(2, acc + 16 * kAccStride, kAccBytes);
    if constexpr (kTwoBlocks) {
      _tile_stored(3, acc + 16 * kAccStride + kBlockCols, kAccBytes);
    }
  }
}

__attribute__((target("amx-tile"))) void release_amx() { _tile_release(); }

// Needs groups >= 16 (one full step of 64 inputs).
void blocked_gemm_amx(const uint8_t* q_ptr, const int8_t* w_ptr, int64_t m, int64_t n, int64_t groups,
                      int64_t col_blocks, const Epilogue& e) {
  const int64_t ldx = groups * 4;
  const int64_t block_bytes = groups * 64;
  const int64_t steps = groups / 16;
  const int64_t tail_group = steps * 16;
  const int64_t panel_rows_max = panel_rows_for(m);
  const int64_t row_panels = (m + panel_rows_max - 1) / panel_rows_max;
  const int64_t col_tiles = (col_blocks + kPanelBlocks - 1) / kPanelBlocks;
  at::parallel_for(0, row_panels * col_tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t acc[kPanelRows * kAccStride];
    int configured = -1;
    for (int64_t t = begin; t < end; ++t) {
      const Panel panel = panel_at(t, m, panel_rows_max, row_panels, col_blocks);
      const int64_t m0 = panel.m0, b0 = panel.b0, panel_rows = panel.rows, n0 = panel.n0;
      const int blocks = panel.blocks;
      for (int64_t i0 = 0; i0 < panel_rows; i0 += 32) {
        const int rows0 = static_cast<int>(std::min<int64_t>(16, panel_rows - i0));
        const int rows1 = static_cast<int>(std::clamp<int64_t>(panel_rows - i0 - 16, 0, 16));
        if (configured != rows0 * 32 + rows1) {
          configure_amx(rows0, rows1);
          configured = rows0 * 32 + rows1;
        }
        const uint8_t* qx = q_ptr + (m0 + i0) * ldx;
        for (int j = 0; j < blocks; j += 2) {
          const int8_t* w = w_ptr + (b0 + j) * block_bytes;
          int32_t* tile_acc = acc + i0 * kAccStride + j * kBlockCols;
          const bool two_blocks = j + 1 < blocks;
          if (rows1 > 0) {
            (two_blocks ? amx_tiles<true, true> : amx_tiles<true, false>)(qx, ldx, w, block_bytes, steps, tile_acc);
          } else {
            (two_blocks ? amx_tiles<false, true> : amx_tiles<false, false>)(qx, ldx, w, block_bytes, steps,
                                                                            tile_acc);
          }
        }
      }
      if (tail_group < groups) {
        const int8_t* w = w_ptr + b0 * block_bytes + tail_group * 64;
        for (int64_t i0 = 0; i0 < panel_rows; i0 += kPanelTileRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kPanelTileRows, panel_rows - i0));
          avx512_tile(rows, blocks)(q_ptr + (m0 + i0) * ldx + 4 * tail_group, ldx, w, block_bytes,
                                    groups - tail_group, true, acc + i0 * kAccStride);
        }
      }
      const int64_t cols = std::min<int64_t>(blocks * kBlockCols, n - n0);
      epilogue_avx512(acc, static_cast<int>(panel_rows), m0, n0, cols, e);
    }
    if (configured >= 0) {
      release_amx();
    }
  });
}

at::Tensor int8_linear_cpu(const at::Tensor& x_in, const at::Tensor& w_packed, const at::Tensor& w_sums,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& x_scale,
                           const std::optional<at::Tensor>& x_zero_point) {
  const char* op = "int8_linear";
  TORCH_CHECK(x_in.dim() >= 1, op, ": expected an input with at least 1 dimension, but got a 0-dim tensor");
  const int64_t k = x_in.size(-1);
  check_weight(w_packed, w_sums, w_scale, k);
  const int64_t n = w_scale.size(0);
  const int64_t groups = w_packed.size(1);
  const int64_t col_blocks = w_packed.size(0);
  const float* bias_ptr = bias_data(bias, n, op);

  const at::Tensor x = rows_of(x_in, k, op);
  const int64_t m = x.size(0);
  const Isa isa = active_isa();
  const QuantizedActivations qa = quantize_activations(x, groups * 4, x_scale, x_zero_point, isa, op);
  at::Tensor out = at::empty({m, n}, x.options());

  const Epilogue e{qa.scale, qa.zero_point,
                   w_sums.const_data_ptr<int32_t>(), w_scale.const_data_ptr<float>(), bias_ptr,
                   out.mutable_data_ptr<float>(), n};
  const uint8_t* q_ptr = qa.q;
  const int8_t* w_ptr = w_packed.const_data_ptr<int8_t>();
  const int64_t ldx = groups * 4;
  const int64_t block_bytes = groups * 64;

  if (isa == Isa::kAmx && m > 4 && groups >= 16) {
    blocked_gemm_amx(q_ptr, w_ptr, m, n, groups, col_blocks, e);
    return out.view(output_shape(x_in, n));
  }
  if (has_avx512(isa) && m > 4) {
    blocked_gemm_avx512(q_ptr, w_ptr, m, n, groups, col_blocks, e);
    return out.view(output_shape(x_in, n));
  }
  if (isa == Isa::kAvx2 && m >= kAvx2MinRows) {
    blocked_gemm_avx2(q_ptr, w_ptr, m, n, groups, col_blocks, e);
    return out.view(output_shape(x_in, n));
  }

  const TileShape shape = tile_shape(isa, m);
  const int64_t row_tiles = (m + shape.rows - 1) / shape.rows;
  const int64_t col_tiles = (col_blocks + shape.blocks - 1) / shape.blocks;
  const int64_t macs_per_tile = std::max<int64_t>(1, shape.rows * shape.blocks * kBlockCols * ldx);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / macs_per_tile);

  // Tiles are ordered column tile first, so consecutive tiles reuse one weight panel from cache.
  at::parallel_for(0, row_tiles * col_tiles, grain, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t acc[kMaxTileRows * kAccStride];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t col_tile = t / row_tiles;
      const int64_t row_tile = t % row_tiles;
      const int64_t m0 = row_tile * shape.rows;
      const int rows = static_cast<int>(std::min<int64_t>(shape.rows, m - m0));
      const int64_t b0 = col_tile * shape.blocks;
      const int blocks = static_cast<int>(std::min<int64_t>(shape.blocks, col_blocks - b0));
      const int64_t n0 = b0 * kBlockCols;
      const int64_t cols = std::min<int64_t>(blocks * kBlockCols, n - n0);
      const uint8_t* qx = q_ptr + m0 * ldx;
      const int8_t* w = w_ptr + b0 * block_bytes;

      if (has_avx512(isa)) {
        avx512_tile(rows, blocks)(qx, ldx, w, block_bytes, groups, false, acc);
        epilogue_avx512(acc, rows, m0, n0, cols, e);
      } else if (isa == Isa::kAvx2) {
        if (rows == 2) {
          tile_avx2<2>(qx, ldx, w, groups, acc);
        } else {
          tile_avx2<1>(qx, ldx, w, groups, acc);
        }
        epilogue_avx2(acc, rows, m0, n0, cols, e);
      } else {
        tile_scalar(qx, ldx, w, groups, rows, blocks, acc);
        epilogue_scalar(acc, rows, m0, n0, cols, e);
      }
    }
  });
  return out.view(output_shape(x_in, n));
}

}  // namespace
}  // namespace weightlight

TORCH_LIBRARY_IMPL(weightlight, CPU, m) { m.impl("int8_linear", &weightlight::int8_linear_cpu); }
