// avx512 kernels: not written yet; the table is absent so dispatch never selects it.
#include "qlora/kernels.h"

namespace qlora {
namespace kernels {
namespace avx512 {
const KernelTable* table() { return nullptr; }
}  // namespace avx512
}  // namespace kernels
}  // namespace qlora
