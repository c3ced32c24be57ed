// The C++ layer class, for C++ programs that link qlora_core directly (servers, benchmarks):
// it owns a quantized weight, the LoRA matrices and an optional bias, and runs the fused
// forward. Copies are deep and independent; a move leaves the source empty (it can be assigned
// to or destroyed, and forward/dequantize on it throw std::logic_error). No Python here; bad
// sizes throw std::invalid_argument. Not synchronized: calling set_* while another thread runs
// forward on the same object is a data race (the Python layer adds that guarantee itself).
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

  QLoraLinear(const QLoraLinear&) = default;
  QLoraLinear& operator=(const QLoraLinear&) = default;
  QLoraLinear(QLoraLinear&& other) noexcept;
  QLoraLinear& operator=(QLoraLinear&& other) noexcept;
  ~QLoraLinear() = default;

  // a: (rank, in_features), b: (out_features, rank), both row-major; copied.
  void set_lora(const float* a, const float* b, int64_t rank, float scaling);
  // bias: out_features floats, or nullptr to remove it; copied.
  void set_bias(const float* bias);

  // y (batch, out_features) = x (batch, in_features) @ deq(W)^T + LoRA + bias.
  void forward(const float* x, int64_t batch, float* y) const;
  // out: (out_features, in_features).
  void dequantize(float* out) const;

  // A view of this layer's own buffers, valid until the layer is modified, moved or destroyed.
  Nf4Weight weight() const;
  int64_t out_features() const { return out_features_; }
  int64_t in_features() const { return in_features_; }
  int64_t group_size() const { return group_size_; }
  int64_t rank() const { return rank_; }

 private:
  // The view is built from the members on every call rather than stored: a stored view would
  // hold pointers into whichever object it was first built for, which is wrong after a copy.
  Nf4Weight checked_weight() const;
  void reset() noexcept;

  std::vector<uint8_t> codes_;
  std::vector<float> scales_;
  std::vector<float> a_, b_, bias_;
  int64_t out_features_ = 0;
  int64_t in_features_ = 0;
  int64_t group_size_ = 0;
  int64_t rank_ = 0;
  float scaling_ = 0.0f;
};

}  // namespace qlora
