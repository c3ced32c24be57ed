// The AVX512-BF16 kernels, for x86-64 CPUs with AVX-512 (F, BW, VL, DQ) and AVX512_BF16 (Cooper
// Lake, Sapphire Rapids, Zen 4 and later): the bf16 activation packing and the bf16 forward
// product. The file is compiled with baseline flags; everything that touches a ZMM register lives
// in the target region "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma" below (GCC's
// target pragma, or clang's attribute push). NF4 codes decode straight to bf16 weights: per
// group a 16-entry table codebook * scale is rounded to bf16 once (one multiply, one convert)
// and looked up with vpermw from the nibbles; vdpbf16ps multiplies pairs of columns into fp32
// accumulators. Every other entry comes from the ISAs below this one in isa_list.h. On other
// architectures table() returns nullptr.
#include "qlora/kernels.h"

#if defined(__x86_64__)

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qlora {
namespace kernels {
namespace avx512_bf16 {
namespace {

#include "x86_baseline_inl.h"  // into this ISA's namespace, see the header

}  // namespace
}  // namespace avx512_bf16
}  // namespace kernels
}  // namespace qlora

#if defined(__clang__)
#pragma clang attribute push(                                                                    \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
// GCC 12's AVX-512 headers start masked intrinsics from a deliberately undefined register and
// warn about it once inlined (GCC PR 105593); the warning says nothing about this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace qlora {
namespace kernels {
namespace avx512_bf16 {
namespace {

#define QLORA_VEC_INLINE inline __attribute__((always_inline))

// Arithmetic of the product (precision.h defines the bf16 precision). vdpbf16ps computes, per
// fp32 lane, acc = rne(rne(acc + a[2l+1] * b[2l+1]) + a[2l] * b[2l]) (Intel SDM: each
// accumulation rounds to nearest even; the product of two bf16 values is exact in fp32; MXCSR is
// neither read nor written; denormal inputs are read as zero and denormal results flushed to
// zero; probed on Zen 4: the odd product is added first). So every output element here is a
// float32 sum of the same exact products as the scalar specification, in another order: each
// addition rounds once, and any order of summing n terms t_i is within (n - 1) * 2^-24 *
// sum |t_i| of the exact sum (first order), as is the specification's. The flushes add at most
// 2^-126 per addition and, for a denormal bf16 operand v (never produced by pack_bf16 for a
// normal x, nor by the weight tables: vcvtne2ps2bf16 flushes denormals), |v * other| <
// 2^-126 * |other| per term. tests/cpp/test_precision_bf16.cpp asserts that bound.
//
// Column order. A 64-column chunk of the packed layout is two 16-byte blocks A and B; byte j of
// a block holds columns j (low nibble) and j + 16 (high nibble). Zero-extending the chunk's 32
// bytes to 16-bit lanes puts block A's bytes in lanes 0-15 and B's in 16-31, so the low nibbles
// give columns [0, 16) and [32, 48) of the chunk, the high nibbles (one shift) [16, 32) and
// [48, 64): "chunk order", in which the first vector pairs adjacent columns as vdpbf16ps wants.
// Activations are permuted into chunk order once per call (a quarter swap of each 64 columns),
// and every path below works in it.
constexpr int64_t kChunkCols = 2 * kBlockCols;
constexpr int64_t kChunkBytes = 2 * kBlockBytes;
// The GEMM: panels of 32 output rows x kKc columns (chunk order), decoded to bf16 pairs once and
// reused by every batch row through a kMaxMr x 32 register tile (24 accumulators). The panel
// (32 KiB) and the packed activations of a K-chunk (up to 256 x kKc bf16, 256 KiB) stay in L2.
constexpr int kPanelUnits = 2;
constexpr int kPanelRows = 16 * kPanelUnits;
constexpr int kMaxMr = 12;
constexpr int64_t kKc = 512;
static_assert(kKc % kChunkCols == 0, "K-chunks hold whole chunks");
// Batch 1 runs kGemvRows rows at a time from registers; batches up to kSmallBatch decode
// kSmallRows rows to L1 and run kSmallRows x kSmallBatchTile register tiles over them. Measured
// on one Zen 4 core (1024 x 4096, group 64): the register paths run at the GEMM's rate from
// batch 4 on (about 320 GFLOP/s); the GEMM is as fast at 24 rows (two full 12-row tiles) and
// ahead from 32 (330 against 305 GFLOP/s; 367 against 300 at 64).
constexpr int kGemvRows = 4;
constexpr int64_t kSmallBatch = 24;
constexpr int kSmallRows = 4;
constexpr int kSmallBatchTile = 4;
// With groups of whole chunks, small batches decode in registers instead: kRegsRows rows x
// kRegsBatchTile batch rows per pass (16 accumulators, 4 tables, 2 decoded vectors).
constexpr int kRegsRows = 4;
constexpr int kRegsBatchTile = 4;

// Columns of a row in chunk order (whole chunks; a last lone block is padded with a zero one).
int64_t chunk_cols(int64_t in_features) { return (blocks_per_row(in_features) + 1) / 2 * kChunkCols; }

// How the groups of a layer meet the chunks, which decides how a chunk finds its scales.
enum class Layout {
  kChunkGroups,  // every chunk inside one group: group_size % 64 == 0 and rows hold whole groups
  kBlockGroups,  // every block inside one group: group_size % 64 == 32, rows hold whole groups
  kGeneral,      // groups straddle blocks or rows start mid-group: scales per column
};
Layout layout_of(const Nf4Weight& w) {
  if (w.group_size % kBlockCols != 0 || w.in_features % w.group_size != 0) return Layout::kGeneral;
  return w.group_size % kChunkCols == 0 ? Layout::kChunkGroups : Layout::kBlockGroups;
}

QLORA_VEC_INLINE __m512bh as_bh(__m512i v) { return (__m512bh)v; }
QLORA_VEC_INLINE __m512i as_i(__m512bh v) { return (__m512i)v; }
QLORA_VEC_INLINE __m512 dot2(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, as_bh(a), as_bh(b)); }

// The bf16 table of one group in both halves (vpermw reads 5 index bits; the fifth is noise
// for a low nibble taken from a whole byte, so both halves hold the same 16 entries).
QLORA_VEC_INLINE __m512i group_table(float scale) {
  const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(kNf4Codebook), _mm512_set1_ps(scale));
  return as_i(_mm512_cvtne2ps_pbh(v, v));
}
// Block A's table in lanes 0-15 and block B's in 16-31, for indexes that carry bit 4 = block.
QLORA_VEC_INLINE __m512i block_tables(float scale_a, float scale_b) {
  const __m512 cb = _mm512_loadu_ps(kNf4Codebook);
  return as_i(_mm512_cvtne2ps_pbh(_mm512_mul_ps(cb, _mm512_set1_ps(scale_b)), _mm512_mul_ps(cb, _mm512_set1_ps(scale_a))));
}

// The 32 bytes of a chunk as 16-bit lanes; a lone last block reads only its own 16 bytes.
QLORA_VEC_INLINE __m512i chunk_bytes(const uint8_t* p) {
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
QLORA_VEC_INLINE __m512i block_bytes(const uint8_t* p) {
  return _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// One chunk of one row in chunk order, both blocks in one group.
QLORA_VEC_INLINE void decode_chunk(__m512i bytes, __m512i table, __m512i& w0, __m512i& w1) {
  w0 = _mm512_permutexvar_epi16(bytes, table);
  w1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);
}
// The same with block_tables(): bit 4 of each index selects its block's table. `lanes` zeroes
// the missing block B of a lone last block.
QLORA_VEC_INLINE void decode_chunk_blocks(__m512i bytes, __m512i table, __mmask32 lanes, __m512i& w0, __m512i& w1) {
  const __m512i sel = _mm512_maskz_set1_epi16(0xffff0000u, 0x10);
  const __m512i lo = _mm512_ternarylogic_epi32(bytes, _mm512_set1_epi16(0x0f), sel, 0xea);  // (a & b) | c
  const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(bytes, 4), sel);
  w0 = _mm512_maskz_permutexvar_epi16(lanes, lo, table);
  w1 = _mm512_maskz_permutexvar_epi16(lanes, hi, table);
}

// x_bf16 (natural column order, padded_cols wide) into chunk order, chunk_cols wide.
void x_chunk_order(const uint16_t* x, int64_t cols, int64_t rows, uint16_t* out) {
  const int64_t ccols = chunk_cols(cols);
  for (int64_t b = 0; b < rows; ++b) {
    const uint16_t* src = x + b * cols;
    uint16_t* dst = out + b * ccols;
    for (int64_t c = 0; c < cols; c += kChunkCols) {
      const __m512i a = _mm512_loadu_si512(src + c);
      const __m512i bb = c + kBlockCols < cols ? _mm512_loadu_si512(src + c + kBlockCols) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + c, _mm512_shuffle_i64x2(a, bb, 0x44));
      _mm512_storeu_si512(dst + c + kBlockCols, _mm512_shuffle_i64x2(a, bb, 0xee));
    }
  }
}

// Chunk-order columns [c0, c1) of row r (c0, c1 multiples of 64, c1 <= chunk_cols) as bf16
// weights into out[0 .. c1 - c0): what every path multiplies, bit for bit the same whatever the
// layout (the general one rounds codebook[c] * scale per column with the same convert).
void decode_row(const Nf4Weight& w, Layout layout, int64_t r, int64_t c0, int64_t c1, uint16_t* out) {
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in), blocks = blocks_per_row(in);
  const uint8_t* codes = w.codes + r * row_bytes;
  if (layout == Layout::kChunkGroups) {
    const int64_t cpg = w.group_size / kChunkCols, gpr = in / w.group_size;
    int64_t j = c0 / kChunkCols, g = j / cpg, left = cpg - j % cpg;
    __m512i table = group_table(group_scale(w, r * gpr + g));
    for (; j < c1 / kChunkCols; ++j) {
      if (left == 0) {
        table = group_table(group_scale(w, r * gpr + ++g));
        left = cpg;
      }
      --left;
      __m512i w0, w1;
      decode_chunk(chunk_bytes(codes + j * kChunkBytes), table, w0, w1);
      _mm512_storeu_si512(out + j * kChunkCols - c0, w0);
      _mm512_storeu_si512(out + j * kChunkCols - c0 + kBlockCols, w1);
    }
    return;
  }
  if (layout == Layout::kBlockGroups) {
    // Block b of the row is in group b / bpg of the row, followed without dividing per block.
    const int64_t bpg = w.group_size / kBlockCols, gpr = in / w.group_size;
    int64_t g = (c0 / kBlockCols) / bpg, left = bpg - (c0 / kBlockCols) % bpg;
    float sa = group_scale(w, r * gpr + g);
    for (int64_t j = c0 / kChunkCols; j < c1 / kChunkCols; ++j) {
      const bool lone = 2 * j + 1 >= blocks;
      if (--left == 0) {
        ++g;
        left = bpg;
      }
      const float sb = lone ? 0.0f : group_scale(w, r * gpr + g);
      if (--left == 0) {
        ++g;
        left = bpg;
      }
      const uint8_t* src = codes + 2 * j * kBlockBytes;
      const __m512i bytes = lone ? block_bytes(src) : chunk_bytes(src);
      __m512i w0, w1;
      decode_chunk_blocks(bytes, block_tables(sa, sb), lone ? 0x0000ffffu : 0xffffffffu, w0, w1);
      _mm512_storeu_si512(out + j * kChunkCols - c0, w0);
      _mm512_storeu_si512(out + j * kChunkCols - c0 + kBlockCols, w1);
      if (!lone && 2 * j + 2 < blocks) sa = group_scale(w, r * gpr + g);
    }
    return;
  }
  // General groups: 16 columns at a time in float32 (codebook times each column's scale), then
  // to bf16. Natural columns [n, n + 16) land at chunk-order offset n with quarters 1 and 2 of
  // each chunk swapped.
  const __m512 cb = _mm512_loadu_ps(kNf4Codebook);
  for (int64_t n = c0; n < c1; n += 16) {
    const int64_t q = (n / 16) % 4;
    const int64_t pos = n - c0 + (q == 1 ? 16 : q == 2 ? -16 : 0);
    const int64_t valid = imax(0, imin(16, in - n));
    if (valid == 0) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + pos), _mm256_setzero_si256());
      continue;
    }
    const int64_t flat = r * in + n;
    alignas(64) float s[16] = {};
    int64_t g = flat / w.group_size, group_end = (g + 1) * w.group_size;
    float sg = group_scale(w, g);
    // One group for the 16 columns (lanes past the row are padding codes, zero for any scale):
    // a broadcast, without the store-to-load round trip of a per-lane array.
    const bool one_group = flat + valid <= group_end;
    for (int64_t i = 0; i < valid && !one_group; ++i) {
      if (flat + i == group_end) {
        sg = group_scale(w, ++g);
        group_end += w.group_size;
      }
      s[i] = sg;
    }
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (n / kBlockCols) * kBlockBytes));
    __m512i idx = _mm512_cvtepu8_epi32(raw);
    if (q % 2 == 1) idx = _mm512_srli_epi32(idx, 4);
    const __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(idx, cb), one_group ? _mm512_set1_ps(sg) : _mm512_load_ps(s));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + pos), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

float finish(const ForwardArgs& p, int64_t o, __m512 acc) {
  float y = _mm512_reduce_add_ps(acc);
  if (p.bias != nullptr) y += p.bias[o];
  return y;
}

// ---------------------------------------------------------------- batch 1
// R rows from registers, groups of whole chunks: per 64 codes one load with zero extension, one
// shift, two vpermw and two vdpbf16ps per row (plus one multiply and convert per group). Two
// accumulators per row (one per vector of the chunk) keep R * 2 chains in flight.
template <int R>
void gemv_chunk_groups(const ForwardArgs& p, const uint16_t* x, int64_t o) {
  const Nf4Weight& w = p.w;
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in);
  const int64_t gpr = in / w.group_size, cpg = w.group_size / kChunkCols;
  const uint8_t* rows[R];
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = w.codes + (o + r) * row_bytes;
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
  // The next R rows follow these in memory: fetch them at the pace these are read.
  const char* next = reinterpret_cast<const char*>(w.codes + (o + R) * row_bytes);
  int64_t j = 0;
  for (int64_t g = 0; g < gpr; ++g) {
    __m512i table[R];
    for (int r = 0; r < R; ++r) table[r] = group_table(group_scale(w, (o + r) * gpr + g));
    for (int64_t k = 0; k < cpg; ++k, ++j) {
      for (int l = 0; l < R * kChunkBytes; l += 64) _mm_prefetch(next + j * (R * kChunkBytes) + l, _MM_HINT_T0);
      const __m512i x0 = _mm512_loadu_si512(x + j * kChunkCols);
      const __m512i x1 = _mm512_loadu_si512(x + j * kChunkCols + kBlockCols);
      for (int r = 0; r < R; ++r) {
        __m512i w0, w1;
        decode_chunk(chunk_bytes(rows[r] + j * kChunkBytes), table[r], w0, w1);
        acc0[r] = dot2(acc0[r], w0, x0);
        acc1[r] = dot2(acc1[r], w1, x1);
      }
    }
  }
  for (int r = 0; r < R; ++r) p.y[o + r] = finish(p, o + r, _mm512_add_ps(acc0[r], acc1[r]));
}

// Small batches, groups of whole chunks: R rows decoded in registers as above, each decoded
// chunk used by NB batch rows (x read from L1/L2), one accumulator per (row, batch row) pair,
// each one chain over the chunks whatever R and NB are.
template <int R, int NB>
void gemm_regs(const ForwardArgs& p, const uint16_t* x, int64_t ccols, int64_t o, int64_t b0) {
  const Nf4Weight& w = p.w;
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in);
  const int64_t gpr = in / w.group_size, cpg = w.group_size / kChunkCols;
  const uint8_t* rows[R];
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r) {
    rows[r] = w.codes + (o + r) * row_bytes;
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  }
  const uint16_t* xb = x + b0 * ccols;
  int64_t j = 0;
  for (int64_t g = 0; g < gpr; ++g) {
    __m512i table[R];
    for (int r = 0; r < R; ++r) table[r] = group_table(group_scale(w, (o + r) * gpr + g));
    for (int64_t k = 0; k < cpg; ++k, ++j) {
      for (int r = 0; r < R; ++r) {
        __m512i w0, w1;
        decode_chunk(chunk_bytes(rows[r] + j * kChunkBytes), table[r], w0, w1);
        for (int b = 0; b < NB; ++b) {
          acc[r][b] = dot2(acc[r][b], w0, _mm512_loadu_si512(xb + b * ccols + j * kChunkCols));
          acc[r][b] = dot2(acc[r][b], w1, _mm512_loadu_si512(xb + b * ccols + j * kChunkCols + kBlockCols));
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < NB; ++b) p.y[(b0 + b) * w.out_features + o + r] = finish(p, o + r, acc[r][b]);
  }
}

template <int NB>
void gemm_regs_rows(const ForwardArgs& p, const uint16_t* x, int64_t ccols, int64_t row_begin, int64_t row_end,
                    int64_t b0) {
  int64_t o = row_begin;
  for (; o + kRegsRows <= row_end; o += kRegsRows) gemm_regs<kRegsRows, NB>(p, x, ccols, o, b0);
  for (; o < row_end; ++o) gemm_regs<1, NB>(p, x, ccols, o, b0);
}

void gemm_small_regs(const ForwardArgs& p, const uint16_t* x, int64_t row_begin, int64_t row_end) {
  const int64_t ccols = chunk_cols(p.w.in_features);
  for (int64_t b0 = 0; b0 < p.batch; b0 += kRegsBatchTile) {
    switch (imin(kRegsBatchTile, p.batch - b0)) {
      case 1: gemm_regs_rows<1>(p, x, ccols, row_begin, row_end, b0); break;
      case 2: gemm_regs_rows<2>(p, x, ccols, row_begin, row_end, b0); break;
      case 3: gemm_regs_rows<3>(p, x, ccols, row_begin, row_end, b0); break;
      default: gemm_regs_rows<4>(p, x, ccols, row_begin, row_end, b0); break;
    }
  }
}
static_assert(kRegsBatchTile == 4, "gemm_small_regs() handles tiles of up to 4 batch rows");

// R rows from registers, groups of an odd number of blocks (32, 96, ...): each chunk's two
// blocks may have different scales, so the table pair is made per chunk and row; the sums are
// those of gemv_chunk_groups().
template <int R>
void gemv_block_groups(const ForwardArgs& p, const uint16_t* x, int64_t o) {
  const Nf4Weight& w = p.w;
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in), blocks = blocks_per_row(in);
  const int64_t gpr = in / w.group_size, bpg = w.group_size / kBlockCols;
  const uint8_t* rows[R];
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = w.codes + (o + r) * row_bytes;
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
  // Every row has the same groups at the same blocks (rows hold whole groups).
  int64_t g = 0, left = bpg;
  for (int64_t j = 0; 2 * j < blocks; ++j) {
    const bool lone = 2 * j + 1 >= blocks;
    const int64_t ga = g;
    if (--left == 0) {
      ++g;
      left = bpg;
    }
    const int64_t gb = g;
    if (--left == 0) {
      ++g;
      left = bpg;
    }
    const __m512i x0 = _mm512_loadu_si512(x + j * kChunkCols);
    const __m512i x1 = _mm512_loadu_si512(x + j * kChunkCols + kBlockCols);
    for (int r = 0; r < R; ++r) {
      const int64_t g0 = (o + r) * gpr;
      const __m512i table = block_tables(group_scale(w, g0 + ga), lone ? 0.0f : group_scale(w, g0 + gb));
      const uint8_t* src = rows[r] + j * kChunkBytes;
      __m512i w0, w1;
      decode_chunk_blocks(lone ? block_bytes(src) : chunk_bytes(src), table, lone ? 0x0000ffffu : 0xffffffffu, w0, w1);
      acc0[r] = dot2(acc0[r], w0, x0);
      acc1[r] = dot2(acc1[r], w1, x1);
    }
  }
  for (int r = 0; r < R; ++r) p.y[o + r] = finish(p, o + r, _mm512_add_ps(acc0[r], acc1[r]));
}

// Any layout: the row is decoded to bf16 in L1 first, then summed exactly as above.
void gemv_decoded(const ForwardArgs& p, const uint16_t* x, int64_t o, uint16_t* row) {
  const int64_t ccols = chunk_cols(p.w.in_features);
  decode_row(p.w, layout_of(p.w), o, 0, ccols, row);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t c = 0; c < ccols; c += kChunkCols) {
    acc0 = dot2(acc0, _mm512_loadu_si512(row + c), _mm512_loadu_si512(x + c));
    acc1 = dot2(acc1, _mm512_loadu_si512(row + c + kBlockCols), _mm512_loadu_si512(x + c + kBlockCols));
  }
  p.y[o] = finish(p, o, _mm512_add_ps(acc0, acc1));
}

// ---------------------------------------------------------------- small batches
// R decoded rows (chunk order, stride ccols) times NB batch rows of x: one accumulator per pair,
// each one chain over the chunks, whatever R and NB are.
template <int R, int NB>
void small_tile(const ForwardArgs& p, const uint16_t* wrows, const uint16_t* x, int64_t ccols, int64_t o, int64_t b0) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < ccols; c += kBlockCols) {
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(wrows + r * ccols + c);
    for (int b = 0; b < NB; ++b) {
      const __m512i xv = _mm512_loadu_si512(x + (b0 + b) * ccols + c);
      for (int r = 0; r < R; ++r) acc[r][b] = dot2(acc[r][b], wv[r], xv);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < NB; ++b) p.y[(b0 + b) * p.w.out_features + o + r] = finish(p, o + r, acc[r][b]);
  }
}

template <int R>
void small_rows(const ForwardArgs& p, const uint16_t* wrows, const uint16_t* x, int64_t ccols, int64_t o) {
  int64_t b0 = 0;
  for (; b0 + kSmallBatchTile <= p.batch; b0 += kSmallBatchTile) small_tile<R, kSmallBatchTile>(p, wrows, x, ccols, o, b0);
  switch (p.batch - b0) {
    case 1: small_tile<R, 1>(p, wrows, x, ccols, o, b0); break;
    case 2: small_tile<R, 2>(p, wrows, x, ccols, o, b0); break;
    case 3: small_tile<R, 3>(p, wrows, x, ccols, o, b0); break;
    default: break;
  }
}
static_assert(kSmallBatchTile == 4, "small_rows() handles tails of up to 3 batch rows");

void gemm_small(const ForwardArgs& p, const uint16_t* x, int64_t row_begin, int64_t row_end) {
  const int64_t ccols = chunk_cols(p.w.in_features);
  const Layout layout = layout_of(p.w);
  uint16_t* wrows = reinterpret_cast<uint16_t*>(scratch(0, static_cast<size_t>(kSmallRows * ccols / 2)));
  int64_t o = row_begin;
  for (; o + kSmallRows <= row_end; o += kSmallRows) {
    for (int r = 0; r < kSmallRows; ++r) decode_row(p.w, layout, o + r, 0, ccols, wrows + r * ccols);
    small_rows<kSmallRows>(p, wrows, x, ccols, o);
  }
  for (; o < row_end; ++o) {
    decode_row(p.w, layout, o, 0, ccols, wrows);
    small_rows<1>(p, wrows, x, ccols, o);
  }
}

// ---------------------------------------------------------------- GEMM
// 16x16 transpose of 32-bit lanes (here bf16 pairs): pairs of rows interleaved by 32 bits, then
// by 64 bits, then 128-bit lanes gathered across four registers twice.
QLORA_VEC_INLINE void transpose16(__m512i r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(_mm512_castsi512_ps(r[2 * i]), _mm512_castsi512_ps(r[2 * i + 1]));
    t[2 * i + 1] = _mm512_unpackhi_ps(_mm512_castsi512_ps(r[2 * i]), _mm512_castsi512_ps(r[2 * i + 1]));
  }
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 v01 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    const __m512 w01 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);
    const __m512 v23 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 w23 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
    r[0 + j] = _mm512_castps_si512(_mm512_shuffle_f32x4(v01, v23, 0x88));
    r[4 + j] = _mm512_castps_si512(_mm512_shuffle_f32x4(w01, w23, 0x88));
    r[8 + j] = _mm512_castps_si512(_mm512_shuffle_f32x4(v01, v23, 0xdd));
    r[12 + j] = _mm512_castps_si512(_mm512_shuffle_f32x4(w01, w23, 0xdd));
  }
}

// Rows [o0, o0 + nrows) x chunk-order columns [k0, k0 + kc) as bf16 pairs, pair-major:
// panel[kp * kPanelRows + row] is (w[row][2kp], w[row][2kp + 1]) of the K-chunk; rows past
// nrows are zero. rowbuf holds 16 decoded rows of kKc columns.
void decode_panel(const Nf4Weight& w, Layout layout, int64_t o0, int nrows, int64_t k0, int64_t kc,
                  uint16_t* rowbuf, uint32_t* panel) {
  for (int u = 0; u < kPanelUnits; ++u) {
    const int vr = static_cast<int>(imax(0, imin(16, nrows - 16 * u)));
    for (int i = 0; i < vr; ++i) decode_row(w, layout, o0 + 16 * u + i, k0, k0 + kc, rowbuf + i * kKc);
    for (int64_t c = 0; c < kc; c += kBlockCols) {
      __m512i t[16];
      for (int i = 0; i < 16; ++i) t[i] = i < vr ? _mm512_loadu_si512(rowbuf + i * kKc + c) : _mm512_setzero_si512();
      transpose16(t);
      for (int m = 0; m < 16; ++m) _mm512_store_si512(panel + (c / 2 + m) * kPanelRows + 16 * u, t[m]);
    }
  }
}

// Chunk-order columns [k0, k0 + kc) of x as bf16 pairs, pair-major per tile of tile_rows <=
// kMaxMr batch rows: xpack[t][kp][i], so each step of the register tile broadcasts from one
// cache line.
void pack_x(const ForwardArgs& p, int64_t k0, int64_t kc, int64_t tiles, int64_t tile_rows, uint32_t* xpack) {
  const int64_t cols = padded_cols(p.w.in_features);
  for (int64_t t = 0; t < tiles; ++t) {
    const int mr = static_cast<int>(imin(tile_rows, p.batch - t * tile_rows));
    const uint16_t* src = p.x_bf16 + t * tile_rows * cols;
    uint32_t* dst = xpack + t * kMaxMr * (kc / 2);
    for (int64_t c = k0; c < k0 + kc; c += kChunkCols) {
      __m512i lo[16], hi[16];
      for (int i = 0; i < 16; ++i) {
        if (i >= mr) {
          lo[i] = hi[i] = _mm512_setzero_si512();
          continue;
        }
        const __m512i a = _mm512_loadu_si512(src + i * cols + c);
        const __m512i b = c + kBlockCols < cols ? _mm512_loadu_si512(src + i * cols + c + kBlockCols) : _mm512_setzero_si512();
        lo[i] = _mm512_shuffle_i64x2(a, b, 0x44);
        hi[i] = _mm512_shuffle_i64x2(a, b, 0xee);
      }
      transpose16(lo);
      transpose16(hi);
      const int64_t kp = (c - k0) / 2;
      for (int m = 0; m < 16; ++m) {
        _mm512_mask_storeu_epi32(dst + (kp + m) * kMaxMr, (1u << kMaxMr) - 1, lo[m]);
        _mm512_mask_storeu_epi32(dst + (kp + 16 + m) * kMaxMr, (1u << kMaxMr) - 1, hi[m]);
      }
    }
  }
}

// MR batch rows x kPanelRows output rows over one K-chunk, into y (partial sums of earlier
// K-chunks are read back from y, exactly; the bias is added after the last).
template <int MR>
void micro_tile(const ForwardArgs& p, const uint32_t* panel, const uint32_t* xp, int64_t npairs, int64_t b0,
                int64_t o0, int nrows, bool first, bool last) {
  const int64_t out = p.w.out_features;
  __mmask16 m[kPanelUnits];
  for (int u = 0; u < kPanelUnits; ++u) {
    const int n = static_cast<int>(imax(0, imin(16, nrows - 16 * u)));
    m[u] = static_cast<__mmask16>((1u << n) - 1u);
  }
  __m512 acc[MR][kPanelUnits];
  for (int i = 0; i < MR; ++i) {
    for (int u = 0; u < kPanelUnits; ++u) {
      acc[i][u] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m[u], p.y + (b0 + i) * out + o0 + 16 * u);
    }
  }
  for (int64_t k = 0; k < npairs; ++k) {
    __m512i wv[kPanelUnits];
    for (int u = 0; u < kPanelUnits; ++u) wv[u] = _mm512_load_si512(panel + k * kPanelRows + 16 * u);
    for (int i = 0; i < MR; ++i) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(xp[k * kMaxMr + i]));
      for (int u = 0; u < kPanelUnits; ++u) acc[i][u] = dot2(acc[i][u], wv[u], xb);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int u = 0; u < kPanelUnits; ++u) {
      __m512 v = acc[i][u];
      if (last && p.bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m[u], p.bias + o0 + 16 * u));
      _mm512_mask_storeu_ps(p.y + (b0 + i) * out + o0 + 16 * u, m[u], v);
    }
  }
}

template <int MR>
void micro_tile_n(int mr, const ForwardArgs& p, const uint32_t* panel, const uint32_t* xp, int64_t npairs,
                  int64_t b0, int64_t o0, int nrows, bool first, bool last) {
  if constexpr (MR > 0) {
    if (mr == MR) return micro_tile<MR>(p, panel, xp, npairs, b0, o0, nrows, first, last);
    micro_tile_n<MR - 1>(mr, p, panel, xp, npairs, b0, o0, nrows, first, last);
  }
}

// K-chunks outermost: the packed x of a chunk is made once and stays in L2 while every panel of
// the row range is decoded and multiplied; y carries the partial sums between K-chunks.
void gemm_panels(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  const int64_t ccols = chunk_cols(p.w.in_features);
  // Tiles of nearly equal height (17 rows: 9 + 8, not 12 + 5): a short tile reloads the panel
  // for few accumulators.
  const int64_t tiles = (p.batch + kMaxMr - 1) / kMaxMr;
  const int64_t tile_rows = (p.batch + tiles - 1) / tiles;
  const Layout layout = layout_of(p.w);
  uint32_t* panel = reinterpret_cast<uint32_t*>(scratch(0, static_cast<size_t>(kKc / 2 * kPanelRows)));
  uint16_t* rowbuf = reinterpret_cast<uint16_t*>(scratch(1, static_cast<size_t>(16 * kKc / 2)));
  uint32_t* xpack = reinterpret_cast<uint32_t*>(scratch(2, static_cast<size_t>(tiles * kMaxMr * kKc / 2)));
  for (int64_t k0 = 0; k0 < ccols; k0 += kKc) {
    const int64_t kc = imin(kKc, ccols - k0);
    const bool first = k0 == 0, last = k0 + kc == ccols;
    pack_x(p, k0, kc, tiles, tile_rows, xpack);
    for (int64_t o0 = row_begin; o0 < row_end; o0 += kPanelRows) {
      const int nrows = static_cast<int>(imin(kPanelRows, row_end - o0));
      decode_panel(p.w, layout, o0, nrows, k0, kc, rowbuf, panel);
      for (int64_t t = 0; t < tiles; ++t) {
        const int mr = static_cast<int>(imin(tile_rows, p.batch - t * tile_rows));
        micro_tile_n<kMaxMr>(mr, p, panel, xpack + t * kMaxMr * (kc / 2), kc / 2, t * tile_rows, o0, nrows, first, last);
      }
    }
  }
}

// ---------------------------------------------------------------- entries

// f32_to_bf16's rounding of finite values, in integer arithmetic (the specification's own).
QLORA_VEC_INLINE __m256i bf16_integer(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// f32_to_bf16 (precision.h) on 32 columns at a time. vcvtne2ps2bf16 rounds to nearest even and
// quiets NaN exactly as the specification does, but flushes denormal inputs to a signed zero
// where the specification rounds them (to a bf16 denormal or the smallest normal); lanes with a
// zero exponent take the specification's integer rounding instead.
void pack_bf16(const float* x, int64_t in_features, int64_t b_begin, int64_t b_end, uint16_t* out) {
  const int64_t cols = padded_cols(in_features);
  const __m512i exp_mask = _mm512_set1_epi32(0x7f800000);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const float* src = x + b * in_features;
    uint16_t* dst = out + b * cols;
    for (int64_t c = 0; c < cols; c += kBlockCols) {
      const int64_t n0 = imax(0, imin(16, in_features - c)), n1 = imax(0, imin(16, in_features - c - 16));
      const __m512 v0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n0) - 1u), src + c);
      const __m512 v1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n1) - 1u), src + c + 16);
      __m512i r = as_i(_mm512_cvtne2ps_pbh(v1, v0));
      const __mmask16 z0 = _mm512_testn_epi32_mask(_mm512_castps_si512(v0), exp_mask);
      const __mmask16 z1 = _mm512_testn_epi32_mask(_mm512_castps_si512(v1), exp_mask);
      if (static_cast<uint32_t>(z0 & ~_mm512_testn_epi32_mask(_mm512_castps_si512(v0), _mm512_set1_epi32(0x7fffffff))) != 0 ||
          static_cast<uint32_t>(z1 & ~_mm512_testn_epi32_mask(_mm512_castps_si512(v1), _mm512_set1_epi32(0x7fffffff))) != 0) {
        const __m512i s = _mm512_inserti64x4(_mm512_castsi256_si512(bf16_integer(v0)), bf16_integer(v1), 1);
        r = _mm512_mask_blend_epi16(static_cast<__mmask32>(z0) | (static_cast<__mmask32>(z1) << 16), r, s);
      }
      _mm512_storeu_si512(dst + c, r);
    }
  }
}

void gemm_nf4_bf16(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  if (p.batch > kSmallBatch) return gemm_panels(p, row_begin, row_end);
  const int64_t cols = padded_cols(p.w.in_features), ccols = chunk_cols(p.w.in_features);
  uint16_t* x = reinterpret_cast<uint16_t*>(scratch(2, static_cast<size_t>(p.batch * ccols / 2)));
  x_chunk_order(p.x_bf16, cols, p.batch, x);
  const bool chunk_groups = layout_of(p.w) == Layout::kChunkGroups;
  if (p.batch > 1) return chunk_groups ? gemm_small_regs(p, x, row_begin, row_end) : gemm_small(p, x, row_begin, row_end);
  if (chunk_groups) {
    int64_t o = row_begin;
    for (; o + kGemvRows <= row_end; o += kGemvRows) gemv_chunk_groups<kGemvRows>(p, x, o);
    for (; o < row_end; ++o) gemv_chunk_groups<1>(p, x, o);
    return;
  }
  if (layout_of(p.w) == Layout::kBlockGroups) {
    int64_t o = row_begin;
    for (; o + kGemvRows <= row_end; o += kGemvRows) gemv_block_groups<kGemvRows>(p, x, o);
    for (; o < row_end; ++o) gemv_block_groups<1>(p, x, o);
    return;
  }
  uint16_t* row = reinterpret_cast<uint16_t*>(scratch(0, static_cast<size_t>(ccols / 2)));
  for (int64_t o = row_begin; o < row_end; ++o) gemv_decoded(p, x, o, row);
}

#undef QLORA_VEC_INLINE

}  // namespace
}  // namespace avx512_bf16
}  // namespace kernels
}  // namespace qlora

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace qlora {
namespace kernels {
namespace avx512_bf16 {
namespace {
KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "avx512_bf16";
  t.required_features = kFeatureAvx512 | kFeatureAvx512Bf16;
  t.pack_bf16 = pack_bf16;
  t.gemm_nf4_bf16 = {gemm_nf4_bf16, kPanelRows, 1};
  return t;
}
}  // namespace
const KernelTable* table() {
  static const KernelTable t = make_kernel_table();
  return &t;
}
}  // namespace avx512_bf16
}  // namespace kernels
}  // namespace qlora

#else

namespace qlora {
namespace kernels {
namespace avx512_bf16 {
const KernelTable* table() { return nullptr; }
}  // namespace avx512_bf16
}  // namespace kernels
}  // namespace qlora

#endif
