// The scalar kernels: the executable specification of every operation in KernelTable, built
// with baseline flags for every architecture. SIMD tables are tested against these.
#include <algorithm>
#include <cmath>
#include <vector>

#include "qlora/kernels.h"

namespace qlora {
namespace kernels {
namespace scalar {
namespace {

void group_absmax(const float* w, int64_t n_total, int64_t group_size, int64_t g_begin,
                  int64_t g_end, float* absmax) {
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t lo = g * group_size;
    const int64_t hi = std::min(lo + group_size, n_total);
    float m = 0.0f;
    for (int64_t i = lo; i < hi; ++i) m = std::max(m, std::fabs(w[i]));
    absmax[g - g_begin] = m;
  }
}

void quantize_rows(const float* w, int64_t in_features, int64_t n_total, int64_t group_size,
                   const float* absmax, int64_t row_begin, int64_t row_end, uint8_t* codes) {
  const int64_t row_bytes = packed_row_bytes(in_features);
  const int64_t last_group = (n_total - 1) / group_size;
  const bool last_partial = (n_total % group_size) != 0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    uint8_t* dst = codes + r * row_bytes;
    std::fill(dst, dst + row_bytes, static_cast<uint8_t>(kNf4ZeroCode | (kNf4ZeroCode << 4)));
    for (int64_t c = 0; c < in_features; ++c) {
      const int64_t flat = r * in_features + c;
      const int64_t g = flat / group_size;
      const float m = std::max(absmax[g], kMinAbsmax);
      const float v = (g == last_group && last_partial) ? w[flat] / m : w[flat] * (1.0f / m);
      const uint8_t code = nearest_nf4(std::min(1.0f, std::max(-1.0f, v)));
      uint8_t& byte = dst[code_byte(c)];
      const int shift = code_shift(c);
      byte = static_cast<uint8_t>((byte & ~(0x0f << shift)) | (code << shift));
    }
  }
}

void dequantize_rows(const Nf4Weight& w, int64_t row_begin, int64_t row_end, float* out) {
  const int64_t in = w.in_features;
  const int64_t row_bytes = packed_row_bytes(in);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* src = w.codes + r * row_bytes;
    float* dst = out + (r - row_begin) * in;
    int64_t c = 0;
    while (c < in) {
      const int64_t flat = r * in + c;
      const int64_t g = flat / w.group_size;
      const int64_t seg_end = std::min(in, (g + 1) * w.group_size - r * in);
      const float s = group_scale(w, g);
      for (; c < seg_end; ++c) dst[c] = kNf4Codebook[get_code(src, c)] * s;
    }
  }
}

void lora_down(const float* x, int64_t in_features, const float* a, int64_t rank,
               int64_t b_begin, int64_t b_end, float* xa) {
  for (int64_t b = b_begin; b < b_end; ++b) {
    for (int64_t k = 0; k < rank; ++k) {
      float acc = 0.0f;
      for (int64_t c = 0; c < in_features; ++c) acc += x[b * in_features + c] * a[k * in_features + c];
      xa[b * rank + k] = acc;
    }
  }
}

void forward_rows(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  const int64_t in = p.w.in_features;
  const int64_t out = p.w.out_features;
  thread_local std::vector<float> row;
  row.resize(static_cast<size_t>(in));
  for (int64_t o = row_begin; o < row_end; ++o) {
    dequantize_rows(p.w, o, o + 1, row.data());
    for (int64_t b = 0; b < p.batch; ++b) {
      const float* xb = p.x + b * in;
      float acc = 0.0f;
      for (int64_t c = 0; c < in; ++c) acc += xb[c] * row[static_cast<size_t>(c)];
      if (p.rank > 0) {
        float lora = 0.0f;
        for (int64_t k = 0; k < p.rank; ++k) lora += p.xa[b * p.rank + k] * p.lora_b[o * p.rank + k];
        acc += p.scaling * lora;
      }
      if (p.bias != nullptr) acc += p.bias[o];
      p.y[b * out + o] = acc;
    }
  }
}

const KernelTable kTable = {
    "scalar",      kFeatureNone, group_absmax, quantize_rows, dequantize_rows,
    lora_down,     forward_rows, 1,
};

}  // namespace

const KernelTable* table() { return &kTable; }

}  // namespace scalar
}  // namespace kernels
}  // namespace qlora
