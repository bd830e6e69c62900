// zero_pruned_: set to zero, in place, the entries of float32 tensors that a boolean mask prunes.
//
// The pruning callbacks run it on every pruned weight's gradient before each optimizer step, and
// on the weight after the step when the optimizer could have moved it. These passes stream tensors
// much larger than the caches, so the kernel reads the one-byte mask and the tensor, and stores
// zeros only into the pruned lanes of a group of 64 entries that contains a nonzero pruned value.
// A weight that is already masked is therefore only read, where a float mask multiply would also
// read four bytes of mask per entry and write every entry back.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include "isa.h"

namespace weightlight {
namespace {

constexpr int64_t kGroup = 64;  // entries per AVX-512 step: one 64-byte load of the mask

void zero_pruned_scalar(float* data, const uint8_t* keep, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    if (keep[i] == 0 && data[i] != 0.0f) {
      data[i] = 0.0f;
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void zero_pruned_avx512(float* data, const uint8_t* keep,
                                                                               int64_t begin, int64_t end) {
  const __m512 zero = _mm512_setzero_ps();
  int64_t i = begin;
  for (; i + kGroup <= end; i += kGroup) {
    const __m512i mask_bytes = _mm512_loadu_si512(static_cast<const void*>(keep + i));
    const __mmask64 pruned = ~_mm512_test_epi8_mask(mask_bytes, mask_bytes);
    if (pruned == 0) {
      continue;
    }
    __mmask16 lanes[4];
    __mmask16 any = 0;
    for (int part = 0; part < 4; ++part) {
      const __mmask16 nonzero = _mm512_cmp_ps_mask(_mm512_loadu_ps(data + i + 16 * part), zero, _CMP_NEQ_UQ);
      lanes[part] = nonzero & static_cast<__mmask16>(pruned >> (16 * part));
      any |= lanes[part];
    }
    if (any != 0) {
      for (int part = 0; part < 4; ++part) {
        _mm512_mask_storeu_ps(data + i + 16 * part, lanes[part], zero);
      }
    }
  }
  zero_pruned_scalar(data, keep, i, end);
}

void zero_pruned_cpu(at::TensorList tensors, at::TensorList keeps) {
  const char* op = "zero_pruned_";
  TORCH_CHECK(tensors.size() == keeps.size(), op, ": expected one mask per tensor, but got ", tensors.size(),
              " tensors and ", keeps.size(), " masks");
  for (size_t t = 0; t < tensors.size(); ++t) {
    const at::Tensor& tensor = tensors[t];
    const at::Tensor& keep = keeps[t];
    TORCH_CHECK(tensor.scalar_type() == at::kFloat && tensor.is_contiguous(), op,
                ": expected contiguous float32 tensors, but tensor ", t, " is ", tensor.scalar_type(),
                tensor.is_contiguous() ? "" : " and not contiguous");
    TORCH_CHECK(keep.scalar_type() == at::kBool && keep.is_contiguous(), op,
                ": expected contiguous bool masks, but mask ", t, " is ", keep.scalar_type(),
                keep.is_contiguous() ? "" : " and not contiguous");
    TORCH_CHECK(keep.sizes() == tensor.sizes(), op, ": mask ", t, " has shape ", keep.sizes(),
                ", but its tensor has shape ", tensor.sizes());
  }
  const bool avx512 = has_avx512(active_isa());
  for (size_t t = 0; t < tensors.size(); ++t) {
    float* data = tensors[t].mutable_data_ptr<float>();
    const uint8_t* keep = reinterpret_cast<const uint8_t*>(keeps[t].const_data_ptr<bool>());
    // Ranges start at multiples of the group, so each entry is handled by one thread.
    const int64_t groups = (tensors[t].numel() + kGroup - 1) / kGroup;
    const int64_t numel = tensors[t].numel();
    at::parallel_for(0, groups, 4096, [&](int64_t begin, int64_t end) {
      const int64_t first = begin * kGroup;
      const int64_t last = std::min(numel, end * kGroup);
      if (avx512) {
        zero_pruned_avx512(data, keep, first, last);
      } else {
        zero_pruned_scalar(data, keep, first, last);
      }
    });
  }
}

}  // namespace
}  // namespace weightlight

TORCH_LIBRARY_IMPL(weightlight, CPU, m) { m.impl("zero_pruned_", &weightlight::zero_pruned_cpu); }
