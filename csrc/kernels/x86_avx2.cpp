// The AVX2 + FMA kernels, for x86-64 CPUs from Haswell on. The file is compiled with baseline
// flags; everything that touches a YMM register lives in the target region below (GCC's target
// pragma, or clang's attribute push), over a 16-float vector made of two YMM registers, and the
// shared bodies come from x86_kernels_inl.h. The 16-entry NF4 table needs two 8-entry permutes
// and a blend on bit 3 of the code. On other architectures table() returns nullptr.
#include "qlora/kernels.h"

#if defined(__x86_64__)

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qlora {
namespace kernels {
namespace avx2 {
namespace {

#include "x86_baseline_inl.h"  // into this ISA's namespace, see the header

// Decision thresholds of nearest_nf4(), in code order.
constexpr float kMidpoints[15] = {
    midpoint(0), midpoint(1), midpoint(2),  midpoint(3),  midpoint(4),  midpoint(5),  midpoint(6), midpoint(7),
    midpoint(8), midpoint(9), midpoint(10), midpoint(11), midpoint(12), midpoint(13), midpoint(14),
};
alignas(32) constexpr int32_t kLaneIndex[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

}  // namespace
}  // namespace avx2
}  // namespace kernels
}  // namespace qlora

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace qlora {
namespace kernels {
namespace avx2 {
namespace {

#define QLORA_VEC_INLINE inline __attribute__((always_inline))

constexpr int kPanelUnits = 1;  // 16 output rows per GEMM panel: two YMM per batch row
constexpr int kMaxMr = 6;       // 6 x 2 accumulators + 2 weight registers + 1 broadcast of 16
constexpr int kGemvRows = 1;    // one row already needs 4 of the 16 registers for accumulators
// Batches up to 8 run the register path one weight row at a time for 4 batch rows: 8
// accumulators, the decoded block (4) and the table (2) fit the 16 YMM; x stays in memory.
constexpr int64_t kSmallBatch = 8;
constexpr int64_t kSmallBatchTile = 4;
constexpr int kSmallRows = 1;

struct F32x16 {
  __m256 a, b;  // lanes 0-7, 8-15
};

QLORA_VEC_INLINE void first_n(int n, __m256i& ma, __m256i& mb) {
  const __m256i nn = _mm256_set1_epi32(n);
  ma = _mm256_cmpgt_epi32(nn, _mm256_load_si256(reinterpret_cast<const __m256i*>(kLaneIndex)));
  mb = _mm256_cmpgt_epi32(nn, _mm256_load_si256(reinterpret_cast<const __m256i*>(kLaneIndex + 8)));
}
QLORA_VEC_INLINE F32x16 f_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
QLORA_VEC_INLINE F32x16 f_set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
QLORA_VEC_INLINE F32x16 f_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
// Masked loads and stores never touch the lanes past n, so no read or write leaves the buffer.
QLORA_VEC_INLINE F32x16 f_loadn(const float* p, int n) {
  __m256i ma, mb;
  first_n(n, ma, mb);
  return {_mm256_maskload_ps(p, ma), _mm256_maskload_ps(p + 8, mb)};
}
QLORA_VEC_INLINE void f_store(float* p, F32x16 x) {
  _mm256_storeu_ps(p, x.a);
  _mm256_storeu_ps(p + 8, x.b);
}
QLORA_VEC_INLINE void f_storen(float* p, F32x16 x, int n) {
  __m256i ma, mb;
  first_n(n, ma, mb);
  _mm256_maskstore_ps(p, ma, x.a);
  _mm256_maskstore_ps(p + 8, mb, x.b);
}
QLORA_VEC_INLINE F32x16 f_fma(F32x16 x, F32x16 y, F32x16 z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
QLORA_VEC_INLINE F32x16 f_add(F32x16 x, F32x16 y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
QLORA_VEC_INLINE F32x16 f_mul(F32x16 x, F32x16 y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
QLORA_VEC_INLINE F32x16 f_div(F32x16 x, F32x16 y) { return {_mm256_div_ps(x.a, y.a), _mm256_div_ps(x.b, y.b)}; }
// max/min return the second operand when either is NaN; callers order operands for that.
QLORA_VEC_INLINE F32x16 f_max(F32x16 x, F32x16 y) { return {_mm256_max_ps(x.a, y.a), _mm256_max_ps(x.b, y.b)}; }
QLORA_VEC_INLINE F32x16 f_min(F32x16 x, F32x16 y) { return {_mm256_min_ps(x.a, y.a), _mm256_min_ps(x.b, y.b)}; }
QLORA_VEC_INLINE F32x16 f_abs(F32x16 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return {_mm256_andnot_ps(sign, x.a), _mm256_andnot_ps(sign, x.b)};
}
QLORA_VEC_INLINE float f_reduce_add(F32x16 x) {
  const __m256 s = _mm256_add_ps(x.a, x.b);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
QLORA_VEC_INLINE float f_reduce_max(F32x16 x) {
  const __m256 s = _mm256_max_ps(x.a, x.b);
  __m128 q = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_max_ps(q, _mm_movehl_ps(q, q));
  q = _mm_max_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

struct Nf4Table {
  __m256 lo, hi;  // codes 0-7, 8-15
};
QLORA_VEC_INLINE Nf4Table make_table() { return {_mm256_loadu_ps(kNf4Codebook), _mm256_loadu_ps(kNf4Codebook + 8)}; }

// vpermps reads only the low 3 bits of each index, so both 8-entry halves are looked up and
// bit 3 of the code picks one: shifted into the sign bit, it is what blendv tests.
QLORA_VEC_INLINE __m256 lookup(const Nf4Table& tab, __m256i idx) {
  const __m256 lo = _mm256_permutevar8x32_ps(tab.lo, idx);
  const __m256 hi = _mm256_permutevar8x32_ps(tab.hi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
QLORA_VEC_INLINE void decode_block(const Nf4Table& tab, const uint8_t* p, F32x16& d0, F32x16& d1) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i i0 = _mm256_cvtepu8_epi32(bytes);
  const __m256i i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
  d0 = {lookup(tab, i0), lookup(tab, i1)};
  d1 = {lookup(tab, _mm256_srli_epi32(i0, 4)), lookup(tab, _mm256_srli_epi32(i1, 4))};
}
QLORA_VEC_INLINE F32x16 decode_half(const Nf4Table& tab, const uint8_t* p, int half) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m256i i0 = _mm256_cvtepu8_epi32(bytes);
  __m256i i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
  if (half != 0) {
    i0 = _mm256_srli_epi32(i0, 4);
    i1 = _mm256_srli_epi32(i1, 4);
  }
  return {lookup(tab, i0), lookup(tab, i1)};
}

// The batch-1 decode and its x order: the plain ones here (16 registers leave no room for the
// AVX-512 file's lane trick, and vpermps is not the only port-5 user anyway).
QLORA_VEC_INLINE void decode_block_gemv(const Nf4Table& tab, const uint8_t* p, F32x16& d0, F32x16& d1) {
  decode_block(tab, p, d0, d1);
}
QLORA_VEC_INLINE const float* gemv_x(const float* x, int64_t, float*) { return x; }

// The code in bits [S, S + 4) of each 32-bit lane of `bits` (a lane of raw packed bytes).
template <int S>
QLORA_VEC_INLINE F32x16 lookup_bits(const Nf4Table& tab, F32x16 bits) {
  __m256i a = _mm256_castps_si256(bits.a), b = _mm256_castps_si256(bits.b);
  if constexpr (S != 0) {
    a = _mm256_srli_epi32(a, S);
    b = _mm256_srli_epi32(b, S);
  }
  return {lookup(tab, a), lookup(tab, b)};
}

// Count of midpoints strictly below v: each true compare is all ones, i.e. -1.
QLORA_VEC_INLINE __m256i nearest_codes(__m256 v) {
  __m256i c = _mm256_setzero_si256();
  for (int i = 0; i < 15; ++i) {
    c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_set1_ps(kMidpoints[i]), _CMP_GT_OQ)));
  }
  return c;
}
QLORA_VEC_INLINE void encode_block(F32x16 v0, F32x16 v1, uint8_t* out) {
  const __m256i a = _mm256_or_si256(nearest_codes(v0.a), _mm256_slli_epi32(nearest_codes(v1.a), 4));
  const __m256i b = _mm256_or_si256(nearest_codes(v0.b), _mm256_slli_epi32(nearest_codes(v1.b), 4));
  const __m128i wa = _mm_packus_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  const __m128i wb = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(wa, wb));
}

QLORA_VEC_INLINE void transpose8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 2; ++g) {
    s[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    s[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xee);
    s[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    s[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xee);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x31);
  }
}
// 16x16 as four 8x8 quadrants; the off-diagonal quadrants trade places.
QLORA_VEC_INLINE void transpose16(F32x16 r[16]) {
  __m256 q00[8], q01[8], q10[8], q11[8];
  for (int i = 0; i < 8; ++i) {
    q00[i] = r[i].a;
    q01[i] = r[i].b;
    q10[i] = r[8 + i].a;
    q11[i] = r[8 + i].b;
  }
  transpose8(q00);
  transpose8(q01);
  transpose8(q10);
  transpose8(q11);
  for (int i = 0; i < 8; ++i) {
    r[i] = {q00[i], q10[i]};
    r[8 + i] = {q01[i], q11[i]};
  }
}

#include "x86_kernels_inl.h"
#include "x86_gemmt_inl.h"
#include "x86_lora_inl.h"

#undef QLORA_VEC_INLINE

}  // namespace
}  // namespace avx2
}  // namespace kernels
}  // namespace qlora

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#include "x86_q8_ymm_inl.h"  // the int8 kernels, in namespace avx2::q8

namespace qlora {
namespace kernels {
namespace avx2 {
namespace {
KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "avx2";
  t.required_features = kFeatureAvx2Fma;
  t.group_absmax = group_absmax;
  t.quantize_rows = quantize_rows;
  t.dequantize_rows = dequantize_rows;
  t.lora_down = lora_down;
  t.lora_up = lora_up;
  t.gemm_nf4_f32 = {forward_rows, kPanelRows, 1};
  t.quantize_q8 = q8::quantize_q8;
  t.gemm_nf4_q8 = {q8::gemm_nf4_q8, 1, 1};
  t.gemm_nf4t_f32 = gemm_nf4t_f32;
  t.col_block = kGemmTColBlock;
  return t;
}
}  // namespace
const KernelTable* table() {
  static const KernelTable t = make_kernel_table();
  return &t;
}
}  // namespace avx2
}  // namespace kernels
}  // namespace qlora

#else

namespace qlora {
namespace kernels {
namespace avx2 {
const KernelTable* table() { return nullptr; }
}  // namespace avx2
}  // namespace kernels
}  // namespace qlora

#endif
