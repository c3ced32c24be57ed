// The C++ layer class, for C++ programs that link qlora_core directly (servers, benchmarks):
// it owns a quantized weight, the LoRA matrices and an optional bias, and runs the fused
// forward. No Python here; bad sizes throw std::invalid_argument.
#pragma once

#include <cstdint>
#include <vector>

#include "qlora/nf4.h"

namespace qlora {

class QLoraLinear {
 public:
  // Quantizes a row-major float32 (out_features, in_features) weight; no LoRA term until
  // set_lora is called.
  QLoraLinear(const float* weight, int64_t out_features, int64_t in_features, int64_t group_size);

  // a: (rank, in_features), b: (out_features, rank), both row-major; copied.
  void set_lora(const float* a, const float* b, int64_t rank, float scaling);
  // bias: out_features floats, or nullptr to remove it; copied.
  void set_bias(const float* bias);

  // y (batch, out_features) = x (batch, in_features) @ deq(W)^T + LoRA + bias.
  void forward(const float* x, int64_t batch, float* y) const;
  // out: (out_features, in_features).
  void dequantize(float* out) const;

  const Nf4Weight& weight() const { return view_; }
  int64_t out_features() const { return view_.out_features; }
  int64_t in_features() const { return view_.in_features; }
  int64_t rank() const { return rank_; }

 private:
  std::vector<uint8_t> codes_;
  std::vector<float> scales_;
  std::vector<float> a_, b_, bias_;
  int64_t rank_ = 0;
  float scaling_ = 0.0f;
  Nf4Weight view_;
};

}  // namespace qlora
