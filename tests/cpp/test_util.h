// Shared helpers of the C++ tests: deterministic inputs, the odd-size sweep and the list of
// kernel tables this CPU can run.
#pragma once

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

inline std::vector<const qlora::KernelTable*> runnable_tables() {
  std::vector<const qlora::KernelTable*> out;
  for (const auto& name : qlora::available_isas()) out.push_back(&qlora::kernels_by_name(name));
  return out;
}

}  // namespace qlora_test
