// CPU feature detection and kernel-table selection. On x86 a feature counts only when CPUID
// reports it AND XGETBV shows the OS saves the matching register state (OSXSAVE): a CPU with
// AVX-512 under an OS or hypervisor that does not save ZMM registers would fault otherwise.
#include "qlora/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#define QLORA_X86 1
#endif

namespace qlora {
namespace {

#if defined(QLORA_X86)
uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  // xgetbv with ecx = 0, written as bytes so no -mxsave is needed on the whole file.
  __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

uint32_t detect() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return kFeatureNone;
  __cpuid_count(1, 0, eax, ebx, ecx, edx);
  const bool osxsave = (ecx & (1u << 27)) != 0;
  const bool avx = (ecx & (1u << 28)) != 0;
  const bool fma = (ecx & (1u << 12)) != 0;
  if (!osxsave || !avx) return kFeatureNone;
  const uint64_t xcr0 = read_xcr0();
  const bool ymm_saved = (xcr0 & 0x6) == 0x6;            // SSE and AVX state
  const bool zmm_saved = (xcr0 & 0xe6) == 0xe6;          // plus opmask, ZMM_Hi256, Hi16_ZMM
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool avx2 = (ebx & (1u << 5)) != 0;
  const bool avx512f = (ebx & (1u << 16)) != 0;
  const bool avx512dq = (ebx & (1u << 17)) != 0;
  const bool avx512bw = (ebx & (1u << 30)) != 0;
  const bool avx512vl = (ebx & (1u << 31)) != 0;
  uint32_t f = kFeatureNone;
  if (ymm_saved && avx2 && fma) f |= kFeatureAvx2Fma;
  if ((f & kFeatureAvx2Fma) && zmm_saved && avx512f && avx512dq && avx512bw && avx512vl)
    f |= kFeatureAvx512;
  return f;
}
#elif defined(__aarch64__)
uint32_t detect() { return kFeatureNeon; }  // Advanced SIMD is mandatory on aarch64
#else
uint32_t detect() { return kFeatureNone; }
#endif

// Priority order: the first supported entry wins.
std::vector<const KernelTable*> built_tables() {
  std::vector<const KernelTable*> out;
  for (const KernelTable* t : {kernels::avx512::table(), kernels::avx2::table(),
                               kernels::neon::table(), kernels::scalar::table()}) {
    if (t != nullptr) out.push_back(t);
  }
  return out;
}

bool supported(const KernelTable& t) {
  return (t.required_features & cpu_features()) == t.required_features;
}

std::string choices() {
  std::string s;
  for (const std::string& n : available_isas()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

const KernelTable* initial_choice() {
  const char* forced = std::getenv("QLORA_FORCE_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    try {
      return &kernels_by_name(forced);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("QLORA_FORCE_ISA: ") + e.what());
    }
  }
  for (const KernelTable* t : built_tables()) {
    if (supported(*t)) return t;
  }
  return kernels::scalar::table();
}

std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

uint32_t cpu_features() {
  static const uint32_t features = detect();
  return features;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (const KernelTable* t : built_tables()) out.emplace_back(t->name);
  return out;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const KernelTable* t : built_tables()) {
    if (supported(*t)) out.emplace_back(t->name);
  }
  return out;
}

const KernelTable& kernels_by_name(const std::string& name) {
  for (const KernelTable* t : built_tables()) {
    if (name == t->name) {
      if (!supported(*t)) {
        throw std::invalid_argument("instruction set '" + name +
                                    "' is built in but this CPU does not support it; choose one of: " +
                                    choices());
      }
      return *t;
    }
  }
  throw std::invalid_argument("unknown instruction set '" + name + "'; choose one of: " + choices());
}

const KernelTable& active_kernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (t == nullptr) {
    // Throws on a bad QLORA_FORCE_ISA and leaves the choice unset, so every call reports it.
    const KernelTable* chosen = initial_choice();
    const KernelTable* expected = nullptr;
    g_active.compare_exchange_strong(expected, chosen, std::memory_order_acq_rel);
    t = g_active.load(std::memory_order_acquire);
  }
  return *t;
}

void set_active_isa(const std::string& name) {
  g_active.store(&kernels_by_name(name), std::memory_order_release);
}

}  // namespace qlora
