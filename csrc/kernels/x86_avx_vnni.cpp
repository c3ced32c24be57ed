// The AVX-VNNI kernels, for x86-64 CPUs with AVX2 and AVX-VNNI (Alder Lake, Zen 5 and later). The file is compiled with baseline flags;
// everything that uses these instructions must live inside a target region
// ("avxvnni,avx2,fma", GCC's target pragma or clang's attribute push), as in x86_avx512.cpp. The table
// holds only what these instructions make faster; every other entry comes from the ISAs below
// it in isa_list.h. On other architectures table() returns nullptr.
#include "qlora/kernels.h"

#if defined(__x86_64__)

namespace qlora {
namespace kernels {
namespace avx_vnni {
namespace {
KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "avx_vnni";
  t.required_features = kFeatureAvx2Fma | kFeatureAvxVnni;
  return t;
}
}  // namespace
const KernelTable* table() {
  static const KernelTable t = make_kernel_table();
  return &t;
}
}  // namespace avx_vnni
}  // namespace kernels
}  // namespace qlora

#else

namespace qlora {
namespace kernels {
namespace avx_vnni {
const KernelTable* table() { return nullptr; }
}  // namespace avx_vnni
}  // namespace kernels
}  // namespace qlora

#endif
