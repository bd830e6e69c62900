#include "isa.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>

#include <c10/util/Exception.h>

namespace weightlight {
namespace {

// Linux grants the AMX tile data state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA, Linux 5.16 and newer). A tile instruction without it raises SIGILL.
bool amx_permitted() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

Isa detect_cpu_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
    static const bool amx = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
                            amx_permitted();
    return amx ? Isa::kAmx : Isa::kAvx512Vnni;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
  return Isa::kScalar;
}

// `source` names where the value came from (the environment variable or set_isa) in the error.
Isa parse_isa(const std::string& name, Isa best, const char* source) {
  if (name == "auto") {
    return best;
  }
  Isa requested;
  if (name == "scalar") {
    requested = Isa::kScalar;
  } else if (name == "avx2") {
    requested = Isa::kAvx2;
  } else if (name == "avx512") {
    requested = Isa::kAvx512Vnni;
  } else if (name == "amx") {
    requested = Isa::kAmx;
  } else {
    TORCH_CHECK(false, source, ": expected one of 'auto', 'scalar', 'avx2', 'avx512', 'amx', but got '", name,
                "'");
  }
  // A request above what the CPU supports falls back to the best supported set.
  return static_cast<int>(requested) < static_cast<int>(best) ? requested : best;
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot([] {
    // An unset or empty variable means "auto". The Python package rejects other invalid values at
    // import, with the same message.
    const char* env = std::getenv("WEIGHTLIGHT_ISA");
    const std::string name = env == nullptr || *env == '\0' ? "auto" : env;
    return static_cast<int>(parse_isa(name, detect_cpu_isa(), "WEIGHTLIGHT_ISA"));
  }());
  return slot;
}

bool default_gathers() {
  __builtin_cpu_init();
  return __builtin_cpu_is("intel") != 0;
}

std::atomic<bool>& gathers_slot() {
  static std::atomic<bool> slot(default_gathers());
  return slot;
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

std::string set_isa(const std::string& name) {
  Isa isa = parse_isa(name, detect_cpu_isa(), "set_isa");
  isa_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return isa_name(isa);
}

bool use_gathers() { return gathers_slot().load(std::memory_order_relaxed); }

std::string set_gathers(const std::string& mode) {
  TORCH_CHECK(mode == "auto" || mode == "on" || mode == "off",
              "set_gathers: expected one of 'auto', 'on', 'off', but got '", mode, "'");
  const bool gathers = mode == "auto" ? default_gathers() : mode == "on";
  gathers_slot().store(gathers, std::memory_order_relaxed);
  return gathers ? "on" : "off";
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx:
      return "amx";
    case Isa::kAvx512Vnni:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace weightlight
