// The kernel contract: one KernelTable per instruction set, holding its name, the CPU features
// it needs and plain function pointers over POD arguments. The scalar table is the executable
// specification; every SIMD table must produce bit-identical codes, scales and dequantized
// weights, and forward results within the float32 rounding bound stated in tests/.
//
// Threading contract: the drivers in ops.cpp split work into ranges (rows of W, groups, batch
// rows) and call the kernels on those ranges from several threads. A kernel must compute each
// output element in an order that does not depend on the range it was handed, so results are
// bit-identical for any thread count. Scratch memory is the kernel's own (thread_local).
#pragma once

#include <cstdint>

#include "qlora/nf4.h"

namespace qlora {

// CPU features a table may require (a bit set).
enum CpuFeature : uint32_t {
  kFeatureNone = 0,
  kFeatureAvx2Fma = 1u << 0,   // AVX, AVX2, FMA, OS saves YMM
  kFeatureAvx512 = 1u << 1,    // AVX-512 F, BW, VL, DQ, OS saves ZMM
  kFeatureNeon = 1u << 2,      // aarch64 Advanced SIMD
};

// Everything a forward over a range of output rows reads and writes.
struct ForwardArgs {
  Nf4Weight w;
  const float* x = nullptr;       // batch x in_features, row-major
  int64_t batch = 0;
  const float* xa = nullptr;      // batch x rank: x @ A^T, computed before forward_rows
  const float* lora_b = nullptr;  // out_features x rank
  int64_t rank = 0;               // 0: no LoRA term
  float scaling = 0.0f;
  const float* bias = nullptr;    // out_features, or nullptr
  float* y = nullptr;             // batch x out_features, row-major
};

struct KernelTable {
  const char* name;
  uint32_t required_features;

  // absmax[g - g_begin] = max |w| for groups [g_begin, g_end) of the flat weight of n_total
  // elements (the driver then clamps a partial last group to kMinAbsmax, as bitsandbytes does).
  void (*group_absmax)(const float* w, int64_t n_total, int64_t group_size, int64_t g_begin,
                       int64_t g_end, float* absmax);

  // Codes of rows [row_begin, row_end) of W (row-major, in_features columns) into the packed
  // layout, given every group's absmax m. With m' = max(m, kMinAbsmax), full groups scale by the
  // float32 reciprocal w * (1 / m'), the partial last group divides w / m' (bitsandbytes'
  // arithmetic); then clamp to [-1, 1] and take nearest_nf4. All-zero groups give kNf4ZeroCode.
  void (*quantize_rows)(const float* w, int64_t in_features, int64_t n_total, int64_t group_size,
                        const float* absmax, int64_t row_begin, int64_t row_end, uint8_t* codes);

  // out[(r - row_begin) * in_features + c] = codebook[code] * scale, for rows in the range.
  void (*dequantize_rows)(const Nf4Weight& w, int64_t row_begin, int64_t row_end, float* out);

  // xa[b * rank + k] = dot(x[b, :], a[k, :]) for batch rows [b_begin, b_end).
  void (*lora_down)(const float* x, int64_t in_features, const float* a, int64_t rank,
                    int64_t b_begin, int64_t b_end, float* xa);

  // y[b, o] = dot(x[b], deq(W)[o]) + scaling * dot(xa[b], B[o]) + bias[o] for every batch row
  // and every o in [row_begin, row_end).
  void (*forward_rows)(const ForwardArgs& args, int64_t row_begin, int64_t row_end);

  // Output rows are handed to forward_rows in multiples of this (except the last range).
  int64_t row_block;
};

namespace kernels {
namespace scalar {
const KernelTable* table();
}
namespace avx2 {
const KernelTable* table();  // nullptr when not built for this architecture
}
namespace avx512 {
const KernelTable* table();
}
namespace neon {
const KernelTable* table();
}
}  // namespace kernels

}  // namespace qlora
