// The AVX-VNNI kernels (int8 activations: quantize_q8 and gemm_nf4_q8), for x86-64 CPUs with AVX2
// and AVX-VNNI but without AVX-512 (Alder Lake, Zen 5 client and later): VEX-encoded vpdpbusd on
// YMM registers. The file is compiled with baseline flags; the kernels come from
// x86_q8_ymm_inl.h, which opens the target region "avxvnni,avx2,fma" (GCC's target pragma or
// clang's attribute push) around everything that uses these instructions. Every other entry
// comes from the ISAs below it in isa_list.h. On other architectures table() returns nullptr.
#include "qlora/kernels.h"

#if defined(__x86_64__)

#define QLORA_Q8_AVX_VNNI
#include "x86_q8_ymm_inl.h"
#undef QLORA_Q8_AVX_VNNI

namespace qlora {
namespace kernels {
namespace avx_vnni {
namespace {
KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "avx_vnni";
  t.required_features = kFeatureAvx2Fma | kFeatureAvxVnni;
  t.quantize_q8 = q8::quantize_q8;
  t.gemm_nf4_q8 = {q8::gemm_nf4_q8, 1, 1};
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
