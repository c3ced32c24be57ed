// Shared helpers of the C++ tests: deterministic inputs, the odd-size sweep, the list of
// kernel tables this CPU can run and the float64 forward reference with its rounding bound.
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/kernels.h"

namespace qlora_test {

// Sizes that exercise every tail path of 16- and 32-wide kernels.
inline const std::vector<int64_t> kOddSizes = {1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 67, 127, 129, 193, 255};

inline std::vector<float> normal_vector(size_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

// A view of a weight with plain float32 scales over caller-owned buffers.
inline qlora::Nf4Weight plain_view(const std::vector<uint8_t>& codes, const std::vector<float>& absmax,
                                   int64_t out, int64_t in, int64_t gs) {
  qlora::Nf4Weight v;
  v.codes = codes.data();
  v.scales = absmax.data();
  v.out_features = out;
  v.in_features = in;
  v.group_size = gs;
  v.num_groups = static_cast<int64_t>(absmax.size());
  return v;
}

inline std::vector<const qlora::KernelTable*> runnable_tables() {
  std::vector<const qlora::KernelTable*> out;
  for (const auto& name : qlora::available_isas()) out.push_back(&qlora::kernels_by_name(name));
  return out;
}

// y (batch x out) against x @ deq^T + scaling * (x @ A^T) @ B^T + bias, summed in float64.
// Each product and partial sum rounds at most once per term (in + rank terms, plus the scale,
// scaling and bias operations), so |err| <= gamma * sum |terms|. bias may be null.
inline void check_forward_within_bound(const std::vector<float>& y, const std::vector<float>& x,
                                       const std::vector<float>& deq, const std::vector<float>& a,
                                       const std::vector<float>& b, const float* bias, double scaling,
                                       int64_t batch, int64_t out, int64_t in, int64_t rank) {
  const double eps = std::ldexp(1.0, -24);
  std::vector<double> xa(static_cast<size_t>(batch * rank)), xa_mag(xa.size());
  for (int64_t bi = 0; bi < batch; ++bi) {
    for (int64_t k = 0; k < rank; ++k) {
      for (int64_t c = 0; c < in; ++c) {
        xa[bi * rank + k] += double(x[bi * in + c]) * a[k * in + c];
        xa_mag[bi * rank + k] += std::fabs(double(x[bi * in + c]) * a[k * in + c]);
      }
    }
  }
  for (int64_t bi = 0; bi < batch; ++bi) {
    for (int64_t o = 0; o < out; ++o) {
      double ref = bias != nullptr ? bias[o] : 0.0, mag = std::fabs(ref);
      for (int64_t c = 0; c < in; ++c) {
        ref += double(x[bi * in + c]) * deq[o * in + c];
        mag += std::fabs(double(x[bi * in + c]) * deq[o * in + c]);
      }
      for (int64_t k = 0; k < rank; ++k) {
        ref += scaling * xa[bi * rank + k] * b[o * rank + k];
        mag += scaling * xa_mag[bi * rank + k] * std::fabs(b[o * rank + k]);
      }
      const double bound = double(in + rank + 4) * eps * mag * 1.01 + 1e-30;
      REQUIRE(std::fabs(double(y[bi * out + o]) - ref) <= bound);
    }
  }
}

}  // namespace qlora_test
