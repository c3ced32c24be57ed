// The kernel contract: one KernelTable per instruction set (listed once, in isa_list.h), holding
// its name, the CPU features it needs and plain function pointers over POD arguments, named for
// what they compute and in which formats (gemm_nf4_f32: NF4 weight times float32 activations).
// A null entry means "this ISA has nothing faster": dispatch takes the entry from the next
// supported ISA below it. The scalar table fills every entry and is the executable
// specification; every SIMD entry must give bit-identical codes, scales and dequantized weights,
// and forward results within the bound of its precision stated in tests/ (precision.h defines
// each precision's rounding).
//
// Threading contract: the drivers in ops.cpp split work into ranges (rows of W, columns, groups,
// batch rows) and call the kernels on those ranges from several threads. A kernel must compute
// each output element in an order that does not depend on the range it was handed, so results
// are bit-identical for any thread count. Scratch memory is the kernel's own (thread_local).
#pragma once

#include <cstdint>

#include "qlora/isa_list.h"
#include "qlora/nf4.h"
#include "qlora/precision.h"

namespace qlora {

// CPU features a table may require (a bit set). Each counts only when the OS also saves the
// register state it needs (and, for AMX, grants this process the tile data).
enum CpuFeature : uint32_t {
  kFeatureNone = 0,
  kFeatureAvx2Fma = 1u << 0,     // AVX, AVX2, FMA, OS saves YMM
  kFeatureAvx512 = 1u << 1,      // AVX-512 F, BW, VL, DQ, OS saves ZMM
  kFeatureNeon = 1u << 2,        // aarch64 Advanced SIMD
  kFeatureAvx512Bf16 = 1u << 3,  // AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16)
  kFeatureAvx512Vnni = 1u << 4,  // AVX512_VNNI (vpdpbusd on ZMM)
  kFeatureAvxVnni = 1u << 5,     // AVX-VNNI (vpdpbusd on YMM, VEX-encoded)
  kFeatureAmx = 1u << 6,         // AMX-TILE, AMX-BF16, AMX-INT8, XCR0 17/18, permission granted
  kFeatureNeonDot = 1u << 7,     // aarch64 dot product (sdot/udot)
};

// Forward work is split into batch chunks of this many rows regardless of the thread count, so
// a kernel's choice of path (which may depend on its batch) never depends on the thread count.
inline constexpr int64_t kBatchChunk = 256;

// Everything a forward over a range of output rows reads and writes. The activations come in
// the form the kernel's precision needs, prepared once per call by the driver:
//   fp32: x;  bf16: x_bf16;  int8: x_q8, x_q8_scale, x_q8_sum.
struct ForwardArgs {
  Nf4Weight w;
  const float* x = nullptr;       // batch x in_features, row-major
  int64_t batch = 0;
  // bf16: batch x padded_cols(in_features) bfloat16 bit patterns, zero padding.
  const uint16_t* x_bf16 = nullptr;
  // int8: batch x padded_cols(in_features) int8 (zero padding) and, per row, one float32 scale
  // and one int32 sum of q per kQ8Block block (quantize_q8_block).
  const int8_t* x_q8 = nullptr;
  const float* x_q8_scale = nullptr;
  const int32_t* x_q8_sum = nullptr;
  // Fused LoRA term (fp32 kernels only; the drivers pass rank 0 and add LoRA with lora_up).
  const float* xa = nullptr;      // batch x rank: x @ A^T
  const float* lora_b = nullptr;  // out_features x rank
  int64_t rank = 0;               // 0: no LoRA term
  float scaling = 0.0f;
  const float* bias = nullptr;    // out_features, or nullptr
  float* y = nullptr;             // batch x out_features, row-major
};

// y[b, o] = sum over the product of x[b] and deq(W)[o] in the entry's precision (+ the fused
// LoRA term for fp32 kernels) + bias[o], for every batch row and every o in [row_begin, row_end).
using GemmFn = void (*)(const ForwardArgs& args, int64_t row_begin, int64_t row_end);

struct GemmKernel {
  GemmFn fn = nullptr;      // nullptr: take it from the next ISA
  int64_t row_block = 1;    // output rows are handed to fn in multiples of this (but the last)
  int64_t min_batch = 1;    // used only for batches (per chunk of kBatchChunk rows) >= this
};

// The transposed product of the backward over a range of rows of W:
//   dx[b, i] = sum over o in [row_begin, row_end) of g[b, o] * deq(W)[o, i].
struct TransposedArgs {
  Nf4Weight w;
  const float* g = nullptr;  // batch x out_features (whole rows, indexed by o)
  int64_t batch = 0;
  int64_t row_begin = 0;     // the rows o of W summed over; row_end <= out_features
  int64_t row_end = 0;
  float* dx = nullptr;       // batch x in_features, overwritten for the columns handed
};
// Computes dx for every batch row and columns [col_begin, col_end); col_begin is a multiple of
// the entry's col_block. Each element is one sum over o from row_begin to row_end - 1 in that
// order, starting from zero, whatever the column range.
using GemmTFn = void (*)(const TransposedArgs& args, int64_t col_begin, int64_t col_end);

// The driver (gemm_nf4t) cuts a batch-1 product into row blocks of this many rows (the last may
// be shorter), each task summing one block into its own partial dx while it streams that block
// of W contiguously, then adds the partials in block order: dx = ((p0 + p1) + p2) + ... A
// constant, never the thread count, so the result is the same for any number of threads.
inline constexpr int64_t kGemmTRowBlock = 512;

struct KernelTable {
  const char* name = nullptr;
  uint32_t required_features = kFeatureNone;

  // absmax[g - g_begin] = max |w| for groups [g_begin, g_end) of the flat weight of n_total
  // elements (the driver then clamps a partial last group to kMinAbsmax, as bitsandbytes does).
  void (*group_absmax)(const float* w, int64_t n_total, int64_t group_size, int64_t g_begin,
                       int64_t g_end, float* absmax) = nullptr;

  // Codes of rows [row_begin, row_end) of W (row-major, in_features columns) into the packed
  // layout, given every group's absmax m. With m' = max(m, kMinAbsmax), full groups scale by the
  // float32 reciprocal w * (1 / m'), the partial last group divides w / m' (bitsandbytes'
  // arithmetic); then clamp to [-1, 1] and take nearest_nf4. All-zero groups give kNf4ZeroCode.
  void (*quantize_rows)(const float* w, int64_t in_features, int64_t n_total, int64_t group_size,
                        const float* absmax, int64_t row_begin, int64_t row_end,
                        uint8_t* codes) = nullptr;

  // out[(r - row_begin) * in_features + c] = codebook[code] * scale, for rows in the range.
  void (*dequantize_rows)(const Nf4Weight& w, int64_t row_begin, int64_t row_end,
                          float* out) = nullptr;

  // xa[b * rank + k] = dot(x[b, :], a[k, :]) for batch rows [b_begin, b_end).
  void (*lora_down)(const float* x, int64_t in_features, const float* a, int64_t rank,
                    int64_t b_begin, int64_t b_end, float* xa) = nullptr;

  // The LoRA expansion of one adapter over some batch rows: for j < n_rows, row r = rows[j]
  // (or j when rows is null) and o in [o_begin, o_end):
  //   y[r * out_features + o] += s_j * dot(u[j * rank .. + rank], b[o * rank .. + rank])
  // with s_j = row_scale[j], or `scaling` when row_scale is null. The dot is summed over k in
  // increasing order, then multiplied by s_j, then added.
  void (*lora_up)(const float* u, int64_t rank, const float* b, float scaling,
                  const float* row_scale, const int64_t* rows, int64_t n_rows,
                  int64_t out_features, int64_t o_begin, int64_t o_end, float* y) = nullptr;

  // Activations for the reduced precisions, rows [b_begin, b_end) of x (batch x in_features):
  // bf16: out[b * padded_cols(in) + c] = f32_to_bf16(x[b, c]), zero padding.
  void (*pack_bf16)(const float* x, int64_t in_features, int64_t b_begin, int64_t b_end,
                    uint16_t* out) = nullptr;
  // int8: quantize_q8_block over each 32-column block of each row; q is batch x padded_cols,
  // scale and sum are batch x (padded_cols / 32).
  void (*quantize_q8)(const float* x, int64_t in_features, int64_t b_begin, int64_t b_end,
                      int8_t* q, float* scale, int32_t* sum) = nullptr;

  // The forward product, one entry per precision (see precision.h for each one's arithmetic).
  GemmKernel gemm_nf4_f32;
  GemmKernel gemm_nf4_bf16;
  GemmKernel gemm_nf4_q8;

  // The backward's input gradient, fp32.
  GemmTFn gemm_nf4t_f32 = nullptr;
  int64_t col_block = kBlockCols;
};

namespace kernels {
// Each ISA of isa_list.h: its table, or nullptr when not built for this architecture.
#define QLORA_DECLARE_ISA(name, cls) \
  namespace name {                   \
  const KernelTable* table();        \
  }
QLORA_ISA_LIST(QLORA_DECLARE_ISA)
#undef QLORA_DECLARE_ISA
}  // namespace kernels

}  // namespace qlora
