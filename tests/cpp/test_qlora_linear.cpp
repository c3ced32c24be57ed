// The owning C++ layer gives the same results as the operations it wraps, and refuses bad
// arguments with std::invalid_argument.
#include <catch2/catch.hpp>

#include <vector>

#include "qlora/ops.h"
#include "qlora/qlora_linear.h"
#include "test_util.h"

using namespace qlora;

TEST_CASE("QLoraLinear forward equals x @ deq(W)^T + scaling * (x @ A^T) @ B^T + bias") {
  const int64_t out = 19, in = 45, rank = 3, batch = 4;
  const auto w = qlora_test::normal_vector(out * in, 21);
  const auto x = qlora_test::normal_vector(batch * in, 22);
  const auto a = qlora_test::normal_vector(rank * in, 23);
  const auto b = qlora_test::normal_vector(out * rank, 24);
  const auto bias = qlora_test::normal_vector(out, 25);
  QLoraLinear layer(w.data(), out, in, 16);
  layer.set_lora(a.data(), b.data(), rank, 0.5f);
  layer.set_bias(bias.data());
  std::vector<float> deq(out * in), y(batch * out);
  layer.dequantize(deq.data());
  layer.forward(x.data(), batch, y.data());
  qlora_test::check_forward_within_bound(y, x, deq, a, b, bias.data(), 0.5, batch, out, in, rank);
}

TEST_CASE("QLoraLinear refuses bad sizes") {
  const std::vector<float> w(6, 1.0f);
  CHECK_THROWS_AS(QLoraLinear(w.data(), 2, 3, 0), std::invalid_argument);
  CHECK_THROWS_AS(QLoraLinear(nullptr, 2, 3, 4), std::invalid_argument);
  CHECK_THROWS_AS(QLoraLinear(w.data(), INT64_MAX, 3, 4), std::invalid_argument);
  QLoraLinear layer(w.data(), 2, 3, 4);
  CHECK_THROWS_AS(layer.set_lora(nullptr, nullptr, 2, 1.0f), std::invalid_argument);
  CHECK_THROWS_AS(layer.set_lora(w.data(), w.data(), -1, 1.0f), std::invalid_argument);
}
