#include "sparse_common.h"

#include <immintrin.h>

#include <algorithm>

namespace weightlight {
namespace {

uint16_t max_index_scalar(const uint16_t* idx, int64_t count) {
  uint16_t best = 0;
  for (int64_t i = 0; i < count; ++i) {
    best = std::max(best, idx[i]);
  }
  return best;
}

__attribute__((target("avx2"))) uint16_t max_index_avx2(const uint16_t* idx, int64_t count) {
  __m256i best = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    best = _mm256_max_epu16(best, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + i)));
  }
  alignas(32) uint16_t lanes[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), best);
  return std::max(max_index_scalar(lanes, 16), max_index_scalar(idx + i, count - i));
}

uint16_t max_index(const at::Tensor& col_idx) {
  const uint16_t* idx = reinterpret_cast<const uint16_t*>(col_idx.const_data_ptr<int16_t>());
  const int64_t count = col_idx.size(0);
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? max_index_avx2(idx, count) : max_index_scalar(idx, count);
}

[[noreturn]] void index_error(uint16_t largest, int64_t block_cols_total, const char* op, const char* index_name) {
  TORCH_CHECK(false, op, ": expected every index in ", index_name, " to be below ", block_cols_total, ", but ",
              index_name, " contains ", largest);
  __builtin_unreachable();
}

}  // namespace

void raise_index_out_of_range(const at::Tensor& col_idx, int64_t block_cols_total, const char* op,
                              const char* index_name) {
  const uint16_t largest = max_index(col_idx);
  TORCH_CHECK(largest >= block_cols_total, op, ": a kernel reported an index in ", index_name, " of ",
              block_cols_total, " or more, but a scan found none");
  index_error(largest, block_cols_total, op, index_name);
}

void check_block_rows(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t block_rows,
                      int64_t block_cols_total, const char* op, bool check_indices, const char* index_name) {
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 1 && row_ptr.is_contiguous() &&
                  row_ptr.size(0) == block_rows + 1,
              op, ": expected row_ptr to be a contiguous int32 vector of ", block_rows + 1,
              " elements, but got ", row_ptr.scalar_type(), " of shape ", row_ptr.sizes());
  TORCH_CHECK(col_idx.scalar_type() == at::kShort && col_idx.dim() == 1 && col_idx.is_contiguous(), op,
              ": expected ", index_name, " to be a contiguous int16 vector, but got ", col_idx.scalar_type(),
              " of shape ", col_idx.sizes());
  TORCH_CHECK(block_cols_total <= 65536, op, ": the sparse format stores 16-bit column indices, so it supports ",
              "at most 65536 block columns, but got ", block_cols_total);
  const int32_t* ptr = row_ptr.const_data_ptr<int32_t>();
  TORCH_CHECK(ptr[0] == 0 && ptr[block_rows] == col_idx.size(0), op,
              ": expected row_ptr to run from 0 to the number of blocks ", col_idx.size(0), ", but got ", ptr[0],
              " to ", ptr[block_rows]);
  for (int64_t i = 0; i < block_rows; ++i) {
    TORCH_CHECK(ptr[i] <= ptr[i + 1], op, ": expected a non-decreasing row_ptr, but row_ptr[", i, "] = ", ptr[i],
                " > row_ptr[", i + 1, "] = ", ptr[i + 1]);
  }
  if (!check_indices) {
    return;
  }
  // Every index is read by the kernels, so a bad one would read out of bounds: check them all.
  if (col_idx.size(0) == 0) {
    return;
  }
  const uint16_t largest = max_index(col_idx);
  if (largest >= block_cols_total) {
    index_error(largest, block_cols_total, op, index_name);
  }
}

}  // namespace weightlight
