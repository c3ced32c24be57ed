// The AVX-512 kernels (F, BW, VL, DQ, with AVX2 and FMA), for x86-64 CPUs from Skylake-SP on.
// The file is compiled with baseline flags; everything that touches a ZMM register lives in the
// target region below (GCC's target pragma, or clang's attribute push), over a 16-float vector,
// and the shared bodies come from x86_kernels_inl.h. A 16-float NF4 table fits one register, so
// one vpermps decodes 16 codes. On other architectures table() returns nullptr.
#include "qlora/kernels.h"

#if defined(__x86_64__)

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qlora {
namespace kernels {
namespace avx512 {
namespace {

#include "x86_baseline_inl.h"  // into this ISA's namespace, see the header

// Decision thresholds of nearest_nf4() in code order; the 16th entry is never probed.
alignas(64) constexpr float kMidpoints[16] = {
    midpoint(0), midpoint(1), midpoint(2),  midpoint(3),  midpoint(4),  midpoint(5),
    midpoint(6), midpoint(7), midpoint(8),  midpoint(9),  midpoint(10), midpoint(11),
    midpoint(12), midpoint(13), midpoint(14), 2.0f,
};

}  // namespace
}  // namespace avx512
}  // namespace kernels
}  // namespace qlora

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
// GCC 12's AVX-512 headers start masked intrinsics from a deliberately undefined register and
// warn about it once inlined (GCC PR 105593); the warning says nothing about this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace qlora {
namespace kernels {
namespace avx512 {
namespace {

#define QLORA_VEC_INLINE inline __attribute__((always_inline))

constexpr int kPanelUnits = 2;  // 32 output rows per GEMM panel: two ZMM per batch row
constexpr int kMaxMr = 12;      // 12 x 2 accumulators + 2 weight registers of the 32
constexpr int kGemvRows = 4;    // 4 rows x 2 accumulators, sharing each load of x
// Batches up to 8 run the register path in tiles of 4 batch rows x 4 weight rows: 16
// accumulators and 8 x registers.
constexpr int64_t kSmallBatch = 8;
constexpr int64_t kSmallBatchTile = 4;
constexpr int kSmallRows = 4;

struct F32x16 {
  __m512 v;
};

QLORA_VEC_INLINE __mmask16 first_n(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
QLORA_VEC_INLINE F32x16 f_zero() { return {_mm512_setzero_ps()}; }
QLORA_VEC_INLINE F32x16 f_set1(float a) { return {_mm512_set1_ps(a)}; }
QLORA_VEC_INLINE F32x16 f_load(const float* p) { return {_mm512_loadu_ps(p)}; }
QLORA_VEC_INLINE F32x16 f_loadn(const float* p, int n) { return {_mm512_maskz_loadu_ps(first_n(n), p)}; }
QLORA_VEC_INLINE void f_store(float* p, F32x16 a) { _mm512_storeu_ps(p, a.v); }
QLORA_VEC_INLINE void f_storen(float* p, F32x16 a, int n) { _mm512_mask_storeu_ps(p, first_n(n), a.v); }
QLORA_VEC_INLINE F32x16 f_fma(F32x16 a, F32x16 b, F32x16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
QLORA_VEC_INLINE F32x16 f_add(F32x16 a, F32x16 b) { return {_mm512_add_ps(a.v, b.v)}; }
QLORA_VEC_INLINE F32x16 f_mul(F32x16 a, F32x16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
QLORA_VEC_INLINE F32x16 f_div(F32x16 a, F32x16 b) { return {_mm512_div_ps(a.v, b.v)}; }
// max/min return the second operand when either is NaN; callers order operands for that.
QLORA_VEC_INLINE F32x16 f_max(F32x16 a, F32x16 b) { return {_mm512_max_ps(a.v, b.v)}; }
QLORA_VEC_INLINE F32x16 f_min(F32x16 a, F32x16 b) { return {_mm512_min_ps(a.v, b.v)}; }
QLORA_VEC_INLINE F32x16 f_abs(F32x16 a) { return {_mm512_abs_ps(a.v)}; }
QLORA_VEC_INLINE float f_reduce_add(F32x16 a) { return _mm512_reduce_add_ps(a.v); }
QLORA_VEC_INLINE float f_reduce_max(F32x16 a) { return _mm512_reduce_max_ps(a.v); }

struct Nf4Table {
  __m512 t;
  __m512i shift_lo, shift_hi;  // for decode_block_gemv(): 8 * (lane / 4), plus 4
};
QLORA_VEC_INLINE Nf4Table make_table() {
  const __m512i lane = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2);
  const __m512i lo = _mm512_slli_epi32(lane, 3);
  return {_mm512_loadu_ps(kNf4Codebook), lo, _mm512_add_epi32(lo, _mm512_set1_epi32(4))};
}

// vpermps reads only the low 4 bits of each index, so the zero-extended byte indexes the low
// nibble (columns 0-15) as it is, and needs one shift for the high nibble (columns 16-31).
QLORA_VEC_INLINE void decode_block(const Nf4Table& tab, const uint8_t* p, F32x16& d0, F32x16& d1) {
  const __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  d0.v = _mm512_permutexvar_ps(i, tab.t);
  d1.v = _mm512_permutexvar_ps(_mm512_srli_epi32(i, 4), tab.t);
}
QLORA_VEC_INLINE F32x16 decode_half(const Nf4Table& tab, const uint8_t* p, int half) {
  __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  if (half != 0) i = _mm512_srli_epi32(i, 4);
  return {_mm512_permutexvar_ps(i, tab.t)};
}

// The batch-1 decode. vpmovzxbd and vpermps both need port 5, which the FMAs share with port 0
// only; here the 16 bytes are broadcast to the four 128-bit lanes by the load unit and each lane
// shifted by a different multiple of 8 (port 0), so lane 4l + p holds the code of column 4p + l:
// a 4x4 transpose of each 16-column half, which gemv_x() applies to x once per call.
QLORA_VEC_INLINE void decode_block_gemv(const Nf4Table& tab, const uint8_t* p, F32x16& d0, F32x16& d1) {
  const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  d0.v = _mm512_permutexvar_ps(_mm512_srlv_epi32(b, tab.shift_lo), tab.t);
  d1.v = _mm512_permutexvar_ps(_mm512_srlv_epi32(b, tab.shift_hi), tab.t);
}
// x in the lane order of decode_block_gemv() (n a multiple of 16), into out; returns out.
QLORA_VEC_INLINE const float* gemv_x(const float* x, int64_t n, float* out) {
  const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(idx, _mm512_loadu_ps(x + i)));
  return out;
}

// The code in bits [S, S + 4) of each 32-bit lane of `bits` (a lane of raw packed bytes).
template <int S>
QLORA_VEC_INLINE F32x16 lookup_bits(const Nf4Table& tab, F32x16 bits) {
  __m512i i = _mm512_castps_si512(bits.v);
  if constexpr (S != 0) i = _mm512_srli_epi32(i, S);
  return {_mm512_permutexvar_ps(i, tab.t)};
}

// Count of midpoints strictly below v, by a 4-step binary search over the sorted midpoints
// (one table permute and one compare per step instead of 15 compares).
QLORA_VEC_INLINE __m512i nearest_codes(__m512 v) {
  const __m512 mids = _mm512_load_ps(kMidpoints);
  __m512i c = _mm512_setzero_si512();
  for (int step = 8; step >= 1; step >>= 1) {
    const __m512 m = _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(step - 1)), mids);
    const __mmask16 gt = _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ);
    c = _mm512_mask_add_epi32(c, gt, c, _mm512_set1_epi32(step));
  }
  return c;
}
QLORA_VEC_INLINE void encode_block(F32x16 v0, F32x16 v1, uint8_t* out) {
  const __m512i packed = _mm512_or_si512(nearest_codes(v0.v), _mm512_slli_epi32(nearest_codes(v1.v), 4));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(packed));
}

// 16x16 transpose: pairs of rows interleaved by 32 bits, then by 64 bits, then 128-bit lanes
// gathered across four registers twice.
QLORA_VEC_INLINE void transpose16(F32x16 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i].v, r[2 * i + 1].v);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i].v, r[2 * i + 1].v);
  }
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));  // column 4L + 0 of rows 4g..4g+3
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));  // column 4L + 1
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));  // column 4L + 2
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));  // column 4L + 3
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 v01 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    const __m512 w01 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);
    const __m512 v23 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 w23 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
    r[0 + j].v = _mm512_shuffle_f32x4(v01, v23, 0x88);
    r[4 + j].v = _mm512_shuffle_f32x4(w01, w23, 0x88);
    r[8 + j].v = _mm512_shuffle_f32x4(v01, v23, 0xdd);
    r[12 + j].v = _mm512_shuffle_f32x4(w01, w23, 0xdd);
  }
}

#include "x86_kernels_inl.h"
#include "x86_gemmt_inl.h"
#include "x86_lora_inl.h"

#undef QLORA_VEC_INLINE

}  // namespace
}  // namespace avx512
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
namespace avx512 {
namespace {
KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "avx512";
  t.required_features = kFeatureAvx512;
  t.group_absmax = group_absmax;
  t.quantize_rows = quantize_rows;
  t.dequantize_rows = dequantize_rows;
  t.lora_down = lora_down;
  t.lora_up = lora_up;
  t.gemm_nf4_f32 = {forward_rows, kPanelRows, 1};
  t.gemm_nf4t_f32 = gemm_nf4t_f32;
  t.col_block = kGemmTColBlock;
  return t;
}
}  // namespace
const KernelTable* table() {
  static const KernelTable t = make_kernel_table();
  return &t;
}
}  // namespace avx512
}  // namespace kernels
}  // namespace qlora

#else

namespace qlora {
namespace kernels {
namespace avx512 {
const KernelTable* table() { return nullptr; }
}  // namespace avx512
}  // namespace kernels
}  // namespace qlora

#endif
