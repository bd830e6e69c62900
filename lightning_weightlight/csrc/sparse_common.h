// Checks of the block-compressed sparse row (BSR) weight format shared by the sparse kernels.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace weightlight {

// Check row_ptr (int32, block_rows + 1, non-decreasing from 0 to nblocks) and col_idx (int16
// containing unsigned block column indices, each below block_cols_total). A kernel that masks its
// reads by the index range and reports an index out of range itself passes check_indices = false,
// which skips the scan of col_idx (a read of 2 bytes per block on every call).
void check_block_rows(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t block_rows,
                      int64_t block_cols_total, const char* op, bool check_indices = true);

}  // namespace weightlight
