// Operator schemas of the torch.ops.weightlight namespace, defined once. Each kernel family
// registers its CPU implementation in its own file with TORCH_LIBRARY_IMPL.
#include <string>

#include <torch/library.h>

#include "isa.h"

TORCH_LIBRARY(weightlight, m) {
  // Fake (meta) kernels live in this Python module; torch imports it when it traces an op.
  m.set_python_module("lightning_weightlight.kernels.ops");

  m.def("isa() -> str");
  m.def("set_isa(str name) -> str");
  m.def("set_gathers(str mode) -> str");
  m.def("quantize_per_row(Tensor x) -> (Tensor q, Tensor scale, Tensor zero_point)");
  // x (..., K) float32 -> (..., N) float32. Static activation quantization when x_scale and
  // x_zero_point are given (one-element tensors), dynamic per-row quantization otherwise.
  m.def(
      "int8_linear(Tensor x, Tensor w_packed, Tensor w_sums, Tensor w_scale, Tensor? bias=None, "
      "Tensor? x_scale=None, Tensor? x_zero_point=None) -> Tensor");
  m.def(
      "sparse_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias, "
      "int out_features) -> Tensor");
  m.def(
      "sparse_int8_linear(Tensor x, Tensor row_ptr, Tensor group_idx, Tensor values, Tensor w_sums, "
      "Tensor w_scale, Tensor? bias=None, Tensor? x_scale=None, Tensor? x_zero_point=None) -> Tensor");
  // tensors[i][~keeps[i]] = 0 in place: float32 tensors, bool masks of the same shapes.
  m.def("zero_pruned_(Tensor(a!)[] tensors, Tensor[] keeps) -> ()");
}

namespace {

std::string isa_op() { return weightlight::isa_name(weightlight::active_isa()); }

std::string set_isa_op(const std::string& name) { return weightlight::set_isa(name); }

std::string set_gathers_op(const std::string& mode) { return weightlight::set_gathers(mode); }

}  // namespace

TORCH_LIBRARY_IMPL(weightlight, CompositeExplicitAutograd, m) {
  m.impl("isa", isa_op);
  m.impl("set_isa", set_isa_op);
  m.impl("set_gathers", set_gathers_op);
}
