// The aarch64 kernels that need the dot-product extension (sdot/udot, Armv8.2-A DotProd), in a
// target region ("arch=armv8.2-a+dotprod") so the file builds with baseline flags. The table holds
// only what these instructions make faster (the int8 path); every other entry comes from the
// plain NEON table below it in isa_list.h. Elsewhere table() returns nullptr.
#include "qlora/kernels.h"

#if defined(__aarch64__)

namespace qlora {
namespace kernels {
namespace neon_dot {
namespace {
KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "neon_dot";
  t.required_features = kFeatureNeon | kFeatureNeonDot;
  return t;
}
}  // namespace
const KernelTable* table() {
  static const KernelTable t = make_kernel_table();
  return &t;
}
}  // namespace neon_dot
}  // namespace kernels
}  // namespace qlora

#else

namespace qlora {
namespace kernels {
namespace neon_dot {
const KernelTable* table() { return nullptr; }
}  // namespace neon_dot
}  // namespace kernels
}  // namespace qlora

#endif
