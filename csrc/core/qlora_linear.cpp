// The owning C++ layer: storage around the operations of ops.h.
#include "qlora/qlora_linear.h"

#include <stdexcept>
#include <string>

#include "qlora/ops.h"

namespace qlora {

QLoraLinear::QLoraLinear(const float* weight, int64_t out_features, int64_t in_features,
                         int64_t group_size) {
  if (weight == nullptr) throw std::invalid_argument("weight must not be null");
  const int64_t n = checked_mul(out_features, in_features, "out_features * in_features");
  codes_.resize(static_cast<size_t>(packed_bytes(out_features, in_features)));
  scales_.resize(static_cast<size_t>(group_count(n, group_size)));
  quantize_nf4(weight, out_features, in_features, group_size, codes_.data(), scales_.data());
  view_.codes = codes_.data();
  view_.scales = scales_.data();
  view_.out_features = out_features;
  view_.in_features = in_features;
  view_.group_size = group_size;
  view_.num_groups = static_cast<int64_t>(scales_.size());
}

void QLoraLinear::set_lora(const float* a, const float* b, int64_t rank, float scaling) {
  if (rank < 0) throw std::invalid_argument("rank must be >= 0, got " + std::to_string(rank));
  if (rank > 0 && (a == nullptr || b == nullptr)) throw std::invalid_argument("A and B must not be null");
  const size_t na = static_cast<size_t>(checked_mul(rank, view_.in_features, "rank * in_features"));
  const size_t nb = static_cast<size_t>(checked_mul(rank, view_.out_features, "rank * out_features"));
  a_.assign(a, a + (rank > 0 ? na : 0));
  b_.assign(b, b + (rank > 0 ? nb : 0));
  rank_ = rank;
  scaling_ = scaling;
}

void QLoraLinear::set_bias(const float* bias) {
  if (bias == nullptr) {
    bias_.clear();
  } else {
    bias_.assign(bias, bias + view_.out_features);
  }
}

void QLoraLinear::forward(const float* x, int64_t batch, float* y) const {
  qlora::forward(view_, x, batch, a_.data(), b_.data(), rank_, scaling_,
                 bias_.empty() ? nullptr : bias_.data(), y);
}

void QLoraLinear::dequantize(float* out) const { dequantize_nf4(view_, out); }

}  // namespace qlora
