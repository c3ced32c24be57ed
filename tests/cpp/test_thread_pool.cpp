// The thread pool: every task runs once, exceptions reach the caller, concurrent callers do
// not interfere, and forward results do not depend on the thread count.
#include <catch2/catch.hpp>

#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "qlora/ops.h"
#include "qlora/thread_pool.h"
#include "test_util.h"

using namespace qlora;

TEST_CASE("parallel_for runs every task exactly once") {
  for (int threads : {1, 2, 3, 8}) {
    set_num_threads(threads);
    std::vector<std::atomic<int>> hits(1000);
    parallel_for(1000, [&](int64_t t) { hits[static_cast<size_t>(t)].fetch_add(1); });
    for (auto& h : hits) REQUIRE(h.load() == 1);
  }
  set_num_threads(default_num_threads());
}

TEST_CASE("an exception in a task is rethrown on the caller and the pool stays usable") {
  set_num_threads(4);
  CHECK_THROWS_AS(parallel_for(100, [](int64_t t) { if (t == 57) throw std::invalid_argument("boom"); }),
                  std::invalid_argument);
  std::atomic<int> n{0};
  parallel_for(100, [&](int64_t) { n.fetch_add(1); });
  CHECK(n.load() == 100);
  CHECK_THROWS_AS(set_num_threads(0), std::invalid_argument);
  set_num_threads(default_num_threads());
}

TEST_CASE("forward is bit-identical for any thread count and under concurrent callers") {
  const int64_t out = 300, in = 515, gs = 64, rank = 8, batch = 37;
  const auto w = qlora_test::normal_vector(out * in, 1);
  const auto x = qlora_test::normal_vector(batch * in, 2);
  const auto a = qlora_test::normal_vector(rank * in, 3, 0.05f);
  const auto b = qlora_test::normal_vector(out * rank, 4, 0.05f);
  std::vector<uint8_t> codes(static_cast<size_t>(packed_bytes(out, in)));
  std::vector<float> absmax(static_cast<size_t>(group_count(out * in, gs)));
  quantize_nf4(w.data(), out, in, gs, codes.data(), absmax.data());
  const Nf4Weight v = qlora_test::plain_view(codes, absmax, out, in, gs);
  auto run = [&] {
    std::vector<float> y(static_cast<size_t>(batch * out));
    forward(v, x.data(), batch, a.data(), b.data(), rank, 0.5f, nullptr, y.data());
    return y;
  };
  set_num_threads(1);
  const auto y1 = run();
  for (int threads : {2, 3, 5, 8}) {
    set_num_threads(threads);
    REQUIRE(run() == y1);
  }
  std::vector<std::thread> callers;
  std::atomic<int> mismatches{0};
  for (int i = 0; i < 6; ++i) {
    callers.emplace_back([&] {
      for (int k = 0; k < 20; ++k) if (run() != y1) mismatches.fetch_add(1);
    });
  }
  for (auto& t : callers) t.join();
  CHECK(mismatches.load() == 0);
  set_num_threads(default_num_threads());
}
