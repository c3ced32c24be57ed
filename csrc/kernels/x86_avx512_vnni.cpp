// The AVX512-VNNI kernels, for x86-64 CPUs with AVX-512 and AVX512_VNNI (Cascade Lake, Ice Lake, Zen 4 and later). The file is compiled with baseline flags;
// everything that uses these instructions must live inside a target region
// ("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma", GCC's target pragma or clang's attribute push), as in x86_avx512.cpp. The table
// holds only what these instructions make faster; every other entry comes from the ISAs below
// it in isa_list.h. On other architectures table() returns nullptr.
#include "qlora/kernels.h"

#if defined(__x86_64__)

namespace qlora {
namespace kernels {
namespace avx512_vnni {
namespace {
KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "avx512_vnni";
  t.required_features = kFeatureAvx512 | kFeatureAvx512Vnni;
  return t;
}
}  // namespace
const KernelTable* table() {
  static const KernelTable t = make_kernel_table();
  return &t;
}
}  // namespace avx512_vnni
}  // namespace kernels
}  // namespace qlora

#else

namespace qlora {
namespace kernels {
namespace avx512_vnni {
const KernelTable* table() { return nullptr; }
}  // namespace avx512_vnni
}  // namespace kernels
}  // namespace qlora

#endif
