// Compute precisions of the forward, and the exact scalar arithmetic each one is defined by:
// bfloat16 rounding, the int8 NF4 codebook and the Q8 activation blocks. Pure and
// ISA-independent; the scalar kernels use these helpers as the specification that every SIMD
// kernel of a precision is tested against.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "qlora/nf4.h"

namespace qlora {

// What the forward's products are computed in. The LoRA term and the bias are always fp32.
//  - kFp32: x and deq(W) in float32, products and sums in float32 (the default, exact).
//  - kBf16: x and each decoded weight codebook[c] * absmax rounded to bfloat16 (nearest even),
//           products summed in float32.
//  - kInt8: x quantized per row in blocks of kQ8Block (symmetric, one float32 scale per block),
//           weights as the int8 codebook kNf4Int8 times absmax / 127, block dot products exact
//           in int32, scaled and summed in float32.
enum class Precision : int { kFp32 = 0, kBf16 = 1, kInt8 = 2 };
inline constexpr int kNumPrecisions = 3;
inline const char* precision_name(Precision p) {
  switch (p) {
    case Precision::kFp32: return "fp32";
    case Precision::kBf16: return "bf16";
    case Precision::kInt8: return "int8";
  }
  return "?";
}

// ---------------------------------------------------------------- bfloat16
// The top 16 bits of a float32, rounded to nearest even. NaN stays a (quiet) NaN; overflow
// rounds to infinity as IEEE rounding does.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
// The bfloat16 value of codebook[code] * scale, as every bf16 kernel must decode a weight.
inline uint16_t nf4_bf16(uint8_t code, float scale) { return f32_to_bf16(kNf4Codebook[code] * scale); }

// Activations packed for the bf16 kernels: each row padded with zeros to a whole number of
// kBlockCols columns (the weight's packed row length), so kernels never need a column tail.
inline int64_t padded_cols(int64_t in_features) { return blocks_per_row(in_features) * kBlockCols; }

// ---------------------------------------------------------------- int8
// The NF4 codebook as int8, round(127 * v) (REFERENCE.md); a weight decodes to
// kNf4Int8[c] * absmax / 127.
inline constexpr int8_t kNf4Int8[16] = {-127, -88, -67, -50, -36, -23, -12, 0,
                                        10,   20,  31,  43,  56,  71,  92,  127};

// Activation blocks (llama.cpp's Q8_0 with a float32 scale): a row is cut into blocks of 32
// columns (a weight block of the packed layout), padded with zeros.
inline constexpr int64_t kQ8Block = 32;
static_assert(kQ8Block == kBlockCols, "a Q8 block is one packed weight block");

// Quantizes one block of n <= 32 values (the rest are zero): amax = max |x|, d = amax / 127,
// q = nearbyint(x * (127 / amax)) (ties to even, as the default rounding mode and SIMD
// conversions do). A block with amax = 0, or so small that 127 / amax overflows (below about
// 3.7e-37; its products are negligible), stores d = 0 and q = 0. A block holding a NaN or an
// infinity stores q = 0 and d = NaN or infinity, so the row's output becomes non-finite as it
// would in float32. Returns d; sum receives the sum of q (for kernels that offset operands).
inline float quantize_q8_block(const float* x, int64_t n, int8_t* q, int32_t* sum) {
  float amax = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    amax = std::fmax(amax, std::fabs(x[i]));
    nan = nan || std::isnan(x[i]);
  }
  int32_t s = 0;
  const float inv = 127.0f / amax;
  const bool usable = std::isfinite(amax) && !nan && amax > 0.0f && std::isfinite(inv);
  for (int64_t i = 0; i < kQ8Block; ++i) {
    const float v = (usable && i < n) ? std::nearbyint(x[i] * inv) : 0.0f;
    const int32_t qi = static_cast<int32_t>(std::fmin(127.0f, std::fmax(-127.0f, v)));
    q[i] = static_cast<int8_t>(qi);
    s += qi;
  }
  *sum = s;
  if (nan) return std::nanf("");
  if (!std::isfinite(amax)) return amax;
  return usable ? amax / 127.0f : 0.0f;
}

// The int8 kernels need every 32-column block of every row of W inside one scale group: true
// when groups are whole blocks (group_size % 32 == 0) and rows start on a block boundary of the
// flat weight (in_features % 32 == 0) or on a group boundary (in_features % group_size == 0).
// Other layers run int8 requests in fp32 (the fastest path at least as accurate).
inline bool q8_layout_ok(const Nf4Weight& w) {
  return w.group_size % kQ8Block == 0 &&
         (w.in_features % kQ8Block == 0 || w.in_features % w.group_size == 0);
}

}  // namespace qlora
