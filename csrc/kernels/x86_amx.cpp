// The AMX (AMX-TILE, AMX-BF16, AMX-INT8) kernels, for x86-64 CPUs with AMX and AVX-512 (Sapphire Rapids and later). The file is compiled with baseline flags;
// everything that uses these instructions must live inside a target region
// ("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx2,fma", GCC's target pragma or clang's attribute push), as in x86_avx512.cpp. The table
// holds only what these instructions make faster; every other entry comes from the ISAs below
// it in isa_list.h. On other architectures table() returns nullptr.
#include "qlora/kernels.h"

#if defined(__x86_64__)

namespace qlora {
namespace kernels {
namespace amx {
namespace {
KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "amx";
  t.required_features = kFeatureAvx512 | kFeatureAvx512Bf16 | kFeatureAvx512Vnni | kFeatureAmx;
  return t;
}
}  // namespace
const KernelTable* table() {
  static const KernelTable t = make_kernel_table();
  return &t;
}
}  // namespace amx
}  // namespace kernels
}  // namespace qlora

#else

namespace qlora {
namespace kernels {
namespace amx {
const KernelTable* table() { return nullptr; }
}  // namespace amx
}  // namespace kernels
}  // namespace qlora

#endif
