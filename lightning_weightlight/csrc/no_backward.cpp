// Autograd kernels of the GEMM operators. The deploy modules are inference-only: a result that
// needs a gradient gets a graph node whose backward raises a clear error. Without these kernels,
// backward returned no gradient and torch only warned. A Python autograd registration did the
// same job but added about 10 us to every call in grad mode, so this lives in C++.
#include <string>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

namespace weightlight {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

std::string no_backward_message(const char* op) {
  return std::string("weightlight::") + op +
         " has no backward: the deploy modules are inference-only. Run them under torch.inference_mode() or "
         "torch.no_grad(), or train the float module from to_float() instead.";
}

// Run `kernel` below autograd. When any of `inputs` needs a gradient, attach to the result a graph
// node whose backward raises.
template <typename Kernel, typename... Inputs>
at::Tensor run_without_backward(const char* op, const Kernel& kernel, const Inputs&... inputs) {
  const bool needs_grad = torch::autograd::compute_requires_grad(inputs...);
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = kernel();
  }
  if (needs_grad) {
    auto node = c10::make_intrusive<torch::autograd::Error>(no_backward_message(op),
                                                            torch::autograd::collect_next_edges(inputs...));
    torch::autograd::set_history(out, node);
  }
  return out;
}

at::Tensor int8_linear_autograd(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_sums,
                                const at::Tensor& w_scale, const OptionalTensor& bias, const OptionalTensor& x_scale,
                                const OptionalTensor& x_zero_point) {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("weightlight::int8_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const OptionalTensor&, const OptionalTensor&, const OptionalTensor&)>();
  return run_without_backward(
      "int8_linear", [&] { return handle.call(x, w_packed, w_sums, w_scale, bias, x_scale, x_zero_point); }, x,
      w_scale, bias, x_scale);
}

at::Tensor sparse_linear_autograd(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                  const at::Tensor& values, const OptionalTensor& bias, int64_t out_features) {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("weightlight::sparse_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const OptionalTensor&, int64_t)>();
  return run_without_backward(
      "sparse_linear", [&] { return handle.call(x, row_ptr, col_idx, values, bias, out_features); }, x, values,
      bias);
}

at::Tensor sparse_int8_linear_autograd(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& group_idx,
                                       const at::Tensor& values, const at::Tensor& w_sums, const at::Tensor& w_scale,
                                       const OptionalTensor& bias, const OptionalTensor& x_scale,
                                       const OptionalTensor& x_zero_point) {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("weightlight::sparse_int8_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                            const OptionalTensor&)>();
  return run_without_backward(
      "sparse_int8_linear",
      [&] { return handle.call(x, row_ptr, group_idx, values, w_sums, w_scale, bias, x_scale, x_zero_point); }, x,
      w_scale, bias, x_scale);
}

}  // namespace
}  // namespace weightlight

TORCH_LIBRARY_IMPL(weightlight, Autograd, m) {
  m.impl("int8_linear", &weightlight::int8_linear_autograd);
  m.impl("sparse_linear", &weightlight::sparse_linear_autograd);
  m.impl("sparse_int8_linear", &weightlight::sparse_int8_linear_autograd);
}
