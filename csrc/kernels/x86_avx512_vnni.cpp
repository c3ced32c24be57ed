// The AVX512-VNNI kernels (int8 activations: quantize_q8 and gemm_nf4_q8), for x86-64 CPUs with
// AVX-512 F/BW/VL/DQ and AVX512_VNNI (Cascade Lake, Ice Lake, Zen 4 and later). The file is
// compiled with baseline flags; everything that touches a ZMM register lives in the target
// region "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma" (GCC's target pragma or
// clang's attribute push), over the primitives below, and the bodies come from x86_q8_inl.h:
// one vpshufb of the 16-entry int8 NF4 table per 64 codes and one vpdpbusd per 64 products.
// Every other entry comes from the ISAs below it in isa_list.h. On other architectures table()
// returns nullptr.
#include "qlora/kernels.h"

#if defined(__x86_64__)

#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace qlora {
namespace kernels {
namespace avx512_vnni {
namespace {

constexpr int kLanes = 4;  // 128-bit lanes of a ZMM register
#include "x86_q8_baseline_inl.h"  // into this ISA's namespace, see the header

}  // namespace
}  // namespace avx512_vnni
}  // namespace kernels
}  // namespace qlora

#if defined(__clang__)
#pragma clang attribute push(                                                                  \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")
// GCC 12's AVX-512 headers start masked intrinsics from a deliberately undefined register and
// warn about it once inlined (GCC PR 105593); the warning says nothing about this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace qlora {
namespace kernels {
namespace avx512_vnni {
namespace {

#define QLORA_VEC_INLINE inline __attribute__((always_inline))

// Weights are the unsigned operand of vpdpbusd (kNf4Int8 + 128), activations the signed one.
constexpr bool kOffsetWeights = true;
// Batch 1: 4 rows per tile share the activation loads. Batches: 2 rows by 4 batch rows, each
// decoded weight vector used 4 times (8 weight, 4 partial-sum and 8 accumulator registers).
constexpr int kQ8Rows1 = 4;
constexpr int kQ8Nb = 4;
constexpr int kQ8RowsNb = 2;
constexpr int kQ8MaxRows = 4;
// From 24 batch rows, panels of 2 x 16 output rows and tiles of 6 batch rows (12 int32 and 12
// float accumulators, 2 weight vectors, 1 broadcast). The crossover with the path above,
// measured on one Zen 4 core at 4096 x 4096 (CPU time): 16 rows 2.5 vs 3.1 ms, 24 rows 3.6 vs
// 3.6 ms, 32 rows 5.0 vs 4.0 ms.
constexpr int kQ8PanelUnits = 2;
constexpr int kQ8PanelMr = 6;
constexpr int64_t kQ8PanelMinBatch = 24;

using VI = __m512i;
using VF = __m512;

QLORA_VEC_INLINE VI vi_zero() { return _mm512_setzero_si512(); }
QLORA_VEC_INLINE VI vi_load(const void* p) { return _mm512_loadu_si512(p); }
QLORA_VEC_INLINE VI vi_loadn(const void* p, int bytes) {
  return _mm512_maskz_loadu_epi8(bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1, p);
}
QLORA_VEC_INLINE VI vi_set1(int32_t a) { return _mm512_set1_epi32(a); }
QLORA_VEC_INLINE void vi_store(void* p, VI a) { _mm512_storeu_si512(p, a); }
QLORA_VEC_INLINE VI vi_add(VI a, VI b) { return _mm512_add_epi32(a, b); }
QLORA_VEC_INLINE VI vi_sub(VI a, VI b) { return _mm512_sub_epi32(a, b); }
QLORA_VEC_INLINE int32_t vi_reduce_add(VI a) { return _mm512_reduce_add_epi32(a); }
QLORA_VEC_INLINE VI vi_clamp127(VI a) {
  return _mm512_min_epi32(_mm512_max_epi32(a, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
}
// 16 int32 in [-127, 127] to 16 bytes.
QLORA_VEC_INLINE void store_i8(int8_t* p, VI a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(a)); }

// vpshufb looks up within each 128-bit lane, so the table is broadcast to all four.
QLORA_VEC_INLINE VI make_wtable() {
  alignas(16) int8_t t[16];
  for (int i = 0; i < 16; ++i) t[i] = static_cast<int8_t>(kNf4Int8[i] + 128);
  return _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}
// Four packed blocks (one per lane) to their low-nibble columns 0-15 and high-nibble columns
// 16-31. The mask also clears bit 7, which would make vpshufb write 0.
QLORA_VEC_INLINE void decode(VI table, VI codes, VI& lo, VI& hi) {
  const VI m = _mm512_set1_epi8(0x0f);
  lo = _mm512_shuffle_epi8(table, _mm512_and_si512(codes, m));
  hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(codes, 4), m));
}
QLORA_VEC_INLINE VI dot4(VI acc, VI w_u8, VI x_s8) { return _mm512_dpbusd_epi32(acc, w_u8, x_s8); }
// Per 128-bit lane L: out[4L + j] = the sum of the four int32 of lane L of a_j.
QLORA_VEC_INLINE VI reduce4(VI a0, VI a1, VI a2, VI a3) {
  const VI t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
  const VI t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
}
// Four consecutive 32-column activation blocks to (columns 0-15 of each, columns 16-31 of each).
QLORA_VEC_INLINE void rearrange_quad(const int8_t* src, int8_t* dst) {
  const VI a = _mm512_loadu_si512(src), b = _mm512_loadu_si512(src + 64);
  _mm512_storeu_si512(dst, _mm512_shuffle_i64x2(a, b, 0x88));
  _mm512_storeu_si512(dst + 64, _mm512_shuffle_i64x2(a, b, 0xdd));
}

// 16 x 16 int32 transpose: 4 x 4 within each 128-bit lane for each group of 4 rows, then the
// 4 x 4 matrix of 128-bit lanes, twice.
QLORA_VEC_INLINE void transpose_dwords(VI r[16]) {
  VI u[16];
  for (int g = 0; g < 4; ++g) {
    const VI t0 = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]), t1 = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
    const VI t2 = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]), t3 = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
    u[4 * g + 0] = _mm512_unpacklo_epi64(t0, t2);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
  }
  for (int c = 0; c < 4; ++c) {
    const VI v01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), w01 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    const VI v23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88), w23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    r[0 + c] = _mm512_shuffle_i32x4(v01, v23, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(w01, w23, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(v01, v23, 0xdd);
    r[12 + c] = _mm512_shuffle_i32x4(w01, w23, 0xdd);
  }
}

QLORA_VEC_INLINE VF vf_zero() { return _mm512_setzero_ps(); }
QLORA_VEC_INLINE VF vf_set1(float a) { return _mm512_set1_ps(a); }
QLORA_VEC_INLINE VF vf_load(const float* p) { return _mm512_loadu_ps(p); }
QLORA_VEC_INLINE VF vf_loadn(const float* p, int n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
}
QLORA_VEC_INLINE void vf_store(float* p, VF a) { _mm512_storeu_ps(p, a); }
QLORA_VEC_INLINE void vf_storen(float* p, VF a, int n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), a);
}
QLORA_VEC_INLINE VF vf_mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
QLORA_VEC_INLINE VF vf_add(VF a, VF b) { return _mm512_add_ps(a, b); }
QLORA_VEC_INLINE VF vf_abs(VF a) { return _mm512_abs_ps(a); }
// Returns b where either is NaN; callers order operands for that.
QLORA_VEC_INLINE VF vf_max(VF a, VF b) { return _mm512_max_ps(a, b); }
QLORA_VEC_INLINE bool vf_has_nan(VF a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) != 0; }
QLORA_VEC_INLINE float vf_reduce_max(VF a) { return _mm512_reduce_max_ps(a); }
QLORA_VEC_INLINE float vf_reduce_add(VF a) { return _mm512_reduce_add_ps(a); }
QLORA_VEC_INLINE VF vf_permute(VF a, VI idx) { return _mm512_permutexvar_ps(idx, a); }
QLORA_VEC_INLINE VF vf_from_i32(VI a) { return _mm512_cvtepi32_ps(a); }
QLORA_VEC_INLINE VI vf_to_i32(VF a) { return _mm512_cvtps_epi32(a); }

#include "x86_q8_inl.h"

#undef QLORA_VEC_INLINE

}  // namespace
}  // namespace avx512_vnni
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
namespace avx512_vnni {
namespace {
KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "avx512_vnni";
  t.required_features = kFeatureAvx512 | kFeatureAvx512Vnni;
  t.quantize_q8 = quantize_q8;
  t.gemm_nf4_q8 = {gemm_nf4_q8, 1, 1};
  return t;
}
}  // namespace
const KernelTable* table() {
  static const KernelTable t = make_kernel_table();
  return &t;
}
}  // namespace avx512_vnni
}  // namespace kernels
}  // namespace qlora

#else

namespace qlora {
namespace kernels {
namespace avx512_vnni {
const KernelTable* table() { return nullptr; }
}  // namespace avx512_vnni
}  // namespace kernels
}  // namespace qlora

#endif
