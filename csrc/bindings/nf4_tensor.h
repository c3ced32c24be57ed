// The quantized-weight object the binding files share (qlora._core.Nf4Tensor): an immutable view
// whose numpy arrays stay referenced by the object, so compute running without the GIL never
// sees them freed. Registered with pybind11 once, in module.cpp; other binding files (e.g.
// bind_train.cpp) take it as an argument, and their register_* functions are declared at the
// end. A named namespace, not an anonymous one, so every translation unit of the module sees
// the same C++ type.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include "qlora/nf4.h"
#include "qlora/ops.h"

// Hidden, as pybind11's own namespace is: the class holds pybind11 types.
namespace __attribute__((visibility("hidden"))) qlora_bindings {

using F32 = pybind11::array_t<float, pybind11::array::c_style>;
using U8 = pybind11::array_t<uint8_t, pybind11::array::c_style>;

inline void require_size(const pybind11::array& a, int64_t expected, const char* name) {
  if (static_cast<int64_t>(a.size()) != expected) {
    throw std::invalid_argument(std::string(name) + " must have " + std::to_string(expected) + " elements, got " +
                                std::to_string(a.size()));
  }
}

inline void require(bool ok, const char* msg) {
  if (!ok) throw std::invalid_argument(msg);
}

// An immutable quantized weight: the arrays it was built from stay referenced here, so a
// forward running without the GIL can never see them freed.
class Nf4Tensor {
 public:
  Nf4Tensor(U8 codes, std::optional<F32> scales, std::optional<U8> qscales,
            std::optional<F32> nested_scales, std::optional<F32> nested_map, float nested_offset,
            int64_t out_features, int64_t in_features, int64_t group_size)
      : codes_(std::move(codes)) {
    w_.out_features = out_features;
    w_.in_features = in_features;
    w_.group_size = group_size;
    const int64_t n = qlora::checked_mul(out_features, in_features, "out_features * in_features");
    w_.num_groups = qlora::group_count(n, group_size);
    require_size(codes_, qlora::packed_bytes(out_features, in_features), "codes");
    w_.codes = codes_.data();
    if (scales) {
      require(!qscales && !nested_scales && !nested_map,
              "give either scales or the double-quantized scales, not both");
      scales_ = *scales;
      require_size(scales_, w_.num_groups, "scales");
      w_.scales = scales_.data();
    } else {
      require(qscales && nested_scales && nested_map,
              "double-quantized scales need qscales, nested_scales and nested_map");
      qscales_ = *qscales;
      nested_scales_ = *nested_scales;
      nested_map_ = *nested_map;
      require_size(qscales_, w_.num_groups, "qscales");
      require_size(nested_scales_, (w_.num_groups - 1) / qlora::kNestedBlock + 1, "nested_scales");
      require_size(nested_map_, 256, "nested_map");
      w_.qscales = qscales_.data();
      w_.nested_scales = nested_scales_.data();
      w_.nested_map = nested_map_.data();
      w_.nested_offset = nested_offset;
    }
    qlora::validate_weight(w_);
  }
  const qlora::Nf4Weight& view() const { return w_; }
  int64_t out_features() const { return w_.out_features; }
  int64_t in_features() const { return w_.in_features; }
  int64_t group_size() const { return w_.group_size; }
  int64_t num_groups() const { return w_.num_groups; }

 private:
  U8 codes_;
  F32 scales_;
  U8 qscales_;
  F32 nested_scales_, nested_map_;
  qlora::Nf4Weight w_;
};

}  // namespace qlora_bindings

// The registration functions of the other binding files, called by module.cpp.
void register_train(pybind11::module_& m);  // bind_train.cpp
