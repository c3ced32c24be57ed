// Runtime choice of kernels. CPU features are detected once; the ISAs of isa_list.h this CPU
// supports form a chain in priority order, and the active ISA is the first of them (or the one
// QLORA_FORCE_ISA / set_active_isa() names). Each entry of a table that an ISA leaves null is
// resolved from the next supported ISA below it, so a resolved table always has every entry.
// The forward's product kernel is chosen per call from precision, batch and layer layout by
// choose_gemm(). Every operation reads the choice once per call.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "qlora/kernels.h"

namespace qlora {

// Features of the CPU this process runs on (CpuFeature bits), detected once. On x86 with AMX,
// detection also asks the kernel for the tile-data permission; a refusal clears kFeatureAmx.
uint32_t cpu_features();
// Names of the detected features ("avx2", "avx512", "avx512_bf16", "amx", ...).
std::vector<std::string> cpu_feature_names();

// The active ISA's resolved table (its name is the active ISA). Throws std::invalid_argument on
// first use when QLORA_FORCE_ISA names an unknown or unsupported instruction set.
const KernelTable& active_kernels();

// Names of the ISAs built into this binary (with a table for this architecture), in priority
// order; those this CPU can run.
std::vector<std::string> compiled_isas();
std::vector<std::string> available_isas();

// The supported ISA named `name`, resolved (every entry filled from the chain below it); throws
// std::invalid_argument naming the choices otherwise.
const KernelTable& kernels_by_name(const std::string& name);
// The same ISA's own table, entries it does not provide left null (tests of one ISA's kernels).
const KernelTable& own_kernels_by_name(const std::string& name);

// Makes `name` the active ISA for all later calls (process-wide).
void set_active_isa(const std::string& name);

// The product kernel a forward uses for one batch chunk of `batch` rows.
struct GemmChoice {
  GemmKernel kernel;
  const char* isa = nullptr;      // the ISA whose table provided it
  Precision precision = Precision::kFp32;  // what it computes (may be fp32 for a fallback)
};
// Walks the active chain for `precision`: the first ISA with the entry whose min_batch <= batch.
// A reduced precision no SIMD ISA of the chain provides (or, for int8, a layer failing
// q8_layout_ok) runs in fp32: the fastest path at least as accurate. With `from` set, only that
// ISA's own entry is used (tests; throws std::invalid_argument when it has none).
GemmChoice choose_gemm(Precision precision, int64_t batch, const Nf4Weight& w,
                       const KernelTable* from = nullptr);

// The batch regimes of a precision on the active chain, for introspection: (first batch size,
// choice) pairs in increasing batch order, for a layer whose layout every kernel accepts.
std::vector<std::pair<int64_t, GemmChoice>> gemm_regimes(Precision precision);

}  // namespace qlora
