// Run-time choice of the instruction set that the kernels use.
#pragma once

#include <string>

namespace weightlight {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

// The best instruction set this CPU supports, capped by the WEIGHTLIGHT_ISA environment
// variable ("scalar", "avx2" or "avx512") at first use and by set_isa() afterwards.
Isa active_isa();

// Cap the instruction set ("scalar", "avx2", "avx512" or "auto"); returns the name in effect.
std::string set_isa(const std::string& name);

const char* isa_name(Isa isa);

}  // namespace weightlight
