// The scalar kernels: the executable specification of every operation in KernelTable, in every
// precision, built with baseline flags for every architecture. SIMD tables are tested against
// these; the bf16 and int8 entries emulate those precisions' rounding exactly (precision.h).
#include <algorithm>
#include <cmath>
#include <vector>

#include "qlora/kernels.h"
#include "qlora/precision.h"

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

void lora_up(const float* u, int64_t rank, const float* b, float scaling, const float* row_scale,
             const int64_t* rows, int64_t n_rows, int64_t out_features, int64_t o_begin,
             int64_t o_end, float* y) {
  for (int64_t j = 0; j < n_rows; ++j) {
    const int64_t r = rows != nullptr ? rows[j] : j;
    const float s = row_scale != nullptr ? row_scale[j] : scaling;
    const float* uj = u + j * rank;
    for (int64_t o = o_begin; o < o_end; ++o) {
      float acc = 0.0f;
      for (int64_t k = 0; k < rank; ++k) acc += uj[k] * b[o * rank + k];
      y[r * out_features + o] += s * acc;
    }
  }
}

void pack_bf16(const float* x, int64_t in_features, int64_t b_begin, int64_t b_end, uint16_t* out) {
  const int64_t cols = padded_cols(in_features);
  for (int64_t b = b_begin; b < b_end; ++b) {
    for (int64_t c = 0; c < cols; ++c) {
      out[b * cols + c] = c < in_features ? f32_to_bf16(x[b * in_features + c]) : uint16_t{0};
    }
  }
}

void quantize_q8(const float* x, int64_t in_features, int64_t b_begin, int64_t b_end, int8_t* q,
                 float* scale, int32_t* sum) {
  const int64_t cols = padded_cols(in_features);
  const int64_t blocks = cols / kQ8Block;
  for (int64_t b = b_begin; b < b_end; ++b) {
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t c0 = k * kQ8Block;
      const int64_t n = std::min(kQ8Block, in_features - c0);
      scale[b * blocks + k] =
          quantize_q8_block(x + b * in_features + c0, n, q + b * cols + c0, sum + b * blocks + k);
    }
  }
}

// bf16: every product bf16(x) * bf16(codebook[c] * scale) is exact in float32 (8-bit by 8-bit
// significands), summed over columns in increasing order.
void gemm_nf4_bf16(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  const int64_t in = p.w.in_features;
  const int64_t cols = padded_cols(in);
  const int64_t row_bytes = packed_row_bytes(in);
  thread_local std::vector<float> row;
  row.assign(static_cast<size_t>(cols), 0.0f);
  for (int64_t o = row_begin; o < row_end; ++o) {
    const uint8_t* src = p.w.codes + o * row_bytes;
    for (int64_t c = 0; c < in; ++c) {
      const float s = group_scale(p.w, (o * in + c) / p.w.group_size);
      row[static_cast<size_t>(c)] = bf16_to_f32(nf4_bf16(get_code(src, c), s));
    }
    for (int64_t b = 0; b < p.batch; ++b) {
      const uint16_t* xb = p.x_bf16 + b * cols;
      float acc = 0.0f;
      for (int64_t c = 0; c < in; ++c) acc += bf16_to_f32(xb[c]) * row[static_cast<size_t>(c)];
      if (p.bias != nullptr) acc += p.bias[o];
      p.y[b * p.w.out_features + o] = acc;
    }
  }
}

// int8: per 32-column block k, the exact int32 dot isum = sum q[b, c] * kNf4Int8[code[o, c]];
// then acc += float(isum) * (d[b, k] * (scale_g / 127)), blocks in increasing order, where
// scale_g is the group of the block (q8_layout_ok: one group per block).
void gemm_nf4_q8(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  const int64_t in = p.w.in_features;
  const int64_t cols = padded_cols(in);
  const int64_t blocks = cols / kQ8Block;
  const int64_t row_bytes = packed_row_bytes(in);
  for (int64_t o = row_begin; o < row_end; ++o) {
    const uint8_t* src = p.w.codes + o * row_bytes;
    for (int64_t b = 0; b < p.batch; ++b) {
      const int8_t* qb = p.x_q8 + b * cols;
      float acc = 0.0f;
      for (int64_t k = 0; k < blocks; ++k) {
        int32_t isum = 0;
        for (int64_t j = 0; j < kQ8Block; ++j) {
          const int64_t c = k * kQ8Block + j;
          isum += static_cast<int32_t>(qb[c]) * kNf4Int8[get_code(src, c)];
        }
        const float ws = group_scale(p.w, (o * in + k * kQ8Block) / p.w.group_size) * (1.0f / 127.0f);
        acc += static_cast<float>(isum) * (p.x_q8_scale[b * blocks + k] * ws);
      }
      if (p.bias != nullptr) acc += p.bias[o];
      p.y[b * p.w.out_features + o] = acc;
    }
  }
}

// dx[b, i] = sum over o from row_begin to row_end - 1, in that order, of g[b, o] * deq(W)[o, i].
// Batch 1 is cut by the driver into kGemmTRowBlock-row blocks whose results it adds in order.
void gemm_nf4t_f32(const TransposedArgs& p, int64_t col_begin, int64_t col_end) {
  const int64_t in = p.w.in_features;
  const int64_t out = p.w.out_features;
  thread_local std::vector<float> row;
  row.resize(static_cast<size_t>(in));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t i = col_begin; i < col_end; ++i) p.dx[b * in + i] = 0.0f;
  }
  for (int64_t o = p.row_begin; o < p.row_end; ++o) {
    dequantize_rows(p.w, o, o + 1, row.data());
    for (int64_t b = 0; b < p.batch; ++b) {
      const float gb = p.g[b * out + o];
      for (int64_t i = col_begin; i < col_end; ++i) p.dx[b * in + i] += gb * row[static_cast<size_t>(i)];
    }
  }
}

KernelTable make_kernel_table() {
  KernelTable t;
  t.name = "scalar";
  t.required_features = kFeatureNone;
  t.group_absmax = group_absmax;
  t.quantize_rows = quantize_rows;
  t.dequantize_rows = dequantize_rows;
  t.lora_down = lora_down;
  t.lora_up = lora_up;
  t.pack_bf16 = pack_bf16;
  t.quantize_q8 = quantize_q8;
  t.gemm_nf4_f32 = {forward_rows, 1, 1};
  t.gemm_nf4_bf16 = {gemm_nf4_bf16, 1, 1};
  t.gemm_nf4_q8 = {gemm_nf4_q8, 1, 1};
  t.gemm_nf4t_f32 = gemm_nf4t_f32;
  t.col_block = 1;
  return t;
}

}  // namespace

const KernelTable* table() {
  static const KernelTable t = make_kernel_table();
  return &t;
}

}  // namespace scalar
}  // namespace kernels
}  // namespace qlora
