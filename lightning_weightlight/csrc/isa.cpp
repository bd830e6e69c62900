#include "isa.h"

#include <atomic>
#include <cstdlib>

#include <c10/util/Exception.h>

namespace weightlight {
namespace {

Isa detect_cpu_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
    return Isa::kAvx512Vnni;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
  return Isa::kScalar;
}

Isa parse_isa(const std::string& name, Isa best) {
  if (name.empty() || name == "auto") {
    return best;
  }
  Isa requested;
  if (name == "scalar") {
    requested = Isa::kScalar;
  } else if (name == "avx2") {
    requested = Isa::kAvx2;
  } else if (name == "avx512") {
    requested = Isa::kAvx512Vnni;
  } else {
    TORCH_CHECK(false, "WEIGHTLIGHT_ISA: expected one of 'auto', 'scalar', 'avx2', 'avx512', but got '",
                name, "'");
  }
  // A request above what the CPU supports falls back to the best supported set.
  return static_cast<int>(requested) < static_cast<int>(best) ? requested : best;
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot([] {
    const char* env = std::getenv("WEIGHTLIGHT_ISA");
    return static_cast<int>(parse_isa(env == nullptr ? "" : env, detect_cpu_isa()));
  }());
  return slot;
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

std::string set_isa(const std::string& name) {
  Isa isa = parse_isa(name, detect_cpu_isa());
  isa_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return isa_name(isa);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Vnni:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace weightlight
