// The owning C++ layer gives the same results as the operations it wraps, refuses bad
// arguments with std::invalid_argument, and its copies and moves own their buffers: a copy
// outlives its original (run under the ASan build, -DQLORA_SANITIZE=ON, a copy that still points
// into the original's buffers is a heap-use-after-free; the pointer checks catch it anywhere).
#include <catch2/catch.hpp>

#include <cstdint>
#include <memory>
#include <utility>
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

namespace {

struct Fixture {
  static constexpr int64_t kOut = 37, kIn = 70, kRank = 4, kBatch = 5, kGroup = 32;
  std::vector<float> w = qlora_test::normal_vector(kOut * kIn, 31);
  std::vector<float> x = qlora_test::normal_vector(kBatch * kIn, 32);
  std::vector<float> a = qlora_test::normal_vector(kRank * kIn, 33, 0.1f);
  std::vector<float> b = qlora_test::normal_vector(kOut * kRank, 34, 0.1f);
  std::vector<float> bias = qlora_test::normal_vector(kOut, 35);

  std::unique_ptr<QLoraLinear> make(uint32_t seed = 31) const {
    const auto weight = qlora_test::normal_vector(kOut * kIn, seed);
    auto layer = std::make_unique<QLoraLinear>(weight.data(), kOut, kIn, kGroup);
    layer->set_lora(a.data(), b.data(), kRank, 0.25f);
    layer->set_bias(bias.data());
    return layer;
  }
  static std::vector<float> run(const QLoraLinear& layer, const std::vector<float>& x) {
    std::vector<float> y(static_cast<size_t>(kBatch * kOut));
    layer.forward(x.data(), kBatch, y.data());
    return y;
  }
};

// The layer's view must point into the layer's own storage, not into another object's.
void check_owns_its_buffers(const QLoraLinear& copy, const QLoraLinear& original) {
  CHECK(copy.weight().codes != original.weight().codes);
  CHECK(copy.weight().scales != original.weight().scales);
}

}  // namespace

TEST_CASE("a copied QLoraLinear owns its buffers and outlives the original") {
  Fixture f;
  auto original = f.make();
  const auto expected = Fixture::run(*original, f.x);
  QLoraLinear copy(*original);
  check_owns_its_buffers(copy, *original);
  original.reset();  // the copy must not read the original's freed buffers
  CHECK(Fixture::run(copy, f.x) == expected);
}

TEST_CASE("copy assignment replaces the whole layer and outlives the source") {
  Fixture f;
  auto source = f.make(31);
  const auto expected = Fixture::run(*source, f.x);
  auto target = f.make(41);  // same sizes: vector assignment may keep the target's allocation
  CHECK(Fixture::run(*target, f.x) != expected);
  *target = *source;
  check_owns_its_buffers(*target, *source);
  source.reset();
  CHECK(Fixture::run(*target, f.x) == expected);
}

TEST_CASE("moves carry the layer; a moved-from layer refuses to run") {
  Fixture f;
  auto source = f.make();
  const auto expected = Fixture::run(*source, f.x);
  QLoraLinear moved(std::move(*source));
  CHECK(Fixture::run(moved, f.x) == expected);
  std::vector<float> y(static_cast<size_t>(Fixture::kBatch * Fixture::kOut));
  CHECK_THROWS_AS(source->forward(f.x.data(), Fixture::kBatch, y.data()), std::logic_error);
  source.reset();
  CHECK(Fixture::run(moved, f.x) == expected);

  auto target = f.make(41);
  *target = std::move(moved);
  CHECK(Fixture::run(*target, f.x) == expected);
  CHECK_THROWS_AS(moved.forward(f.x.data(), Fixture::kBatch, y.data()), std::logic_error);
  // A moved-from layer can be assigned to again and is then whole.
  moved = *target;
  CHECK(Fixture::run(moved, f.x) == expected);
  check_owns_its_buffers(moved, *target);
}
