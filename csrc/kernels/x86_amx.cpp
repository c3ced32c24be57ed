// The AMX (AMX-TILE, AMX-BF16, AMX-INT8) kernels, for x86-64 CPUs with AMX and AVX-512
// (Sapphire Rapids and later): the bf16 forward product for batches where tiles pay. The file is
// compiled with baseline flags; everything that uses these instructions lives in the target
// region "amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,
// avx2,fma" below (GCC's target pragma, or clang's attribute push). NF4 codes are decoded panel
// by panel (32 output rows, all columns) into per-thread scratch in the pair-interleaved layout
// TDPBF16PS reads as its B operand; the activations are read as A tiles straight from x_bf16;
// no bf16 copy of the whole weight is ever made. Every other entry comes from the ISAs below
// this one in isa_list.h. On other architectures table() returns nullptr.
#include "qlora/kernels.h"

#if defined(__x86_64__)

#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qlora {
namespace kernels {
namespace amx {
namespace {

#include "x86_baseline_inl.h"  // into this ISA's namespace, see the header

// The tile data permission, asked for by each thread before its first tile instruction. The
// kernel documents it as process-wide (dispatch asks once, before the pool starts), but newer
// kernels and CPUs have been seen to fault worker threads that did not ask themselves
// (llama.cpp PR 26954); asking again is cheap and idempotent.
bool tile_permission() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  thread_local const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
#else
  return false;
#endif
}

// The tile configuration, in read-only static storage: GCC 12 models ldtilecfg as reading 8
// bytes, so the stores filling a configuration on the stack may be dropped and ldtilecfg then
// loads garbage and faults (llama.cpp issue 20824). Palette 1; tiles 0-7 all 16 rows x 64 bytes:
// C tiles 0-3 (16 batch rows x 16 fp32 outputs), A tiles 4-5 (16 batch rows x 32 bf16), B tiles
// 6-7 (16 pair rows x 16 outputs x 2 bf16).
alignas(64) constexpr uint8_t kTileConfig[64] = {
    1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,           // palette 1, start row 0
    64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0,   // colsb[0..7] (uint16)
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,           // colsb[8..15]
    16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0};  // rows[0..15]

// The int8 product's configuration: C tiles 0-3 (16 batch rows x 16 int32 outputs), A tiles 4-5
// (16 batch rows x 32 int8: one Q8 block), B tiles 6-7 (8 rows of 16 outputs x 4 int8).
alignas(64) constexpr uint8_t kTileConfigQ8[64] = {
    1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    64, 0, 64, 0, 64, 0, 64, 0, 32, 0, 32, 0, 64, 0, 64, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    16, 16, 16, 16, 16, 16, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0};

}  // namespace
}  // namespace amx
}  // namespace kernels
}  // namespace qlora

#if defined(__clang__)
#pragma clang attribute push(                                                                              \
    __attribute__((target(                                                                                 \
        "amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx2,fma"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx2,fma")
// GCC 12's AVX-512 headers start masked intrinsics from a deliberately undefined register and
// warn about it once inlined (GCC PR 105593); the warning says nothing about this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace qlora {
namespace kernels {
namespace amx {
namespace {

#define QLORA_VEC_INLINE inline __attribute__((always_inline))

// Arithmetic. TDPBF16PS C, A, B: for each C element (m, n) and each pair k of the K step, in
// order, c += A[m][2k] * B[k][2n] then c += A[m][2k + 1] * B[k][2n + 1] (Intel's pseudocode),
// each product of two bf16 exact in fp32, the accumulation rounded to nearest even with
// denormal inputs read as zero and denormal results flushed (as VDPBF16PS; MXCSR is not used).
// Each output element is therefore one float32 chain over its columns in ascending order, the
// same for any range of rows, and within the summation-order bound of the scalar specification
// that tests/cpp/test_precision_bf16.cpp asserts (it runs this kernel when the CPU grants AMX
// and reports it skipped otherwise).
//
// Why min_batch 32 (an estimate: this was written on a CPU without AMX). Per 32 output rows x
// 32 columns the panel costs, on Sapphire Rapids' single 512-bit shuffle port, about 224 cycles
// (32 vpermw, 64 zero-extensions and inserts, two 16x16 transposes of 64 shuffles each), and
// each 16-row A tile then adds 2 TDPBF16PS of 16 cycles. avx512_bf16 needs 32 vdpbf16ps per
// batch row for the same block (at most 2 per cycle) plus its cheaper in-register decode. At
// batch 16 both come to about 256 cycles; at 32 AMX needs about 290 against 512, and the gap
// widens with the batch, so tiles start at 32.
constexpr int kPanelUnits = 2;                      // B tiles per panel: 32 output rows
constexpr int kPanelRows = 16 * kPanelUnits;
constexpr int kTileBytes = 1024;                    // 16 rows x 64 bytes
constexpr int64_t kSlabCols = 512;                  // columns decoded to L1 before transposing
constexpr int64_t kMinBatch = 32;

QLORA_VEC_INLINE __m512i as_i(__m512bh v) { return (__m512i)v; }

// One group's 16 bf16 weights in both table halves (vpermw reads 5 index bits; for a low nibble
// taken from a whole byte the fifth is noise).
QLORA_VEC_INLINE __m512i group_table(float scale) {
  const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(kNf4Codebook), _mm512_set1_ps(scale));
  return as_i(_mm512_cvtne2ps_pbh(v, v));
}

// The 32 codes of a block in natural column order: bytes zero-extended (columns 0-15 in their
// low nibbles), then shifted by 4 into the upper half (columns 16-31), then one lookup.
QLORA_VEC_INLINE __m512i decode_block(const uint8_t* p, __m512i table) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1);
  return _mm512_permutexvar_epi16(idx, table);
}

// Columns [c0, c1) of row r (multiples of 32, c1 <= padded_cols) as bf16 weights in natural
// order: nf4_bf16() of every column, except that denormal weights are flushed to zero (which
// TDPBF16PS would do on reading them anyway).
void decode_row(const Nf4Weight& w, int64_t r, int64_t c0, int64_t c1, uint16_t* out) {
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in);
  const uint8_t* codes = w.codes + r * row_bytes;
  if (w.group_size % kBlockCols == 0 && in % w.group_size == 0) {
    // Every block inside one group; the group changes every group_size / 32 blocks.
    const int64_t bpg = w.group_size / kBlockCols, gpr = in / w.group_size;
    int64_t blk = c0 / kBlockCols, g = blk / bpg, left = bpg - blk % bpg;
    __m512i table = group_table(group_scale(w, r * gpr + g));
    for (; blk < c1 / kBlockCols; ++blk) {
      if (left == 0) {
        table = group_table(group_scale(w, r * gpr + ++g));
        left = bpg;
      }
      --left;
      _mm512_storeu_si512(out + blk * kBlockCols - c0, decode_block(codes + blk * kBlockBytes, table));
    }
    return;
  }
  // Groups straddling blocks or rows: 16 columns at a time in float32 with each column's scale.
  const __m512 cb = _mm512_loadu_ps(kNf4Codebook);
  for (int64_t n = c0; n < c1; n += 16) {
    const int64_t valid = imax(0, imin(16, in - n));
    alignas(64) float s[16] = {};
    const int64_t flat = r * in + n;
    int64_t g = flat / w.group_size, group_end = (g + 1) * w.group_size;
    // Past the row's end (valid == 0) the codes are padding and the flat index may lie beyond
    // the last group: no scale is read there.
    float sg = valid > 0 ? group_scale(w, g) : 0.0f;
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
    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (n / kBlockCols) * kBlockBytes)));
    if ((n / 16) % 2 == 1) idx = _mm512_srli_epi32(idx, 4);
    const __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(idx, cb), one_group ? _mm512_set1_ps(sg) : _mm512_load_ps(s));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + n - c0), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// 16x16 transpose of 32-bit lanes (bf16 pairs).
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

// Rows [o0, o0 + nrows) x all columns as B tiles: tile (u, s) at panel + (u * steps + s) *
// kTileBytes holds, in row k and lanes 2n, 2n + 1, the weights of output row o0 + 16u + n at
// columns 32s + 2k and 32s + 2k + 1 (the "VNNI" pair layout). Rows past nrows are zero. Each
// 16-row unit is decoded slab by slab into rowbuf (16 x kSlabCols) and transposed from there.
void decode_panel(const Nf4Weight& w, int64_t o0, int nrows, int64_t cols, uint16_t* rowbuf, uint8_t* panel) {
  const int64_t steps = cols / kBlockCols;
  for (int u = 0; u < kPanelUnits; ++u) {
    const int vr = static_cast<int>(imax(0, imin(16, nrows - 16 * u)));
    for (int64_t c0 = 0; c0 < cols; c0 += kSlabCols) {
      const int64_t c1 = imin(cols, c0 + kSlabCols);
      for (int i = 0; i < vr; ++i) decode_row(w, o0 + 16 * u + i, c0, c1, rowbuf + i * kSlabCols);
      for (int64_t c = c0; c < c1; c += kBlockCols) {
        __m512i t[16];
        for (int i = 0; i < 16; ++i) t[i] = i < vr ? _mm512_loadu_si512(rowbuf + i * kSlabCols + (c - c0)) : _mm512_setzero_si512();
        transpose16(t);
        uint8_t* tile = panel + (u * steps + c / kBlockCols) * kTileBytes;
        for (int k = 0; k < 16; ++k) _mm512_store_si512(tile + 64 * k, t[k]);
      }
    }
  }
}

void gemm_nf4_bf16(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  if (!tile_permission()) {
    // Detection granted AMX to the process but this thread was refused: the same product
    // without tiles (this table requires AVX512-BF16, so that table runs here).
    return avx512_bf16::table()->gemm_nf4_bf16.fn(p, row_begin, row_end);
  }
  const int64_t cols = padded_cols(p.w.in_features), steps = cols / kBlockCols;
  const int64_t out = p.w.out_features, stride = cols * static_cast<int64_t>(sizeof(uint16_t));
  uint8_t* panel = reinterpret_cast<uint8_t*>(scratch(0, static_cast<size_t>(kPanelUnits * steps * kTileBytes / 4)));
  uint16_t* rowbuf = reinterpret_cast<uint16_t*>(scratch(1, static_cast<size_t>(16 * kSlabCols / 2)));
  // The last batch block's rows padded with zero rows to whole A tiles, and the C tiles' output.
  const int64_t tail0 = (p.batch / kPanelRows) * kPanelRows, tail_rows = p.batch - tail0;
  float* cbuf = scratch(2, static_cast<size_t>(kPanelRows * kPanelRows + (tail_rows > 0 ? kPanelRows * cols / 2 : 0)));
  uint16_t* xpad = reinterpret_cast<uint16_t*>(cbuf + kPanelRows * kPanelRows);
  if (tail_rows > 0) {
    for (int64_t i = 0; i < kPanelRows * cols; ++i) xpad[i] = 0;
    for (int64_t i = 0; i < tail_rows * cols; ++i) xpad[i] = p.x_bf16[tail0 * cols + i];
  }
  _tile_loadconfig(kTileConfig);
  for (int64_t o0 = row_begin; o0 < row_end; o0 += kPanelRows) {
    const int nrows = static_cast<int>(imin(kPanelRows, row_end - o0));
    decode_panel(p.w, o0, nrows, cols, rowbuf, panel);
    // tileloadd's asm names only the address, not the memory: keep the panel stores before it.
    __asm__ __volatile__("" ::: "memory");
    const uint8_t* b0_tiles = panel;
    const uint8_t* b1_tiles = panel + steps * kTileBytes;
    for (int64_t b0 = 0; b0 < p.batch; b0 += kPanelRows) {
      const int64_t rows = imin(kPanelRows, p.batch - b0);
      const uint16_t* a = rows == kPanelRows ? p.x_bf16 + b0 * cols : xpad;
      const uint16_t* a_hi = a + 16 * cols;
      _tile_zero(0);
      _tile_zero(1);
      if (rows > 16) {
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; ++s) {
          _tile_loadd(4, a + s * kBlockCols, stride);
          _tile_loadd(5, a_hi + s * kBlockCols, stride);
          _tile_loadd(6, b0_tiles + s * kTileBytes, 64);
          _tile_loadd(7, b1_tiles + s * kTileBytes, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(2, cbuf + 16 * kPanelRows, kPanelRows * sizeof(float));
        _tile_stored(3, cbuf + 16 * kPanelRows + 16, kPanelRows * sizeof(float));
      } else {
        for (int64_t s = 0; s < steps; ++s) {
          _tile_loadd(4, a + s * kBlockCols, stride);
          _tile_loadd(6, b0_tiles + s * kTileBytes, 64);
          _tile_loadd(7, b1_tiles + s * kTileBytes, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
        }
      }
      _tile_stored(0, cbuf, kPanelRows * sizeof(float));
      _tile_stored(1, cbuf + 16, kPanelRows * sizeof(float));
      for (int64_t m = 0; m < rows; ++m) {
        float* y = p.y + (b0 + m) * out + o0;
        const float* c = cbuf + m * kPanelRows;
        for (int n = 0; n < nrows; ++n) y[n] = p.bias != nullptr ? c[n] + p.bias[o0 + n] : c[n];
      }
    }
  }
  _tile_release();
}

// ---------------------------------------------------------------- int8
// The int8 precision (precision.h): per 32-column block k an exact int32 dot product isum of the
// Q8 activations with the int8 codebook kNf4Int8, then acc += float(isum) * (d[b, k] * (scale /
// 127)), blocks in increasing order. The scales change every 32 columns on both sides (per batch
// row and block, per output row and group), so an int32 C tile cannot accumulate across blocks:
// each TDPBSSD covers one block (K = 32), its C tiles are stored and scaled into float32
// accumulators with AVX-512 before the next block. That is exactly the specification's
// arithmetic, so results equal the scalar kernel's bit for bit. The rescaling (about 7 vector
// operations per 16 outputs, batch row and block) costs about as much as the tile products,
// which is why this path beats AVX512-VNNI by well under AMX's 16x.
constexpr int kQ8TileBytes = 512;  // 8 rows x 64 bytes

// Columns [32 * blk, 32 * blk + 64) of one row as int8 weights kNf4Int8[code] in natural order
// (the second block zero when it does not exist).
QLORA_VEC_INLINE __m512i decode_q8_blocks(const uint8_t* p, bool pair) {
  const __m256i raw = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                           : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kNf4Int8)));
  const __m256i nib = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(raw, nib));
  const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib));
  // [lo A, lo B, hi A, hi B] in 128-bit lanes, reordered to [lo A, hi A, lo B, hi B].
  const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  return _mm512_maskz_shuffle_i64x2(pair ? 0xff : 0x0f, z, z, _MM_SHUFFLE(3, 1, 2, 0));
}

// B tiles of rows [o0, o0 + nrows) for every block: tile (u, k) at panel + (u * blocks + k) *
// kQ8TileBytes holds in row r, bytes 4n..4n+3, the weights of output row o0 + 16u + n at
// columns 32k + 4r .. 32k + 4r + 3. ws[k * 32 + n] = scale of (o0 + n, block k) / 127.
void decode_panel_q8(const Nf4Weight& w, int64_t o0, int nrows, int64_t blocks, uint8_t* panel, float* ws) {
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in);
  for (int64_t k = 0; k < blocks; ++k) {
    for (int n = 0; n < kPanelRows; ++n) {
      ws[k * kPanelRows + n] =
          n < nrows ? group_scale(w, ((o0 + n) * in + k * kBlockCols) / w.group_size) * (1.0f / 127.0f) : 0.0f;
    }
  }
  for (int u = 0; u < kPanelUnits; ++u) {
    const int vr = static_cast<int>(imax(0, imin(16, nrows - 16 * u)));
    for (int64_t k = 0; k < blocks; k += 2) {
      const bool pair = k + 1 < blocks;
      __m512i t[16];
      for (int i = 0; i < 16; ++i) {
        t[i] = i < vr ? decode_q8_blocks(w.codes + (o0 + 16 * u + i) * row_bytes + k * kBlockBytes, pair)
                      : _mm512_setzero_si512();
      }
      transpose16(t);
      uint8_t* tile = panel + (u * blocks + k) * kQ8TileBytes;
      for (int r = 0; r < 8; ++r) _mm512_store_si512(tile + 64 * r, t[r]);
      if (pair) {
        for (int r = 0; r < 8; ++r) _mm512_store_si512(tile + kQ8TileBytes + 64 * r, t[8 + r]);
      }
    }
  }
}

void gemm_nf4_q8(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  if (!tile_permission()) {
    for (const KernelTable* t : {avx512_vnni::table(), scalar::table()}) {
      if (t != nullptr && t->gemm_nf4_q8.fn != nullptr) return t->gemm_nf4_q8.fn(p, row_begin, row_end);
    }
  }
  const int64_t cols = padded_cols(p.w.in_features), blocks = cols / kBlockCols, out = p.w.out_features;
  uint8_t* panel = reinterpret_cast<uint8_t*>(scratch(0, static_cast<size_t>(kPanelUnits * blocks * kQ8TileBytes / 4)));
  float* ws = scratch(1, static_cast<size_t>(blocks * kPanelRows));
  const int64_t tail0 = (p.batch / kPanelRows) * kPanelRows, tail_rows = p.batch - tail0;
  // C tiles (int32), the float32 accumulators, and the last batch block padded with zero rows.
  float* buf = scratch(2, static_cast<size_t>(2 * kPanelRows * kPanelRows + (tail_rows > 0 ? kPanelRows * cols / 4 : 0)));
  int32_t* cbuf = reinterpret_cast<int32_t*>(buf);
  float* acc = buf + kPanelRows * kPanelRows;
  int8_t* xpad = reinterpret_cast<int8_t*>(acc + kPanelRows * kPanelRows);
  if (tail_rows > 0) {
    for (int64_t i = 0; i < kPanelRows * cols; ++i) xpad[i] = 0;
    for (int64_t i = 0; i < tail_rows * cols; ++i) xpad[i] = p.x_q8[tail0 * cols + i];
  }
  _tile_loadconfig(kTileConfigQ8);
  for (int64_t o0 = row_begin; o0 < row_end; o0 += kPanelRows) {
    const int nrows = static_cast<int>(imin(kPanelRows, row_end - o0));
    decode_panel_q8(p.w, o0, nrows, blocks, panel, ws);
    __asm__ __volatile__("" ::: "memory");  // tileloadd's asm does not name the memory it reads
    for (int64_t b0 = 0; b0 < p.batch; b0 += kPanelRows) {
      const int64_t rows = imin(kPanelRows, p.batch - b0);
      const int8_t* a = rows == kPanelRows ? p.x_q8 + b0 * cols : xpad;
      for (int64_t i = 0; i < rows * kPanelRows; ++i) acc[i] = 0.0f;
      for (int64_t k = 0; k < blocks; ++k) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_loadd(4, a + k * kBlockCols, cols);
        _tile_loadd(6, panel + k * kQ8TileBytes, 64);
        _tile_loadd(7, panel + (blocks + k) * kQ8TileBytes, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_stored(0, cbuf, kPanelRows * sizeof(int32_t));
        _tile_stored(1, cbuf + 16, kPanelRows * sizeof(int32_t));
        if (rows > 16) {
          _tile_zero(2);
          _tile_zero(3);
          _tile_loadd(5, a + 16 * cols + k * kBlockCols, cols);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
          _tile_stored(2, cbuf + 16 * kPanelRows, kPanelRows * sizeof(int32_t));
          _tile_stored(3, cbuf + 16 * kPanelRows + 16, kPanelRows * sizeof(int32_t));
        }
        for (int64_t m = 0; m < rows; ++m) {
          const __m512 d = _mm512_set1_ps(p.x_q8_scale[(b0 + m) * blocks + k]);
          for (int u = 0; u < kPanelUnits; ++u) {
            const __m512 isum = _mm512_cvtepi32_ps(_mm512_loadu_si512(cbuf + m * kPanelRows + 16 * u));
            const __m512 term = _mm512_mul_ps(isum, _mm512_mul_ps(d, _mm512_loadu_ps(ws + k * kPanelRows + 16 * u)));
            float* am = acc + m * kPanelRows + 16 * u;
            _mm512_storeu_ps(am, _mm512_add_ps(_mm512_loadu_ps(am), term));
          }
        }
      }
      for (int64_t m = 0; m < rows; ++m) {
        float* y = p.y + (b0 + m) * out + o0;
        const float* c = acc + m * kPanelRows;
        for (int n = 0; n < nrows; ++n) y[n] = p.bias != nullptr ? c[n] + p.bias[o0 + n] : c[n];
      }
    }
  }
  _tile_release();
}

#undef QLORA_VEC_INLINE

}  // namespace
}  // namespace amx
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
namespace amx {
namespace {
KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "amx";
  t.required_features = kFeatureAvx512 | kFeatureAvx512Bf16 | kFeatureAvx512Vnni | kFeatureAmx;
  t.gemm_nf4_bf16 = {gemm_nf4_bf16, kPanelRows, kMinBatch};
  t.gemm_nf4_q8 = {gemm_nf4_q8, kPanelRows, kMinBatch};
  return t;
}
}  // namespace
const KernelTable* table() {
  static const KernelTable t = make_kernel_table();
  return &t;
}
}  // namespace amx
}  // namespace kernels
}  // namespace qlora

#else

namespace qlora {
namespace kernels {
namespace amx {
const KernelTable* table() { return nullptr; }
}  // namespace amx
}  // namespace kernels
}  // namespace qlora

#endif
