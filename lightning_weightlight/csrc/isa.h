// Run-time choice of the instruction set that the kernels use.
#pragma once

#include <string>

namespace weightlight {

// Ordered: each set includes the ones below it. kAmx is AVX-512 VNNI plus the AMX int8 tiles,
// which only the dense int8 GEMM uses; every other kernel runs its AVX-512 code under kAmx.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };

inline bool has_avx512(Isa isa) { return isa >= Isa::kAvx512Vnni; }

// The best instruction set this CPU supports, capped by the WEIGHTLIGHT_ISA environment
// variable ("scalar", "avx2", "avx512" or "amx") at first use and by set_isa() afterwards.
// AMX counts as supported only when the kernel grants this process the tile data state.
Isa active_isa();

// Cap the instruction set ("scalar", "avx2", "avx512", "amx" or "auto"); returns the name in effect.
std::string set_isa(const std::string& name);

const char* isa_name(Isa isa);

// Whether the AVX-512 kernels for one token gather their inputs with vgatherdps / vpgatherdd.
// Otherwise they build input vectors from scalar loads, as the AVX2 kernels do. The default is
// gathers on Intel CPUs and scalar loads on others. On AMD Zen 4, scalar loads were 1.2-3x faster.
bool use_gathers();

// "on", "off" or "auto" (the CPU's default); returns "on" or "off", the setting in effect.
std::string set_gathers(const std::string& mode);

}  // namespace weightlight
