// Quantization of float32 activations to uint8, shared by the int8 GEMM kernels.
#pragma once

#include <cstdint>

#include "isa.h"

namespace weightlight {

// Quantize one row of k floats to uint8 with the per-row numerics of quantize_per_row.
void quantize_row(const float* x, int64_t k, uint8_t* q, float* scale, int32_t* zero_point, Isa isa);

// Quantize one row of k floats with a fixed scale and zero point:
// q = clamp(round_half_even(x / scale) + zero_point, 0, 255), with a true float32 division.
void quantize_row_static(const float* x, int64_t k, float scale, int32_t zero_point, uint8_t* q, Isa isa);

}  // namespace weightlight
