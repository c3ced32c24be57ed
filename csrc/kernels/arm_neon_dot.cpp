// The aarch64 kernels that need the dot-product extension (sdot, Armv8.2-A DotProd): the int8
// precision's quantize_q8 and gemm_nf4_q8, inside a target region ("arch=armv8.2-a+dotprod" with
// GCC's target pragma, "dotprod" with clang's attribute push) so the file builds with baseline
// flags. One NEON register is one packed block: its low nibbles are columns 0-15 and its high
// nibbles columns 16-31, so the activations need no reordering; one vqtbl1q_s8 turns 16 codes
// into int8 weights and vdotq_s32 (signed x signed, no offset) sums 4 products per int32 lane.
// Every other entry comes from the plain NEON table below it in isa_list.h. Elsewhere table()
// returns nullptr.
#include "qlora/kernels.h"

#if defined(__aarch64__)

#include <arm_neon.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace qlora {
namespace kernels {
namespace neon_dot {
namespace {

// Blocks per step: four blocks' int32 partial sums reduce with two pairwise adds to one vector
// of four exact block sums, so the float work is one vector per four blocks.
constexpr int64_t kStep = 4;
// Batch rows sharing each decoded block (8 weight, 4 partial and 4 x 4 float accumulator
// registers of the 32).
constexpr int kNb = 4;

// Per-thread scratch: per-block weight scales of a row (times 1/127, padded to kStep with 0)
// and the activation scales padded the same way.
float* scratch(int slot, size_t n) {
  thread_local std::vector<float> buffers[2];
  std::vector<float>& b = buffers[slot];
  if (b.size() < n) b.resize(n);
  return b.data();
}

}  // namespace
}  // namespace neon_dot
}  // namespace kernels
}  // namespace qlora

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("dotprod"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#endif

namespace qlora {
namespace kernels {
namespace neon_dot {
namespace {

// quantize_q8_block(): the same amax (vmaxnm ignores a NaN as std::fmax does), the same float32
// reciprocal and product, rounding to nearest even (vcvtn, as nearbyint in the default mode),
// the same special cases by the same scalar expressions.
float quantize_block(const float* x, int n, int8_t* q, int32_t* sum) {
  alignas(16) float buf[kQ8Block] = {};
  const float* src = x;
  if (n < kQ8Block) {
    for (int i = 0; i < n; ++i) buf[i] = x[i];
    src = buf;
  }
  float32x4_t v[8];
  float32x4_t m = vdupq_n_f32(0.0f);
  uint32x4_t ordered = vdupq_n_u32(~0u);
  for (int i = 0; i < 8; ++i) {
    v[i] = vld1q_f32(src + 4 * i);
    ordered = vandq_u32(ordered, vceqq_f32(v[i], v[i]));
    m = vmaxnmq_f32(m, vabsq_f32(v[i]));
  }
  const bool nan = vminvq_u32(ordered) == 0;
  const float amax = vmaxvq_f32(m);
  const float inv = 127.0f / amax;
  const bool usable = std::isfinite(amax) && !nan && amax > 0.0f && std::isfinite(inv);
  int32x4_t s = vdupq_n_s32(0);
  const float32x4_t vinv = vdupq_n_f32(usable ? inv : 0.0f);
  for (int i = 0; i < 8; i += 2) {
    int32x4_t a = vcvtnq_s32_f32(vmulq_f32(v[i], vinv));
    int32x4_t b = vcvtnq_s32_f32(vmulq_f32(v[i + 1], vinv));
    a = vminq_s32(vmaxq_s32(a, vdupq_n_s32(-127)), vdupq_n_s32(127));
    b = vminq_s32(vmaxq_s32(b, vdupq_n_s32(-127)), vdupq_n_s32(127));
    if (!usable) a = b = vdupq_n_s32(0);
    s = vaddq_s32(s, vaddq_s32(a, b));
    vst1_s8(q + 4 * i, vmovn_s16(vcombine_s16(vmovn_s32(a), vmovn_s32(b))));
  }
  *sum = vaddvq_s32(s);
  if (nan) return std::nanf("");
  if (!std::isfinite(amax)) return amax;
  return usable ? amax / 127.0f : 0.0f;
}

void quantize_q8(const float* x, int64_t in_features, int64_t b_begin, int64_t b_end, int8_t* q,
                 float* scale, int32_t* sum) {
  const int64_t cols = padded_cols(in_features);
  const int64_t blocks = cols / kQ8Block;
  for (int64_t b = b_begin; b < b_end; ++b) {
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t c0 = k * kQ8Block;
      const int n = static_cast<int>(in_features - c0 < kQ8Block ? in_features - c0 : kQ8Block);
      scale[b * blocks + k] = quantize_block(x + b * in_features + c0, n, q + b * cols + c0, sum + b * blocks + k);
    }
  }
}

// One output row o by NB batch rows from b0. Per step of four blocks: decode each block once
// (two table lookups), two sdot per block and batch row, a pairwise reduction to the four exact
// block sums, then term = float(isum) * (d * ws) per lane and one add: the scalar term, summed
// per lane (block index mod 4) and then across lanes, an order independent of ranges and tiles.
template <int NB>
void q8_row(const ForwardArgs& p, const float* ws, const float* d, int64_t nsteps, int64_t o, int64_t b0) {
  const int64_t in = p.w.in_features, cols = padded_cols(in), blocks = cols / kQ8Block;
  const int64_t padded = nsteps * kStep;
  const uint8_t* row = p.w.codes + o * packed_row_bytes(in);
  const int8x16_t table = vld1q_s8(kNf4Int8);
  const uint8x16_t mask = vdupq_n_u8(0x0f);
  float32x4_t acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = vdupq_n_f32(0.0f);
  for (int64_t st = 0; st < nsteps; ++st) {
    int8x16_t wl[kStep], wh[kStep];
    for (int j = 0; j < kStep; ++j) {
      const int64_t k = st * kStep + j;
      if (k < blocks) {
        const uint8x16_t c = vld1q_u8(row + k * kBlockBytes);
        wl[j] = vqtbl1q_s8(table, vandq_u8(c, mask));
        wh[j] = vqtbl1q_s8(table, vshrq_n_u8(c, 4));
      } else {
        wl[j] = wh[j] = vdupq_n_s8(0);
      }
    }
    const float32x4_t wsv = vld1q_f32(ws + st * kStep);
    for (int b = 0; b < NB; ++b) {
      const int8_t* xq = p.x_q8 + (b0 + b) * cols;
      int32x4_t a[kStep];
      for (int j = 0; j < kStep; ++j) {
        const int64_t k = st * kStep + j;
        if (k < blocks) {
          const int8x16_t xl = vld1q_s8(xq + k * kQ8Block), xh = vld1q_s8(xq + k * kQ8Block + 16);
          a[j] = vdotq_s32(vdotq_s32(vdupq_n_s32(0), wl[j], xl), wh[j], xh);
        } else {
          a[j] = vdupq_n_s32(0);
        }
      }
      const int32x4_t isum = vpaddq_s32(vpaddq_s32(a[0], a[1]), vpaddq_s32(a[2], a[3]));
      const float32x4_t scale = vmulq_f32(vld1q_f32(d + (b0 + b) * padded + st * kStep), wsv);
      acc[b] = vaddq_f32(acc[b], vmulq_f32(vcvtq_f32_s32(isum), scale));
    }
  }
  for (int b = 0; b < NB; ++b) {
    float y = vaddvq_f32(acc[b]);
    if (p.bias != nullptr) y += p.bias[o];
    p.y[(b0 + b) * p.w.out_features + o] = y;
  }
}

void gemm_nf4_q8(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  const int64_t in = p.w.in_features, blocks = padded_cols(in) / kQ8Block;
  const int64_t nsteps = (blocks + kStep - 1) / kStep, padded = nsteps * kStep;
  // Activation scales padded to whole steps with 0 (a missing block adds 0 * 0).
  float* d = scratch(0, static_cast<size_t>(p.batch * padded));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t k = 0; k < padded; ++k) d[b * padded + k] = k < blocks ? p.x_q8_scale[b * blocks + k] : 0.0f;
  }
  float* ws = scratch(1, static_cast<size_t>(padded));
  for (int64_t o = row_begin; o < row_end; ++o) {
    for (int64_t k = 0; k < padded; ++k) {
      ws[k] = k < blocks ? group_scale(p.w, (o * in + k * kQ8Block) / p.w.group_size) * (1.0f / 127.0f) : 0.0f;
    }
    int64_t b0 = 0;
    for (; b0 + kNb <= p.batch; b0 += kNb) q8_row<kNb>(p, ws, d, nsteps, o, b0);
    for (; b0 < p.batch; ++b0) q8_row<1>(p, ws, d, nsteps, o, b0);
  }
}

}  // namespace
}  // namespace neon_dot
}  // namespace kernels
}  // namespace qlora

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace qlora {
namespace kernels {
namespace neon_dot {
namespace {
KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "neon_dot";
  t.required_features = kFeatureNeon | kFeatureNeonDot;
  t.quantize_q8 = quantize_q8;
  t.gemm_nf4_q8 = {gemm_nf4_q8, 1, 1};
  return t;
}
}  // namespace
const KernelTable* table() {
  static const KernelTable t = make_kernel_table();
  return &t;
}
}  // namespace neon_dot
}  // namespace kernels
}  // namespace qlora

#else

namespace qlora {
namespace kernels {
namespace neon_dot {
const KernelTable* table() { return nullptr; }
}  // namespace neon_dot
}  // namespace kernels
}  // namespace qlora

#endif
