// The owning C++ layer: storage around the operations of ops.h. Every call builds its
// Nf4Weight view from this object's own vectors, so the compiler-generated copies are deep and
// correct; the moves are written out only to leave the source empty (all sizes zero) so a
// moved-from layer fails loudly instead of running with sizes that no longer match its buffers.
#include "qlora/qlora_linear.h"

#include <stdexcept>
#include <string>
#include <utility>

#include "qlora/ops.h"

namespace qlora {

QLoraLinear::QLoraLinear(const float* weight, int64_t out_features, int64_t in_features,
                         int64_t group_size) {
  if (weight == nullptr) throw std::invalid_argument("weight must not be null");
  const int64_t n = checked_mul(out_features, in_features, "out_features * in_features");
  codes_.resize(static_cast<size_t>(packed_bytes(out_features, in_features)));
  scales_.resize(static_cast<size_t>(group_count(n, group_size)));
  quantize_nf4(weight, out_features, in_features, group_size, codes_.data(), scales_.data());
  out_features_ = out_features;
  in_features_ = in_features;
  group_size_ = group_size;
}

QLoraLinear::QLoraLinear(QLoraLinear&& other) noexcept
    : codes_(std::move(other.codes_)),
      scales_(std::move(other.scales_)),
      a_(std::move(other.a_)),
      b_(std::move(other.b_)),
      bias_(std::move(other.bias_)),
      out_features_(other.out_features_),
      in_features_(other.in_features_),
      group_size_(other.group_size_),
      rank_(other.rank_),
      scaling_(other.scaling_) {
  other.reset();
}

QLoraLinear& QLoraLinear::operator=(QLoraLinear&& other) noexcept {
  if (this != &other) {
    codes_ = std::move(other.codes_);
    scales_ = std::move(other.scales_);
    a_ = std::move(other.a_);
    b_ = std::move(other.b_);
    bias_ = std::move(other.bias_);
    out_features_ = other.out_features_;
    in_features_ = other.in_features_;
    group_size_ = other.group_size_;
    rank_ = other.rank_;
    scaling_ = other.scaling_;
    other.reset();
  }
  return *this;
}

void QLoraLinear::reset() noexcept {
  // A moved-from vector is only "valid but unspecified"; clear() makes it empty for certain.
  codes_.clear();
  scales_.clear();
  a_.clear();
  b_.clear();
  bias_.clear();
  out_features_ = in_features_ = group_size_ = rank_ = 0;
  scaling_ = 0.0f;
}

Nf4Weight QLoraLinear::weight() const {
  Nf4Weight v;
  v.codes = codes_.data();
  v.scales = scales_.data();
  v.out_features = out_features_;
  v.in_features = in_features_;
  v.group_size = group_size_;
  v.num_groups = static_cast<int64_t>(scales_.size());
  return v;
}

Nf4Weight QLoraLinear::checked_weight() const {
  if (codes_.empty()) throw std::logic_error("QLoraLinear: this layer was moved from");
  return weight();
}

void QLoraLinear::set_lora(const float* a, const float* b, int64_t rank, float scaling) {
  if (codes_.empty()) throw std::logic_error("QLoraLinear: this layer was moved from");
  if (rank < 0) throw std::invalid_argument("rank must be >= 0, got " + std::to_string(rank));
  if (rank > 0 && (a == nullptr || b == nullptr)) throw std::invalid_argument("A and B must not be null");
  const size_t na = static_cast<size_t>(checked_mul(rank, in_features_, "rank * in_features"));
  const size_t nb = static_cast<size_t>(checked_mul(rank, out_features_, "rank * out_features"));
  a_.assign(a, a + (rank > 0 ? na : 0));
  b_.assign(b, b + (rank > 0 ? nb : 0));
  rank_ = rank;
  scaling_ = scaling;
}

void QLoraLinear::set_bias(const float* bias) {
  if (bias == nullptr) {
    bias_.clear();
  } else {
    if (codes_.empty()) throw std::logic_error("QLoraLinear: this layer was moved from");
    bias_.assign(bias, bias + out_features_);
  }
}

void QLoraLinear::forward(const float* x, int64_t batch, float* y) const {
  qlora::forward(checked_weight(), x, batch, a_.data(), b_.data(), rank_, scaling_,
                 bias_.empty() ? nullptr : bias_.data(), y);
}

void QLoraLinear::dequantize(float* out) const { dequantize_nf4(checked_weight(), out); }

}  // namespace qlora
