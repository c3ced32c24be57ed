// CPU feature detection and kernel selection. On x86 a feature counts only when CPUID reports it
// AND XGETBV shows the OS saves the matching register state (OSXSAVE): a CPU with AVX-512 under
// an OS or hypervisor that does not save ZMM registers would fault otherwise. AMX additionally
// needs XCR0 bits 17/18 and the process's tile-data permission (arch_prctl), asked for here,
// once, before any thread pool starts; kernels ask again in each thread before their first tile
// instruction (cheap and idempotent), as newer kernels need.
#include "qlora/dispatch.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#define QLORA_X86 1
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
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

bool request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
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
  const bool tiles_saved = (xcr0 & 0x60000) == 0x60000;  // XTILECFG and XTILEDATA
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const unsigned max_sub7 = eax;
  const bool avx2 = (ebx & (1u << 5)) != 0;
  const bool avx512f = (ebx & (1u << 16)) != 0;
  const bool avx512dq = (ebx & (1u << 17)) != 0;
  const bool avx512bw = (ebx & (1u << 30)) != 0;
  const bool avx512vl = (ebx & (1u << 31)) != 0;
  const bool avx512vnni = (ecx & (1u << 11)) != 0;
  const bool amx_bf16 = (edx & (1u << 22)) != 0;
  const bool amx_tile = (edx & (1u << 24)) != 0;
  const bool amx_int8 = (edx & (1u << 25)) != 0;
  bool avx512bf16 = false, avxvnni = false;
  if (max_sub7 >= 1) {
    __cpuid_count(7, 1, eax, ebx, ecx, edx);
    avxvnni = (eax & (1u << 4)) != 0;
    avx512bf16 = (eax & (1u << 5)) != 0;
  }
  uint32_t f = kFeatureNone;
  if (ymm_saved && avx2 && fma) f |= kFeatureAvx2Fma;
  if ((f & kFeatureAvx2Fma) && avxvnni) f |= kFeatureAvxVnni;
  if ((f & kFeatureAvx2Fma) && zmm_saved && avx512f && avx512dq && avx512bw && avx512vl) {
    f |= kFeatureAvx512;
    if (avx512bf16) f |= kFeatureAvx512Bf16;
    if (avx512vnni) f |= kFeatureAvx512Vnni;
    if (tiles_saved && amx_tile && amx_bf16 && amx_int8 && request_amx_permission()) f |= kFeatureAmx;
  }
  return f;
}
#elif defined(__aarch64__)
uint32_t detect() {
  uint32_t f = kFeatureNeon;  // Advanced SIMD is mandatory on aarch64
#if defined(__linux__)
  constexpr unsigned long kHwcapAsimddp = 1ul << 20;
  if ((getauxval(AT_HWCAP) & kHwcapAsimddp) != 0) f |= kFeatureNeonDot;
#endif
  return f;
}
#else
uint32_t detect() { return kFeatureNone; }
#endif

// Every ISA of isa_list.h built for this architecture, in priority order.
std::vector<const KernelTable*> built_tables() {
  std::vector<const KernelTable*> out;
#define QLORA_ADD_ISA(name, cls) \
  if (const KernelTable* t = kernels::name::table()) out.push_back(t);
  QLORA_ISA_LIST(QLORA_ADD_ISA)
#undef QLORA_ADD_ISA
  return out;
}

bool supported(const KernelTable& t) {
  return (t.required_features & cpu_features()) == t.required_features;
}

// For each supported ISA: its chain (itself and every supported ISA below it) and its resolved
// table. Built once; never freed, so references stay valid for the process's life.
struct Resolved {
  std::vector<const KernelTable*> chain;
  KernelTable table;
};

template <class T>
void fill(T& dst, const T& src) {
  if (dst == nullptr) dst = src;
}
void fill(GemmKernel& dst, const GemmKernel& src) {
  if (dst.fn == nullptr) dst = src;
}

const std::vector<Resolved>& resolved_all() {
  static const std::vector<Resolved> all = [] {
    std::vector<const KernelTable*> sup;
    for (const KernelTable* t : built_tables()) {
      if (supported(*t)) sup.push_back(t);
    }
    std::vector<Resolved> out;
    for (size_t i = 0; i < sup.size(); ++i) {
      Resolved r;
      r.chain.assign(sup.begin() + static_cast<std::ptrdiff_t>(i), sup.end());
      r.table = *sup[i];
      r.table.gemm_nf4t_f32 = nullptr;  // filled with its col_block from the first ISA that has one
      for (const KernelTable* t : r.chain) {
        KernelTable& d = r.table;
        fill(d.group_absmax, t->group_absmax);
        fill(d.quantize_rows, t->quantize_rows);
        fill(d.dequantize_rows, t->dequantize_rows);
        fill(d.lora_down, t->lora_down);
        fill(d.lora_up, t->lora_up);
        fill(d.pack_bf16, t->pack_bf16);
        fill(d.quantize_q8, t->quantize_q8);
        fill(d.gemm_nf4_f32, t->gemm_nf4_f32);
        fill(d.gemm_nf4_bf16, t->gemm_nf4_bf16);
        fill(d.gemm_nf4_q8, t->gemm_nf4_q8);
        if (d.gemm_nf4t_f32 == nullptr && t->gemm_nf4t_f32 != nullptr) {
          d.gemm_nf4t_f32 = t->gemm_nf4t_f32;
          d.col_block = t->col_block;
        }
      }
      out.push_back(r);
    }
    return out;
  }();
  return all;
}

std::string choices() {
  std::string s;
  for (const std::string& n : available_isas()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

const Resolved& resolved_by_name(const std::string& name) {
  for (const Resolved& r : resolved_all()) {
    if (name == r.table.name) return r;
  }
  for (const KernelTable* t : built_tables()) {
    if (name == t->name) {
      throw std::invalid_argument("instruction set '" + name +
                                  "' is built in but this CPU does not support it; choose one of: " +
                                  choices());
    }
  }
  throw std::invalid_argument("unknown instruction set '" + name + "'; choose one of: " + choices());
}

const Resolved* initial_choice() {
  const char* forced = std::getenv("QLORA_FORCE_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    try {
      return &resolved_by_name(forced);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("QLORA_FORCE_ISA: ") + e.what());
    }
  }
  return &resolved_all().front();  // scalar is always supported, so the list is never empty
}

std::atomic<const Resolved*> g_active{nullptr};

const Resolved& active_resolved() {
  const Resolved* r = g_active.load(std::memory_order_acquire);
  if (r == nullptr) {
    // Throws on a bad QLORA_FORCE_ISA and leaves the choice unset, so every call reports it.
    const Resolved* chosen = initial_choice();
    const Resolved* expected = nullptr;
    g_active.compare_exchange_strong(expected, chosen, std::memory_order_acq_rel);
    r = g_active.load(std::memory_order_acquire);
  }
  return *r;
}

const GemmKernel& entry(const KernelTable& t, Precision p) {
  switch (p) {
    case Precision::kBf16: return t.gemm_nf4_bf16;
    case Precision::kInt8: return t.gemm_nf4_q8;
    case Precision::kFp32: break;
  }
  return t.gemm_nf4_f32;
}

}  // namespace

uint32_t cpu_features() {
  static const uint32_t features = detect();
  return features;
}

std::vector<std::string> cpu_feature_names() {
  static const std::array<std::pair<uint32_t, const char*>, 8> kNames = {{
      {kFeatureAvx2Fma, "avx2"},
      {kFeatureAvx512, "avx512"},
      {kFeatureAvx512Bf16, "avx512_bf16"},
      {kFeatureAvx512Vnni, "avx512_vnni"},
      {kFeatureAvxVnni, "avx_vnni"},
      {kFeatureAmx, "amx"},
      {kFeatureNeon, "neon"},
      {kFeatureNeonDot, "neon_dot"},
  }};
  std::vector<std::string> out;
  for (const auto& [bit, name] : kNames) {
    if ((cpu_features() & bit) != 0) out.emplace_back(name);
  }
  return out;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (const KernelTable* t : built_tables()) out.emplace_back(t->name);
  return out;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const Resolved& r : resolved_all()) out.emplace_back(r.table.name);
  return out;
}

const KernelTable& kernels_by_name(const std::string& name) { return resolved_by_name(name).table; }

const KernelTable& own_kernels_by_name(const std::string& name) {
  return *resolved_by_name(name).chain.front();
}

const KernelTable& active_kernels() { return active_resolved().table; }

void set_active_isa(const std::string& name) {
  g_active.store(&resolved_by_name(name), std::memory_order_release);
}

GemmChoice choose_gemm(Precision precision, int64_t batch, const Nf4Weight& w,
                       const KernelTable* from) {
  if (from != nullptr) {
    const GemmKernel& k = entry(*from, precision);
    if (k.fn == nullptr) {
      throw std::invalid_argument(std::string("instruction set '") + from->name + "' has no " +
                                  precision_name(precision) + " kernel");
    }
    return {k, from->name, precision};
  }
  const Resolved& r = active_resolved();
  const bool possible = precision != Precision::kInt8 || q8_layout_ok(w);
  if (possible) {
    for (const KernelTable* t : r.chain) {
      const GemmKernel& k = entry(*t, precision);
      if (k.fn == nullptr || batch < k.min_batch) continue;
      // The scalar emulation of a reduced precision is a specification, not a fast path.
      if (precision != Precision::kFp32 && t->required_features == kFeatureNone) break;
      return {k, t->name, precision};
    }
  }
  for (const KernelTable* t : r.chain) {
    const GemmKernel& k = t->gemm_nf4_f32;
    if (k.fn != nullptr && batch >= k.min_batch) return {k, t->name, Precision::kFp32};
  }
  return {r.table.gemm_nf4_f32, r.table.name, Precision::kFp32};
}

std::vector<std::pair<int64_t, GemmChoice>> gemm_regimes(Precision precision) {
  Nf4Weight w;  // a layout every kernel accepts: whole 32-column blocks in 64-element groups
  w.out_features = 64;
  w.in_features = 64;
  w.group_size = 64;
  w.num_groups = 64;
  std::vector<int64_t> starts = {1};
  for (const KernelTable* t : active_resolved().chain) {
    for (Precision p : {precision, Precision::kFp32}) {
      const int64_t m = entry(*t, p).min_batch;
      if (m > 1 && m <= kBatchChunk) starts.push_back(m);
    }
  }
  std::sort(starts.begin(), starts.end());
  starts.erase(std::unique(starts.begin(), starts.end()), starts.end());
  std::vector<std::pair<int64_t, GemmChoice>> out;
  for (int64_t b : starts) {
    const GemmChoice c = choose_gemm(precision, b, w);
    if (!out.empty() && out.back().second.kernel.fn == c.kernel.fn) continue;
    out.emplace_back(b, c);
  }
  return out;
}

}  // namespace qlora
