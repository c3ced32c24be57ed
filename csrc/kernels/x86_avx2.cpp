// avx2 kernels: not written yet; the table is absent so dispatch never selects it.
#include "qlora/kernels.h"

namespace qlora {
namespace kernels {
namespace avx2 {
const KernelTable* table() { return nullptr; }
}  // namespace avx2
}  // namespace kernels
}  // namespace qlora
