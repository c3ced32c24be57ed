// Checks specific to the aarch64 build (compiled only there, run under qemu-aarch64 in CI): the
// dispatcher must pick the NEON table by itself, so a cross build that silently fell back to
// scalar fails instead of passing the per-ISA tests with scalar alone.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "qlora/dispatch.h"

#if defined(__aarch64__)

TEST_CASE("aarch64 builds dispatch to the neon kernels") {
  const char* forced = std::getenv("QLORA_FORCE_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    WARN("QLORA_FORCE_ISA=" << forced << " is set; only checking that neon is available");
  } else {
    // neon_dot ranks first where the CPU has the dot product (qemu's default CPU has it).
    const bool dot = (qlora::cpu_features() & qlora::kFeatureNeonDot) != 0;
    CHECK(std::string(qlora::active_kernels().name) == (dot ? "neon_dot" : "neon"));
  }
  // neon ranks above scalar, so the per-ISA tests run both and compare them.
  const auto isas = qlora::available_isas();
  const auto neon = std::find(isas.begin(), isas.end(), "neon");
  const auto scalar = std::find(isas.begin(), isas.end(), "scalar");
  REQUIRE(neon != isas.end());
  REQUIRE(scalar != isas.end());
  CHECK(neon < scalar);
}

#endif
