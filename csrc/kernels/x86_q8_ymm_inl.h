// The int8 kernels (quantize_q8, gemm_nf4_q8) on YMM registers, for two ISAs: included at file
// scope by x86_avx_vnni.cpp with QLORA_Q8_AVX_VNNI defined (namespace avx_vnni, target region
// "avxvnni,avx2,fma", VEX vpdpbusd) and by x86_avx2.cpp without it (namespace avx2, target
// region "avx2,fma", vpmaddubsw + vpmaddwd). Everything lands in the nested namespace
// qlora::kernels::<isa>::q8, so nothing collides with the ISA file's own fp32 kernels; the
// baseline helpers come first, outside the target region, and the shared bodies from
// x86_q8_inl.h inside it. No include guard: each of the two files includes it once.
//
// AVX2 has no vpdpbusd, and vpmaddubsw saturates its int16 pair sums: with the unsigned operand
// up to 255 and |w| <= 127 a pair reaches 2 * 255 * 127 = 64770 > 32767. So the AVX2 body keeps
// the weights signed and multiplies |w| (unsigned, <= 127) by q with the sign of w (|q| <= 127),
// pairs at most 2 * 127 * 127 = 32258; vpmaddwd by ones then widens to the int32 of 4 products,
// and no correction is needed.

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(QLORA_Q8_AVX_VNNI)
#define QLORA_Q8_ISA avx_vnni
#else
#define QLORA_Q8_ISA avx2
#endif

namespace qlora {
namespace kernels {
namespace QLORA_Q8_ISA {
namespace q8 {
namespace {

constexpr int kLanes = 2;  // 128-bit lanes of a YMM register
#include "x86_q8_baseline_inl.h"  // into this ISA's namespace, see the header

}  // namespace
}  // namespace q8
}  // namespace QLORA_Q8_ISA
}  // namespace kernels
}  // namespace qlora

// The pragmas take no macros, hence one line per ISA.
#if defined(__clang__) && defined(QLORA_Q8_AVX_VNNI)
#pragma clang attribute push(__attribute__((target("avxvnni,avx2,fma"))), apply_to = function)
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(QLORA_Q8_AVX_VNNI)
#pragma GCC push_options
#pragma GCC target("avxvnni,avx2,fma")
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace qlora {
namespace kernels {
namespace QLORA_Q8_ISA {
namespace q8 {
namespace {

#define QLORA_VEC_INLINE inline __attribute__((always_inline))

#if defined(QLORA_Q8_AVX_VNNI)
constexpr bool kOffsetWeights = true;
#else
constexpr bool kOffsetWeights = false;
#endif
// 16 registers: 2 rows per tile at batch 1, otherwise 1 row by 2 batch rows.
constexpr int kQ8Rows1 = 2;
constexpr int kQ8Nb = 2;
constexpr int kQ8RowsNb = 1;
constexpr int kQ8MaxRows = 2;
// From 16 batch rows: panels of 8 output rows, tiles of 4 batch rows.
constexpr int kQ8PanelUnits = 1;
constexpr int kQ8PanelMr = 4;
constexpr int64_t kQ8PanelMinBatch = 16;

using VI = __m256i;
using VF = __m256;

QLORA_VEC_INLINE VI vi_zero() { return _mm256_setzero_si256(); }
QLORA_VEC_INLINE VI vi_load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
// Only 16 bytes are ever partial (one block of the last superblock).
QLORA_VEC_INLINE VI vi_loadn(const void* p, int bytes) {
  return bytes >= 32 ? vi_load(p) : _mm256_zextsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
QLORA_VEC_INLINE VI vi_set1(int32_t a) { return _mm256_set1_epi32(a); }
QLORA_VEC_INLINE void vi_store(void* p, VI a) { _mm256_storeu_si256(static_cast<__m256i*>(p), a); }
QLORA_VEC_INLINE VI vi_add(VI a, VI b) { return _mm256_add_epi32(a, b); }
QLORA_VEC_INLINE VI vi_sub(VI a, VI b) { return _mm256_sub_epi32(a, b); }
QLORA_VEC_INLINE int32_t vi_reduce_add(VI a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
QLORA_VEC_INLINE VI vi_clamp127(VI a) {
  return _mm256_min_epi32(_mm256_max_epi32(a, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
}
// 8 int32 in [-127, 127] to 8 bytes: packs within each lane, then the two lanes' first dwords.
QLORA_VEC_INLINE void store_i8(int8_t* p, VI a) {
  const VI w = _mm256_packs_epi32(a, a);
  const VI b = _mm256_packs_epi16(w, w);
  const VI both = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(both));
}

// vpshufb looks up within each 128-bit lane, so the table is broadcast to both.
QLORA_VEC_INLINE VI make_wtable() {
  alignas(16) int8_t t[16];
  for (int i = 0; i < 16; ++i) t[i] = static_cast<int8_t>(kOffsetWeights ? kNf4Int8[i] + 128 : kNf4Int8[i]);
  return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}
QLORA_VEC_INLINE void decode(VI table, VI codes, VI& lo, VI& hi) {
  const VI m = _mm256_set1_epi8(0x0f);
  lo = _mm256_shuffle_epi8(table, _mm256_and_si256(codes, m));
  hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(codes, 4), m));
}
#if defined(QLORA_Q8_AVX_VNNI)
QLORA_VEC_INLINE VI dot4(VI acc, VI w_u8, VI x_s8) { return _mm256_dpbusd_avx_epi32(acc, w_u8, x_s8); }
#else
QLORA_VEC_INLINE VI dot4(VI acc, VI w_s8, VI x_s8) {
  const VI pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w_s8), _mm256_sign_epi8(x_s8, w_s8));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif
QLORA_VEC_INLINE VI reduce4(VI a0, VI a1, VI a2, VI a3) {
  const VI t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(a0, a1), _mm256_unpackhi_epi32(a0, a1));
  const VI t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(a2, a3), _mm256_unpackhi_epi32(a2, a3));
  return _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
}
QLORA_VEC_INLINE void rearrange_quad(const int8_t* src, int8_t* dst) {
  const VI a = vi_load(src), b = vi_load(src + 32);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute2x128_si256(a, b, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32), _mm256_permute2x128_si256(a, b, 0x31));
}

// 8 x 8 int32 transpose: 4 x 4 within each lane for each group of 4 rows, then the lanes.
QLORA_VEC_INLINE void transpose_dwords(VI r[8]) {
  VI u[8];
  for (int g = 0; g < 2; ++g) {
    const VI t0 = _mm256_unpacklo_epi32(r[4 * g], r[4 * g + 1]), t1 = _mm256_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
    const VI t2 = _mm256_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]), t3 = _mm256_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
    u[4 * g + 0] = _mm256_unpacklo_epi64(t0, t2);
    u[4 * g + 1] = _mm256_unpackhi_epi64(t0, t2);
    u[4 * g + 2] = _mm256_unpacklo_epi64(t1, t3);
    u[4 * g + 3] = _mm256_unpackhi_epi64(t1, t3);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
  }
}

QLORA_VEC_INLINE VF vf_zero() { return _mm256_setzero_ps(); }
QLORA_VEC_INLINE VF vf_set1(float a) { return _mm256_set1_ps(a); }
QLORA_VEC_INLINE VF vf_load(const float* p) { return _mm256_loadu_ps(p); }
// A masked load never touches the lanes past n.
QLORA_VEC_INLINE VF vf_loadn(const float* p, int n) {
  const VI mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(p, mask);
}
QLORA_VEC_INLINE void vf_store(float* p, VF a) { _mm256_storeu_ps(p, a); }
QLORA_VEC_INLINE void vf_storen(float* p, VF a, int n) {
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), a);
}
QLORA_VEC_INLINE VF vf_mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
QLORA_VEC_INLINE VF vf_add(VF a, VF b) { return _mm256_add_ps(a, b); }
QLORA_VEC_INLINE VF vf_abs(VF a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
// Returns b where either is NaN; callers order operands for that.
QLORA_VEC_INLINE VF vf_max(VF a, VF b) { return _mm256_max_ps(a, b); }
QLORA_VEC_INLINE bool vf_has_nan(VF a) { return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) != 0; }
QLORA_VEC_INLINE float vf_reduce_max(VF a) {
  __m128 q = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  q = _mm_max_ps(q, _mm_movehl_ps(q, q));
  q = _mm_max_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
QLORA_VEC_INLINE float vf_reduce_add(VF a) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
QLORA_VEC_INLINE VF vf_permute(VF a, VI idx) { return _mm256_permutevar8x32_ps(a, idx); }
QLORA_VEC_INLINE VF vf_from_i32(VI a) { return _mm256_cvtepi32_ps(a); }
QLORA_VEC_INLINE VI vf_to_i32(VF a) { return _mm256_cvtps_epi32(a); }

#include "x86_q8_inl.h"

#undef QLORA_VEC_INLINE

}  // namespace
}  // namespace q8
}  // namespace QLORA_Q8_ISA
}  // namespace kernels
}  // namespace qlora

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#undef QLORA_Q8_ISA
