// neon kernels: not written yet; the table is absent so dispatch never selects it.
#include "qlora/kernels.h"

namespace qlora {
namespace kernels {
namespace neon {
const KernelTable* table() { return nullptr; }
}  // namespace neon
}  // namespace kernels
}  // namespace qlora
