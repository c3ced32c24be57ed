// The aarch64 Advanced SIMD (NEON) kernels. NEON is part of the aarch64 baseline, so this file
// needs no target region and no extra flags: it is compiled whenever the target is aarch64 and
// is empty elsewhere (table() returns nullptr there). NF4 codes decode with four byte-table
// lookups (vqtbl1q_u8), one per byte of the float32 codebook entries, re-interleaved into floats,
// so a decoded value is the codebook entry bit for bit. Quantize and dequantize use the same
// float32 operations as the scalar specification (the build forbids FMA contraction) and are
// bit-exact with it; only forward and lora_down use fused multiply-adds, in a fixed order per
// output element that does not depend on the row or batch range handed in.
#include "qlora/kernels.h"

#if defined(__aarch64__)

#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace qlora {
namespace kernels {
namespace neon {
namespace {

// Output rows of a forward tile: the GEMM decodes this many rows of W into its panel at once.
constexpr int kTileRows = 8;
// Batch rows per GEMM microkernel call: 8 rows x 8 outputs = 16 accumulators, plus 8 x vectors
// and 2 W vectors, fits the 32 NEON registers without spilling.
constexpr int kBatchBlock = 8;
// Columns of W decoded per panel: 8 rows x 256 columns x 4 bytes = 8 KiB stays in L1 while the
// whole batch streams over it. A multiple of kBlockCols so panels start on packed blocks.
constexpr int64_t kPanelCols = 256;
static_assert(kPanelCols % kBlockCols == 0, "panels hold whole packed blocks");
// GEMV rows decoded together, sharing each load of x.
constexpr int kGemvRows = 4;

// Byte j of the float32 codebook entry i is bytes[j][i]: four 16-entry tables, so a code vector
// indexes each one with vqtbl1q_u8.
struct ByteTables {
  alignas(16) uint8_t bytes[4][16];
};

ByteTables make_byte_tables() {
  ByteTables t{};
  for (int i = 0; i < 16; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &kNf4Codebook[i], sizeof bits);
    for (int j = 0; j < 4; ++j) t.bytes[j][i] = static_cast<uint8_t>(bits >> (8 * j));
  }
  return t;
}
const ByteTables kByteTables = make_byte_tables();

struct Lut {
  uint8x16_t b0, b1, b2, b3;
};

inline Lut load_lut() {
  return {vld1q_u8(kByteTables.bytes[0]), vld1q_u8(kByteTables.bytes[1]),
          vld1q_u8(kByteTables.bytes[2]), vld1q_u8(kByteTables.bytes[3])};
}

// Codebook values of 16 codes (each byte 0..15), in order, as four float vectors. Zipping byte
// planes 0|1 and 2|3 into 16-bit halves and then the halves into 32-bit words rebuilds each
// little-endian float exactly.
inline void decode16(const Lut& t, uint8x16_t idx, float32x4_t* out) {
  const uint8x16_t p0 = vqtbl1q_u8(t.b0, idx);
  const uint8x16_t p1 = vqtbl1q_u8(t.b1, idx);
  const uint8x16_t p2 = vqtbl1q_u8(t.b2, idx);
  const uint8x16_t p3 = vqtbl1q_u8(t.b3, idx);
  const uint16x8_t lo01 = vreinterpretq_u16_u8(vzip1q_u8(p0, p1));
  const uint16x8_t hi01 = vreinterpretq_u16_u8(vzip2q_u8(p0, p1));
  const uint16x8_t lo23 = vreinterpretq_u16_u8(vzip1q_u8(p2, p3));
  const uint16x8_t hi23 = vreinterpretq_u16_u8(vzip2q_u8(p2, p3));
  out[0] = vreinterpretq_f32_u16(vzip1q_u16(lo01, lo23));
  out[1] = vreinterpretq_f32_u16(vzip2q_u16(lo01, lo23));
  out[2] = vreinterpretq_f32_u16(vzip1q_u16(hi01, hi23));
  out[3] = vreinterpretq_f32_u16(vzip2q_u16(hi01, hi23));
}

// Codebook values of one packed 32-column block, in column order: the low nibbles are columns
// 0..15 and the high nibbles columns 16..31 (see nf4.h).
inline void decode_block(const Lut& t, const uint8_t* src, float32x4_t* v) {
  const uint8x16_t bytes = vld1q_u8(src);
  decode16(t, vandq_u8(bytes, vdupq_n_u8(0x0f)), v);
  decode16(t, vshrq_n_u8(bytes, 4), v + 4);
}

// Walks the groups of one row of W block by block. Groups run over the flat weight, so they may
// start anywhere in a row; most blocks lie inside one group and take one scale, the others get a
// scale per column.
class GroupCursor {
 public:
  void reset(const Nf4Weight& w, int64_t row) {
    w_ = &w;
    const int64_t flat = row * w.in_features;
    g_ = flat / w.group_size;
    next_ = (g_ + 1) * w.group_size - flat;
  }

  // Scales of columns [c0, c_end) of a block starting at c0, c0 non-decreasing between calls.
  // True with *s set when one group covers them all; otherwise fills sc[0..32) (0 past c_end).
  bool block(int64_t c0, int64_t c_end, float* s, float* sc) {
    const int64_t gs = w_->group_size;
    while (next_ <= c0) {
      ++g_;
      next_ += gs;
    }
    if (c_end <= next_) {
      *s = group_scale(*w_, g_);
      return true;
    }
    fill_mixed(c0, c_end, sc);
    return false;
  }

 private:
  // Out of line so the rare per-column case does not cost the hot loops registers.
  __attribute__((noinline)) void fill_mixed(int64_t c0, int64_t c_end, float* sc) const {
    const int64_t gs = w_->group_size;
    int64_t g = g_, next = next_;
    float cur = group_scale(*w_, g);
    for (int64_t c = c0; c < c_end; ++c) {
      if (c >= next) {
        while (c >= next) {
          ++g;
          next += gs;
        }
        cur = group_scale(*w_, g);
      }
      sc[c - c0] = cur;
    }
    for (int64_t c = c_end; c < c0 + kBlockCols; ++c) sc[c - c0] = 0.0f;
  }

  const Nf4Weight* w_ = nullptr;
  int64_t g_ = 0;
  int64_t next_ = 0;  // first column (relative to the row) of group g_ + 1
};

// The common case, in_features and group_size both multiples of 32 (e.g. 4096 and 64): every
// block lies inside one group, and the group advances every group_size / 32 blocks, so the hot
// loops need neither divisions nor the per-column path (whose call would cost them registers).
// Blocks must be visited in order, each exactly once.
class AlignedCursor {
 public:
  static bool applies(const Nf4Weight& w) {
    return w.in_features % kBlockCols == 0 && w.group_size % kBlockCols == 0;
  }

  void reset(const Nf4Weight& w, int64_t row) {
    w_ = &w;
    const int64_t flat = row * w.in_features;
    g_ = flat / w.group_size;
    per_group_ = w.group_size / kBlockCols;
    left_ = (w.group_size - flat % w.group_size) / kBlockCols;
  }

  bool block(int64_t, int64_t, float* s, float*) {
    if (left_ == 0) {
      ++g_;
      left_ = per_group_;
    }
    --left_;
    *s = group_scale(*w_, g_);
    return true;
  }

 private:
  const Nf4Weight* w_ = nullptr;
  int64_t g_ = 0;
  int64_t per_group_ = 1;
  int64_t left_ = 0;  // blocks of group g_ still to come in this row
};

// Dequantized values (codebook value times scale, one float32 multiply as in the scalar
// specification) of the block starting at column c0 of the row that `cursor` walks.
template <class Cursor>
inline void dequant_block(const Lut& t, const uint8_t* src, Cursor& cursor, int64_t c0,
                          int64_t c_end, float32x4_t* v) {
  decode_block(t, src, v);
  float s = 0.0f;
  alignas(16) float sc[kBlockCols];
  if (cursor.block(c0, c_end, &s, sc)) {
    const float32x4_t sv = vdupq_n_f32(s);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) v[j] = vmulq_f32(v[j], sv);
  } else {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) v[j] = vmulq_f32(v[j], vld1q_f32(sc + 4 * j));
  }
}

// dot(a, b) over n floats with four fused accumulators, in an order fixed by n alone.
inline float dot_f32(const float* a, const float* b, int64_t n) {
  float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
    acc1 = vfmaq_f32(acc1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
    acc2 = vfmaq_f32(acc2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
    acc3 = vfmaq_f32(acc3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
  }
  for (; i + 4 <= n; i += 4) acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
  float s = vaddvq_f32(vaddq_f32(vaddq_f32(acc0, acc1), vaddq_f32(acc2, acc3)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void group_absmax(const float* w, int64_t n_total, int64_t group_size, int64_t g_begin,
                  int64_t g_end, float* absmax) {
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t lo = g * group_size;
    const int64_t hi = std::min(lo + group_size, n_total);
    // maxnm ignores a NaN operand, as the scalar std::max(m, |w|) does; max is exact, so the
    // lane split cannot change the result.
    float32x4_t acc = vdupq_n_f32(0.0f);
    int64_t i = lo;
    for (; i + 4 <= hi; i += 4) acc = vmaxnmq_f32(acc, vabsq_f32(vld1q_f32(w + i)));
    float m = vmaxnmvq_f32(acc);
    for (; i < hi; ++i) m = std::max(m, std::fabs(w[i]));
    absmax[g - g_begin] = m;
  }
}

// Codes (0..15, one per 32-bit lane) of four values already clamped to [-1, 1]: the number of
// midpoints strictly below v, exactly nearest_nf4's count (ties go to the lower code).
inline uint32x4_t nearest4(float32x4_t v, const float32x4_t* mids) {
  uint32x4_t code = vdupq_n_u32(0);
  for (int i = 0; i < 15; ++i) code = vsubq_u32(code, vcgtq_f32(v, mids[i]));
  return code;
}

inline uint8x16_t nearest16(const float* v, const float32x4_t* mids) {
  const uint16x8_t a = vcombine_u16(vmovn_u32(nearest4(vld1q_f32(v), mids)),
                                    vmovn_u32(nearest4(vld1q_f32(v + 4), mids)));
  const uint16x8_t b = vcombine_u16(vmovn_u32(nearest4(vld1q_f32(v + 8), mids)),
                                    vmovn_u32(nearest4(vld1q_f32(v + 12), mids)));
  return vcombine_u8(vmovn_u16(a), vmovn_u16(b));
}

void quantize_rows(const float* w, int64_t in_features, int64_t n_total, int64_t group_size,
                   const float* absmax, int64_t row_begin, int64_t row_end, uint8_t* codes) {
  const int64_t row_bytes = packed_row_bytes(in_features);
  const int64_t padded = blocks_per_row(in_features) * kBlockCols;
  const int64_t last_group = (n_total - 1) / group_size;
  const bool last_partial = (n_total % group_size) != 0;
  float32x4_t mids[15];
  for (int i = 0; i < 15; ++i) mids[i] = vdupq_n_f32((kNf4Codebook[i] + kNf4Codebook[i + 1]) * 0.5f);
  const float32x4_t one = vdupq_n_f32(1.0f), minus_one = vdupq_n_f32(-1.0f);

  // Scaled, clamped values of one row; the padding columns stay 0.0, whose nearest code is
  // kNf4ZeroCode, so the packing pass below needs no tail.
  thread_local std::vector<float> vals;
  vals.assign(static_cast<size_t>(padded), 0.0f);
  float* v = vals.data();
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* src = w + r * in_features;
    int64_t c = 0;
    while (c < in_features) {
      const int64_t g = (r * in_features + c) / group_size;
      const int64_t seg_end = std::min(in_features, (g + 1) * group_size - r * in_features);
      const float m = std::max(absmax[g], kMinAbsmax);
      // bitsandbytes divides in the partial last group and multiplies by the float32
      // reciprocal elsewhere; the two round differently, so both are kept.
      if (g == last_group && last_partial) {
        const float32x4_t mv = vdupq_n_f32(m);
        for (; c + 4 <= seg_end; c += 4)
          vst1q_f32(v + c, vminq_f32(one, vmaxq_f32(minus_one, vdivq_f32(vld1q_f32(src + c), mv))));
        for (; c < seg_end; ++c) v[c] = std::min(1.0f, std::max(-1.0f, src[c] / m));
      } else {
        const float inv = 1.0f / m;
        const float32x4_t iv = vdupq_n_f32(inv);
        for (; c + 4 <= seg_end; c += 4)
          vst1q_f32(v + c, vminq_f32(one, vmaxq_f32(minus_one, vmulq_f32(vld1q_f32(src + c), iv))));
        for (; c < seg_end; ++c) v[c] = std::min(1.0f, std::max(-1.0f, src[c] * inv));
      }
    }
    uint8_t* dst = codes + r * row_bytes;
    for (int64_t blk = 0; blk * kBlockCols < padded; ++blk) {
      const uint8x16_t lo = nearest16(v + blk * kBlockCols, mids);
      const uint8x16_t hi = nearest16(v + blk * kBlockCols + kBlockBytes, mids);
      vst1q_u8(dst + blk * kBlockBytes, vorrq_u8(lo, vshlq_n_u8(hi, 4)));
    }
  }
}

template <class Cursor>
void dequantize_rows_with(const Nf4Weight& w, int64_t row_begin, int64_t row_end, float* out) {
  const int64_t in = w.in_features;
  const int64_t row_bytes = packed_row_bytes(in);
  const int64_t blocks = blocks_per_row(in);
  const Lut t = load_lut();
  Cursor cursor;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* src = w.codes + r * row_bytes;
    float* dst = out + (r - row_begin) * in;
    cursor.reset(w, r);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t c0 = blk * kBlockCols, c_end = std::min(c0 + kBlockCols, in);
      float32x4_t v[8];
      dequant_block(t, src + blk * kBlockBytes, cursor, c0, c_end, v);
      if (c_end - c0 == kBlockCols) {
        for (int j = 0; j < 8; ++j) vst1q_f32(dst + c0 + 4 * j, v[j]);
      } else {
        alignas(16) float tmp[kBlockCols];
        for (int j = 0; j < 8; ++j) vst1q_f32(tmp + 4 * j, v[j]);
        std::memcpy(dst + c0, tmp, static_cast<size_t>(c_end - c0) * sizeof(float));
      }
    }
  }
}

void dequantize_rows(const Nf4Weight& w, int64_t row_begin, int64_t row_end, float* out) {
  if (AlignedCursor::applies(w)) {
    dequantize_rows_with<AlignedCursor>(w, row_begin, row_end, out);
  } else {
    dequantize_rows_with<GroupCursor>(w, row_begin, row_end, out);
  }
}

void lora_down(const float* x, int64_t in_features, const float* a, int64_t rank,
               int64_t b_begin, int64_t b_end, float* xa) {
  for (int64_t b = b_begin; b < b_end; ++b) {
    for (int64_t k = 0; k < rank; ++k) {
      xa[b * rank + k] = dot_f32(x + b * in_features, a + k * in_features, in_features);
    }
  }
}

// y = dot + scaling * dot(xa[b], B[o]) + bias[o], the same for both forward paths.
inline float epilogue(const ForwardArgs& p, int64_t b, int64_t o, float dot) {
  float acc = dot;
  if (p.rank > 0) acc += p.scaling * dot_f32(p.xa + b * p.rank, p.lora_b + o * p.rank, p.rank);
  if (p.bias != nullptr) acc += p.bias[o];
  return acc;
}

// Batch 1: R rows of W decoded block by block in registers against one x. Decoding dominates
// the cost here, so a block inside one group is not scaled column by column: its dot product
// with the codebook values is formed first and then added times the group scale, one fused
// multiply-add per vector instead of a multiply per column (the float64 bound in the tests
// still holds: one rounding for the scale replaces one for each dequantized value). Blocks that
// straddle groups multiply by per-column scales instead. Which blocks do is fixed by the shape,
// and each row keeps its own two accumulators, the same for every R, so a row's result does not
// depend on which rows it was decoded with. Four rows give eight independent chains, and x (8
// vectors), the tables (4) and one row's block (8) fit the 32 vector registers.
template <int R, class Cursor>
void gemv_rows(const ForwardArgs& p, const Lut& t, const float* xpad, int64_t o0, float* dots) {
  const int64_t in = p.w.in_features;
  const int64_t row_bytes = packed_row_bytes(in);
  const int64_t blocks = blocks_per_row(in);
  float32x4_t acc[R][2];
  Cursor cursor[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    acc[r][0] = vdupq_n_f32(0.0f);
    acc[r][1] = vdupq_n_f32(0.0f);
    cursor[r].reset(p.w, o0 + r);
  }
  const uint8_t* codes = p.w.codes + o0 * row_bytes;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * kBlockCols, c_end = std::min(c0 + kBlockCols, in);
    float32x4_t xv[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) xv[j] = vld1q_f32(xpad + c0 + 4 * j);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float32x4_t v[8];
      decode_block(t, codes + r * row_bytes + blk * kBlockBytes, v);
      float s = 0.0f;
      alignas(16) float sc[kBlockCols];
      if (cursor[r].block(c0, c_end, &s, sc)) {
        float32x4_t d0 = vmulq_f32(xv[0], v[0]);
        float32x4_t d1 = vmulq_f32(xv[1], v[1]);
#pragma GCC unroll 3
        for (int j = 2; j < 8; j += 2) {
          d0 = vfmaq_f32(d0, xv[j], v[j]);
          d1 = vfmaq_f32(d1, xv[j + 1], v[j + 1]);
        }
        acc[r][0] = vfmaq_n_f32(acc[r][0], d0, s);
        acc[r][1] = vfmaq_n_f32(acc[r][1], d1, s);
      } else {
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          acc[r][j & 1] = vfmaq_f32(acc[r][j & 1], xv[j], vmulq_f32(v[j], vld1q_f32(sc + 4 * j)));
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) dots[r] = vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1]));
}

template <class Cursor>
void gemv_range(const ForwardArgs& p, const Lut& t, const float* xpad, int64_t row_begin, int64_t row_end) {
  float dots[kGemvRows];
  int64_t o = row_begin;
  for (; o + kGemvRows <= row_end; o += kGemvRows) {
    gemv_rows<kGemvRows, Cursor>(p, t, xpad, o, dots);
    for (int r = 0; r < kGemvRows; ++r) p.y[o + r] = epilogue(p, 0, o + r, dots[r]);
  }
  for (; o < row_end; ++o) {
    gemv_rows<1, Cursor>(p, t, xpad, o, dots);
    p.y[o] = epilogue(p, 0, o, dots[0]);
  }
}

void forward_gemv(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  const int64_t in = p.w.in_features;
  // x padded with zeros to whole blocks: padding codes decode to 0.0, and 0 * 0 adds nothing,
  // so the last block needs no tail path and x is never read past in_features.
  thread_local std::vector<float> xpad;
  xpad.assign(static_cast<size_t>(blocks_per_row(in) * kBlockCols), 0.0f);
  std::memcpy(xpad.data(), p.x, static_cast<size_t>(in) * sizeof(float));
  const Lut t = load_lut();
  // Both cursors give each column the same scale, so the choice changes speed, not results.
  if (AlignedCursor::applies(p.w)) {
    gemv_range<AlignedCursor>(p, t, xpad.data(), row_begin, row_end);
  } else {
    gemv_range<GroupCursor>(p, t, xpad.data(), row_begin, row_end);
  }
}

inline void transpose4_store(float32x4_t a0, float32x4_t a1, float32x4_t a2, float32x4_t a3,
                             float* dst, int64_t stride) {
  const float32x4_t t0 = vtrn1q_f32(a0, a1), t1 = vtrn2q_f32(a0, a1);
  const float32x4_t t2 = vtrn1q_f32(a2, a3), t3 = vtrn2q_f32(a2, a3);
  const float64x2_t d0 = vreinterpretq_f64_f32(t0), d1 = vreinterpretq_f64_f32(t1);
  const float64x2_t d2 = vreinterpretq_f64_f32(t2), d3 = vreinterpretq_f64_f32(t3);
  vst1q_f32(dst, vreinterpretq_f32_f64(vtrn1q_f64(d0, d2)));
  vst1q_f32(dst + stride, vreinterpretq_f32_f64(vtrn1q_f64(d1, d3)));
  vst1q_f32(dst + 2 * stride, vreinterpretq_f32_f64(vtrn2q_f64(d0, d2)));
  vst1q_f32(dst + 3 * stride, vreinterpretq_f32_f64(vtrn2q_f64(d1, d3)));
}

// Dequantizes columns [k0, k0 + klen) of rows [o0, o0 + rows) into panel[k * 8 + r], the layout
// the microkernel reads with two vector loads per column. Rows past `rows` are zero.
template <class Cursor>
void decode_panel(const ForwardArgs& p, const Lut& t, int64_t o0, int rows, Cursor* cursor,
                  int64_t k0, int64_t klen, float* panel) {
  const int64_t in = p.w.in_features;
  const int64_t row_bytes = packed_row_bytes(in);
  alignas(16) float tile[kTileRows][kBlockCols];
  for (int64_t kb = 0; kb < klen; kb += kBlockCols) {
    const int64_t c0 = k0 + kb, c_end = std::min(c0 + kBlockCols, in);
    const int64_t blk = c0 / kBlockCols;
    for (int r = 0; r < kTileRows; ++r) {
      float32x4_t v[8];
      if (r < rows) {
        dequant_block(t, p.w.codes + (o0 + r) * row_bytes + blk * kBlockBytes, cursor[r], c0, c_end, v);
      } else {
        for (int j = 0; j < 8; ++j) v[j] = vdupq_n_f32(0.0f);
      }
      for (int j = 0; j < 8; ++j) vst1q_f32(tile[r] + 4 * j, v[j]);
    }
    for (int q = 0; q < kBlockCols / 4; ++q) {
      for (int h = 0; h < 2; ++h) {
        transpose4_store(vld1q_f32(tile[4 * h] + 4 * q), vld1q_f32(tile[4 * h + 1] + 4 * q),
                         vld1q_f32(tile[4 * h + 2] + 4 * q), vld1q_f32(tile[4 * h + 3] + 4 * q),
                         panel + (kb + 4 * q) * kTileRows + 4 * h, kTileRows);
      }
    }
  }
}

template <int L, int MR>
inline void fma_lane(float32x4_t (&c)[MR][2], float32x4_t w0, float32x4_t w1, const float32x4_t (&xv)[MR]) {
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    c[m][0] = vfmaq_laneq_f32(c[m][0], w0, xv[m], L);
    c[m][1] = vfmaq_laneq_f32(c[m][1], w1, xv[m], L);
  }
}

// acc[m * 8 + r] += sum over k < klen of x[m * ldx + k] * panel[k * 8 + r], for MR batch rows:
// every accumulator lane adds its products one fused multiply-add at a time in k order, so the
// result is the same for any MR and any panel split.
template <int MR>
void microkernel(const float* x, int64_t ldx, const float* panel, int64_t klen, float* acc) {
  float32x4_t c[MR][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    c[m][0] = vld1q_f32(acc + m * kTileRows);
    c[m][1] = vld1q_f32(acc + m * kTileRows + 4);
  }
  int64_t k = 0;
  for (; k + 4 <= klen; k += 4) {
    float32x4_t xv[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) xv[m] = vld1q_f32(x + m * ldx + k);
    const float* pk = panel + k * kTileRows;
    fma_lane<0, MR>(c, vld1q_f32(pk), vld1q_f32(pk + 4), xv);
    fma_lane<1, MR>(c, vld1q_f32(pk + 8), vld1q_f32(pk + 12), xv);
    fma_lane<2, MR>(c, vld1q_f32(pk + 16), vld1q_f32(pk + 20), xv);
    fma_lane<3, MR>(c, vld1q_f32(pk + 24), vld1q_f32(pk + 28), xv);
  }
  for (; k < klen; ++k) {
    const float32x4_t w0 = vld1q_f32(panel + k * kTileRows), w1 = vld1q_f32(panel + k * kTileRows + 4);
    for (int m = 0; m < MR; ++m) {
      c[m][0] = vfmaq_n_f32(c[m][0], w0, x[m * ldx + k]);
      c[m][1] = vfmaq_n_f32(c[m][1], w1, x[m * ldx + k]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    vst1q_f32(acc + m * kTileRows, c[m][0]);
    vst1q_f32(acc + m * kTileRows + 4, c[m][1]);
  }
}

// Batch > 1: each tile of kTileRows rows of W is decoded once per panel of columns and reused by
// every batch row (BLIS-style), so decoding costs O(out * in) however large the batch.
template <class Cursor>
void forward_gemm_with(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  const int64_t in = p.w.in_features;
  const int64_t out = p.w.out_features;
  const int64_t batch = p.batch;
  thread_local std::vector<float> panel;
  thread_local std::vector<float> acc;
  panel.resize(static_cast<size_t>(kPanelCols * kTileRows));
  acc.resize(static_cast<size_t>(batch * kTileRows));
  const Lut t = load_lut();
  Cursor cursor[kTileRows];
  for (int64_t o0 = row_begin; o0 < row_end; o0 += kTileRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kTileRows, row_end - o0));
    for (int r = 0; r < rows; ++r) cursor[r].reset(p.w, o0 + r);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k0 = 0; k0 < in; k0 += kPanelCols) {
      const int64_t klen = std::min(kPanelCols, in - k0);
      decode_panel(p, t, o0, rows, cursor, k0, klen, panel.data());
      const float* xk = p.x + k0;
      int64_t b = 0;
      for (; b + kBatchBlock <= batch; b += kBatchBlock)
        microkernel<kBatchBlock>(xk + b * in, in, panel.data(), klen, acc.data() + b * kTileRows);
      if (b + 4 <= batch) {
        microkernel<4>(xk + b * in, in, panel.data(), klen, acc.data() + b * kTileRows);
        b += 4;
      }
      if (b + 2 <= batch) {
        microkernel<2>(xk + b * in, in, panel.data(), klen, acc.data() + b * kTileRows);
        b += 2;
      }
      if (b < batch) microkernel<1>(xk + b * in, in, panel.data(), klen, acc.data() + b * kTileRows);
    }
    for (int64_t b = 0; b < batch; ++b) {
      for (int r = 0; r < rows; ++r) {
        p.y[b * out + o0 + r] = epilogue(p, b, o0 + r, acc[static_cast<size_t>(b * kTileRows + r)]);
      }
    }
  }
}

void forward_gemm(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  if (AlignedCursor::applies(p.w)) {
    forward_gemm_with<AlignedCursor>(p, row_begin, row_end);
  } else {
    forward_gemm_with<GroupCursor>(p, row_begin, row_end);
  }
}

void forward_rows(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  if (p.batch == 1) {
    forward_gemv(p, row_begin, row_end);
  } else {
    forward_gemm(p, row_begin, row_end);
  }
}

// ---------------------------------------------------------------- gemm_nf4t_f32
// The backward's dx = g @ deq(W) over a row range of W and a column range. Every dx element is
// one fused multiply-add chain over the rows o of the range in increasing order, starting from
// zero, whatever column range or tile it is in.
// Batch 1 adds code * (g[o] * scale) (the scale folded into g, as in the x86 kernels); batches
// add deq * g[b, o] with deq = code * scale as dequantize_rows gives it.

// Scales of the block of row r starting at column c0 (a multiple of 32), columns [c0, c_end):
// true with *s when one group covers them; otherwise sc[0..32) per column (0 past c_end).
inline bool block_scales(const Nf4Weight& w, int64_t r, int64_t c0, int64_t c_end, float* s, float* sc) {
  const int64_t flat = r * w.in_features + c0;
  const int64_t g0 = flat / w.group_size, g1 = (flat + (c_end - c0) - 1) / w.group_size;
  if (g0 == g1) {
    *s = group_scale(w, g0);
    return true;
  }
  for (int64_t c = 0; c < kBlockCols; ++c) sc[c] = c0 + c < c_end ? group_scale(w, (flat + c) / w.group_size) : 0.0f;
  return false;
}

// Stores the first n (<= 4 * count) floats of v[0..count) at dst.
inline void store_n(float* dst, const float32x4_t* v, int count, int64_t n) {
  if (n >= 4 * count) {
    for (int j = 0; j < count; ++j) vst1q_f32(dst + 4 * j, v[j]);
    return;
  }
  alignas(16) float tmp[kBlockCols];
  for (int j = 0; j < count; ++j) vst1q_f32(tmp + 4 * j, v[j]);
  std::memcpy(dst, tmp, static_cast<size_t>(n) * sizeof(float));
}

// Batch 1: NB blocks of columns from c0 (a multiple of 32) kept in registers while every row of
// the range streams through.
template <int NB>
void gemvt_tile(const TransposedArgs& p, const Lut& t, int64_t c0, int64_t c1) {
  const Nf4Weight& w = p.w;
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in);
  float32x4_t acc[NB][8];
  for (int b = 0; b < NB; ++b)
    for (int j = 0; j < 8; ++j) acc[b][j] = vdupq_n_f32(0.0f);
  const uint8_t* src = w.codes + p.row_begin * row_bytes + (c0 / kBlockCols) * kBlockBytes;
  for (int64_t o = p.row_begin; o < p.row_end; ++o, src += row_bytes) {
    const float go = p.g[o];
    for (int b = 0; b < NB; ++b) {
      const int64_t cb = c0 + b * kBlockCols;
      float32x4_t v[8];
      decode_block(t, src + b * kBlockBytes, v);
      float s = 0.0f;
      alignas(16) float sc[kBlockCols];
      if (block_scales(w, o, cb, std::min(cb + kBlockCols, in), &s, sc)) {
        const float gs = go * s;
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[b][j] = vfmaq_n_f32(acc[b][j], v[j], gs);
      } else {
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[b][j] = vfmaq_f32(acc[b][j], v[j], vmulq_n_f32(vld1q_f32(sc + 4 * j), go));
      }
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t cb = c0 + b * kBlockCols;
    if (cb < c1) store_n(p.dx + cb, acc[b], 8, c1 - cb);
  }
}

// Rows [o0, o0 + kc) of deq(W), the 32 columns of the block at cb, into panel[k * 32 + j].
void decode_panel_t(const Nf4Weight& w, const Lut& t, int64_t o0, int64_t kc, int64_t cb, float* panel) {
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in);
  const int64_t c_end = std::min(cb + kBlockCols, in);
  for (int64_t k = 0; k < kc; ++k) {
    float32x4_t v[8];
    decode_block(t, w.codes + (o0 + k) * row_bytes + (cb / kBlockCols) * kBlockBytes, v);
    float s = 0.0f;
    alignas(16) float sc[kBlockCols];
    if (block_scales(w, o0 + k, cb, c_end, &s, sc)) {
      for (int j = 0; j < 8; ++j) vst1q_f32(panel + k * kBlockCols + 4 * j, vmulq_n_f32(v[j], s));
    } else {
      for (int j = 0; j < 8; ++j) vst1q_f32(panel + k * kBlockCols + 4 * j, vmulq_f32(v[j], vld1q_f32(sc + 4 * j)));
    }
  }
}

// dx[m, 0..8) (n valid) += sum over k < kc of g[m * ldg + k] * panel[k * 32 + 0..8), MR rows.
template <int MR>
void microkernel_t(const float* g, int64_t ldg, const float* panel, int64_t kc, float* dx, int64_t ldx, int64_t n,
                   bool first) {
  float32x4_t c[MR][2];
  for (int m = 0; m < MR; ++m) {
    if (first) {
      c[m][0] = c[m][1] = vdupq_n_f32(0.0f);
    } else {
      alignas(16) float tmp[8] = {};
      std::memcpy(tmp, dx + m * ldx, static_cast<size_t>(std::min<int64_t>(n, 8)) * sizeof(float));
      c[m][0] = vld1q_f32(tmp);
      c[m][1] = vld1q_f32(tmp + 4);
    }
  }
  int64_t k = 0;
  for (; k + 4 <= kc; k += 4) {
    float32x4_t xv[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) xv[m] = vld1q_f32(g + m * ldg + k);
    const float* pk = panel + k * kBlockCols;
    fma_lane<0, MR>(c, vld1q_f32(pk), vld1q_f32(pk + 4), xv);
    fma_lane<1, MR>(c, vld1q_f32(pk + kBlockCols), vld1q_f32(pk + kBlockCols + 4), xv);
    fma_lane<2, MR>(c, vld1q_f32(pk + 2 * kBlockCols), vld1q_f32(pk + 2 * kBlockCols + 4), xv);
    fma_lane<3, MR>(c, vld1q_f32(pk + 3 * kBlockCols), vld1q_f32(pk + 3 * kBlockCols + 4), xv);
  }
  for (; k < kc; ++k) {
    const float32x4_t w0 = vld1q_f32(panel + k * kBlockCols), w1 = vld1q_f32(panel + k * kBlockCols + 4);
    for (int m = 0; m < MR; ++m) {
      c[m][0] = vfmaq_n_f32(c[m][0], w0, g[m * ldg + k]);
      c[m][1] = vfmaq_n_f32(c[m][1], w1, g[m * ldg + k]);
    }
  }
  for (int m = 0; m < MR; ++m) store_n(dx + m * ldx, c[m], 2, n);
}

// Rows of W in chunks of kPanelRowsT, each block of the column range decoded once per chunk and
// reused by every batch row; dx carries the partial sums between chunks.
constexpr int64_t kPanelRowsT = 256;

void gemm_nf4t_f32(const TransposedArgs& p, int64_t col_begin, int64_t col_end) {
  if (col_end <= col_begin || p.batch <= 0) return;
  const int64_t in = p.w.in_features, out = p.w.out_features;
  if (p.row_end <= p.row_begin) {
    for (int64_t b = 0; b < p.batch; ++b) std::fill(p.dx + b * in + col_begin, p.dx + b * in + col_end, 0.0f);
    return;
  }
  const Lut t = load_lut();
  if (p.batch == 1) {
    for (int64_t c0 = col_begin; c0 < col_end; c0 += 2 * kBlockCols) {
      const int64_t c1 = std::min(col_end, c0 + 2 * kBlockCols);
      if (c1 - c0 > kBlockCols) {
        gemvt_tile<2>(p, t, c0, c1);
      } else {
        gemvt_tile<1>(p, t, c0, c1);
      }
    }
    return;
  }
  thread_local std::vector<float> panel;
  panel.resize(static_cast<size_t>(kPanelRowsT * kBlockCols));
  for (int64_t o0 = p.row_begin; o0 < p.row_end; o0 += kPanelRowsT) {
    const int64_t kc = std::min(kPanelRowsT, p.row_end - o0);
    for (int64_t cb = col_begin; cb < col_end; cb += kBlockCols) {
      decode_panel_t(p.w, t, o0, kc, cb, panel.data());
      for (int q = 0; q < kBlockCols / 8; ++q) {
        const int64_t c = cb + 8 * q, n = std::min<int64_t>(8, col_end - c);
        if (n <= 0) break;
        const float* pq = panel.data() + 8 * q;
        const float* g = p.g + o0;
        float* dx = p.dx + c;
        int64_t b = 0;
        for (; b + kBatchBlock <= p.batch; b += kBatchBlock)
          microkernel_t<kBatchBlock>(g + b * out, out, pq, kc, dx + b * in, in, n, o0 == p.row_begin);
        if (b + 4 <= p.batch) {
          microkernel_t<4>(g + b * out, out, pq, kc, dx + b * in, in, n, o0 == p.row_begin);
          b += 4;
        }
        if (b + 2 <= p.batch) {
          microkernel_t<2>(g + b * out, out, pq, kc, dx + b * in, in, n, o0 == p.row_begin);
          b += 2;
        }
        if (b < p.batch) microkernel_t<1>(g + b * out, out, pq, kc, dx + b * in, in, n, o0 == p.row_begin);
      }
    }
  }
}

// lora_up, bit-identical to the scalar specification: 16 outputs per step as four vectors, each
// lane the scalar arithmetic of its output (rounded products u[j, k] * B[o, k] added over k in
// increasing order, then times the row's scale, then added to y; the build forbids FMA
// contraction, so vmulq/vaddq round as the scalar code does). A tile of kLoraTile outputs of B
// is copied k-major into scratch once per 16-output block and shared by every listed row,
// kLoraRows rows at a time (4 rows x 4 accumulators and the 4 B vectors fit the 32 registers),
// each row running along a contiguous piece of its y row rather than striding across rows.
constexpr int kLoraRows = 4;
constexpr int64_t kLoraTile = 256;

template <int NR>
void lora_up_rows(const float* u, int64_t rank, const float* bt, const float* scale, float* const* yrow, int64_t len) {
  for (int64_t c = 0; c < len; c += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - c));
    const float* btc = bt + c * rank;
    float32x4_t acc[NR][4];
    for (int i = 0; i < NR; ++i) {
      for (int q = 0; q < 4; ++q) acc[i][q] = vdupq_n_f32(0.0f);
    }
    for (int64_t k = 0; k < rank; ++k) {
      float32x4_t bk[4];
      for (int q = 0; q < 4; ++q) bk[q] = vld1q_f32(btc + k * 16 + 4 * q);
      for (int i = 0; i < NR; ++i) {
        const float32x4_t uk = vdupq_n_f32(u[i * rank + k]);
        for (int q = 0; q < 4; ++q) acc[i][q] = vaddq_f32(acc[i][q], vmulq_f32(uk, bk[q]));
      }
    }
    for (int i = 0; i < NR; ++i) {
      const float32x4_t s = vdupq_n_f32(scale[i]);
      float* yc = yrow[i] + c;
      if (n == 16) {
        for (int q = 0; q < 4; ++q) vst1q_f32(yc + 4 * q, vaddq_f32(vld1q_f32(yc + 4 * q), vmulq_f32(s, acc[i][q])));
      } else {
        alignas(16) float t[16];
        for (int q = 0; q < 4; ++q) vst1q_f32(t + 4 * q, vmulq_f32(s, acc[i][q]));
        for (int l = 0; l < n; ++l) yc[l] += t[l];
      }
    }
  }
}

void lora_up(const float* u, int64_t rank, const float* b, float scaling, const float* row_scale,
             const int64_t* rows, int64_t n_rows, int64_t out_features, int64_t o_begin, int64_t o_end,
             float* y) {
  if (n_rows <= 0 || o_end <= o_begin) return;
  thread_local std::vector<float> bt_buf;
  bt_buf.resize(static_cast<size_t>(std::max<int64_t>(rank, 1) * kLoraTile));
  float* bt = bt_buf.data();
  for (int64_t t0 = o_begin; t0 < o_end; t0 += kLoraTile) {
    const int64_t len = std::min(kLoraTile, o_end - t0);
    for (int64_t c = 0; c < len; c += 16) {
      float* btc = bt + c * rank;
      for (int64_t k = 0; k < rank; ++k) {
        for (int l = 0; l < 16; ++l) btc[k * 16 + l] = c + l < len ? b[(t0 + c + l) * rank + k] : 0.0f;
      }
    }
    for (int64_t j = 0; j < n_rows; j += kLoraRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kLoraRows, n_rows - j));
      float* yrow[kLoraRows];
      float scale[kLoraRows];
      for (int i = 0; i < nr; ++i) {
        const int64_t r = rows != nullptr ? rows[j + i] : j + i;
        yrow[i] = y + r * out_features + t0;
        scale[i] = row_scale != nullptr ? row_scale[j + i] : scaling;
      }
      const float* uj = u + j * rank;
      switch (nr) {
        case 1: lora_up_rows<1>(uj, rank, bt, scale, yrow, len); break;
        case 2: lora_up_rows<2>(uj, rank, bt, scale, yrow, len); break;
        case 3: lora_up_rows<3>(uj, rank, bt, scale, yrow, len); break;
        default: lora_up_rows<kLoraRows>(uj, rank, bt, scale, yrow, len); break;
      }
    }
  }
}

KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "neon";
  t.required_features = kFeatureNeon;
  t.group_absmax = group_absmax;
  t.quantize_rows = quantize_rows;
  t.dequantize_rows = dequantize_rows;
  t.lora_down = lora_down;
  t.lora_up = lora_up;
  t.gemm_nf4_f32 = {forward_rows, kTileRows, 1};
  t.gemm_nf4t_f32 = gemm_nf4t_f32;
  t.col_block = kBlockCols;
  return t;
}

}  // namespace

const KernelTable* table() {
  static const KernelTable t = make_kernel_table();
  return &t;
}

}  // namespace neon
}  // namespace kernels
}  // namespace qlora

#else  // not aarch64

namespace qlora {
namespace kernels {
namespace neon {
const KernelTable* table() { return nullptr; }
}  // namespace neon
}  // namespace kernels
}  // namespace qlora

#endif
