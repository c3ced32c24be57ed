// Runtime choice of the kernel table: CPU features are detected once, the first supported table
// in priority order (avx512, avx2, neon, scalar) is chosen and cached, and QLORA_FORCE_ISA or
// set_active_isa() override it. Every operation reads the choice once per call.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qlora/kernels.h"

namespace qlora {

// Features of the CPU this process runs on (CpuFeature bits), detected once.
uint32_t cpu_features();

// The table every operation uses. Throws std::invalid_argument on first use when
// QLORA_FORCE_ISA names an unknown or unsupported instruction set.
const KernelTable& active_kernels();

// Names of the tables built into this binary, in priority order.
std::vector<std::string> compiled_isas();
// Names of the built tables this CPU can run, in priority order.
std::vector<std::string> available_isas();

// The supported table named `name`; throws std::invalid_argument naming the choices otherwise.
const KernelTable& kernels_by_name(const std::string& name);

// Makes `name` the active table for all later calls (process-wide).
void set_active_isa(const std::string& name);

}  // namespace qlora
