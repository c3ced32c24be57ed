// The NF4 storage format, drawn once: the codebook, how weights are grouped for scaling, how
// codes are packed into bytes, and the scalar helpers (nearest code, group scale) that every
// kernel and the format converters share. Everything here is pure and ISA-independent.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qlora {

// The QLoraPaper NormalFloat-4 codebook (bitsandbytes' NF4 table), ascending, index = code.
inline constexpr float kNf4Codebook[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// Code 7 decodes to exactly 0.0: it fills padding and all-zero groups.
inline constexpr uint8_t kNf4ZeroCode = 7;

// Packed layout (qlora's own; the bitsandbytes flat layout is converted on import/export).
// Each row of W is stored on its own, padded to a whole number of 32-column blocks so every row
// starts on a byte boundary and SIMD kernels never straddle rows. A block is 16 bytes: byte j
// holds column j in its low nibble and column j + 16 in its high nibble, so one `and 0x0f` and
// one shift by 4 give two runs of 16 consecutive columns with no interleaving step.
// Padding columns hold kNf4ZeroCode.
inline constexpr int64_t kBlockCols = 32;
inline constexpr int64_t kBlockBytes = kBlockCols / 2;
static_assert(kBlockBytes * 2 == kBlockCols, "two codes per byte");
static_assert(sizeof(kNf4Codebook) / sizeof(float) == 16, "NF4 has 16 codes");

// bitsandbytes clamps absmax to at least this (a float32 subnormal) before scaling, and stores
// the clamped value for the partial last group only; full all-zero groups store 0.
inline constexpr float kMinAbsmax = 1e-38f;

// Blocks of the bitsandbytes double-quantization ("nested") second level.
inline constexpr int64_t kNestedBlock = 256;

inline int64_t blocks_per_row(int64_t in_features) {
  return (in_features + kBlockCols - 1) / kBlockCols;
}
inline int64_t packed_row_bytes(int64_t in_features) {
  return blocks_per_row(in_features) * kBlockBytes;
}

// Byte offset and nibble shift of column `col` inside its packed row.
inline int64_t code_byte(int64_t col) {
  return (col / kBlockCols) * kBlockBytes + (col % kBlockBytes);
}
inline int code_shift(int64_t col) { return ((col % kBlockCols) >= kBlockBytes) ? 4 : 0; }

inline uint8_t get_code(const uint8_t* row, int64_t col) {
  return static_cast<uint8_t>((row[code_byte(col)] >> code_shift(col)) & 0x0f);
}

// Nearest codebook entry of a value already scaled to [-1, 1]. A value exactly on a midpoint
// (computed in float32, as bitsandbytes does) goes to the lower code, hence the strict `>`.
// A NaN compares false everywhere and lands on code 0; callers reject NaN before this.
inline uint8_t nearest_nf4(float v) {
  uint8_t code = 0;
  for (int i = 0; i < 15; ++i) {
    const float mid = (kNf4Codebook[i] + kNf4Codebook[i + 1]) * 0.5f;
    code = static_cast<uint8_t>(code + (v > mid ? 1 : 0));
  }
  return code;
}

// A read-only view of one quantized weight; kernels take it by reference. Exactly one of
// `scales` (plain float32 absmax per group) or `qscales` (double-quantized, 8-bit) is set.
struct Nf4Weight {
  const uint8_t* codes = nullptr;       // out_features * packed_row_bytes(in_features)
  const float* scales = nullptr;        // num_groups, or nullptr when double-quantized
  const uint8_t* qscales = nullptr;     // num_groups 8-bit codes of (absmax - offset)
  const float* nested_scales = nullptr; // ceil(num_groups / 256)
  const float* nested_map = nullptr;    // 256 entries
  float nested_offset = 0.0f;
  int64_t out_features = 0;
  int64_t in_features = 0;
  int64_t group_size = 0;
  int64_t num_groups = 0;
};

// The float32 scale of group g, for both scale encodings. Two separate float32 roundings
// (multiply, then add) as bitsandbytes computes it; the build forbids FMA contraction.
inline float group_scale(const Nf4Weight& w, int64_t g) {
  if (w.scales != nullptr) return w.scales[g];
  const float m = w.nested_map[w.qscales[g]] * w.nested_scales[g / kNestedBlock];
  return m + w.nested_offset;
}

}  // namespace qlora
