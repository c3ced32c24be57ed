// The thread pool: every task runs once, exceptions reach the caller, concurrent callers do
// not interfere, forward results do not depend on the thread count, and a worker thread the OS
// refuses to start (injected with the test hook) leaves a working serial pool, not a crash.
// Every test here is tagged [thread_pool]: .ci/tsan.sh runs them under ThreadSanitizer.
#include <catch2/catch.hpp>

#include <atomic>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "qlora/ops.h"
#include "qlora/thread_pool.h"
#include "test_util.h"

using namespace qlora;

TEST_CASE("parallel_for runs every task exactly once", "[thread_pool]") {
  for (int threads : {1, 2, 3, 8}) {
    set_num_threads(threads);
    std::vector<std::atomic<int>> hits(1000);
    parallel_for(1000, [&](int64_t t) { hits[static_cast<size_t>(t)].fetch_add(1); });
    for (auto& h : hits) REQUIRE(h.load() == 1);
  }
  set_num_threads(default_num_threads());
}

TEST_CASE("an exception in a task is rethrown on the caller and the pool stays usable", "[thread_pool]") {
  set_num_threads(4);
  CHECK_THROWS_AS(parallel_for(100, [](int64_t t) { if (t == 57) throw std::invalid_argument("boom"); }),
                  std::invalid_argument);
  std::atomic<int> n{0};
  parallel_for(100, [&](int64_t) { n.fetch_add(1); });
  CHECK(n.load() == 100);
  CHECK_THROWS_AS(set_num_threads(0), std::invalid_argument);
  set_num_threads(default_num_threads());
}

TEST_CASE("forward is bit-identical for any thread count and under concurrent callers", "[thread_pool]") {
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

namespace {

// Runs n tasks and checks each ran exactly once; returns the threads that ran them.
std::set<std::thread::id> run_counted(int64_t n) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
  std::mutex m;
  std::set<std::thread::id> ids;
  parallel_for(n, [&](int64_t t) {
    hits[static_cast<size_t>(t)].fetch_add(1);
    std::lock_guard<std::mutex> lk(m);
    ids.insert(std::this_thread::get_id());
  });
  for (auto& h : hits) REQUIRE(h.load() == 1);
  return ids;
}

}  // namespace

TEST_CASE("a worker that cannot start mid-way: the started ones are joined, the pool runs serially",
          "[thread_pool]") {
  set_num_threads(3);
  run_counted(100);
  set_num_threads(7);  // a new size: the pool restarts at the next parallel_for
  detail::fail_thread_start_for_testing(3);  // workers 1 and 2 start, the 3rd of 6 fails
  const auto ids = run_counted(1000);
  detail::fail_thread_start_for_testing(0);
  CHECK(ids == std::set<std::thread::id>{std::this_thread::get_id()});
  const PoolInfo info = pool_info();
  CHECK(info.requested == 7);
  CHECK(info.threads == 1);
  CHECK_THAT(info.serial_fallback_reason, Catch::Contains("worker thread 3 of 6"));
  CHECK_THAT(info.serial_fallback_reason, Catch::Contains("test hook"));
  // No retry on every call (that would pay a failing thread start per forward)...
  CHECK(pool_info().threads == 1);
  // ...until the thread count is set again.
  set_num_threads(7);
  const PoolInfo again = pool_info();
  CHECK(again.threads == 7);
  CHECK(again.serial_fallback_reason.empty());
  run_counted(1000);
  set_num_threads(default_num_threads());
}

TEST_CASE("a failure right after the old pool is stopped leaves no dangling pool", "[thread_pool]") {
  set_num_threads(4);
  run_counted(100);
  CHECK(pool_info().threads == 4);
  set_num_threads(5);
  detail::fail_thread_start_for_testing(1);  // the very first worker of the new pool fails
  CHECK(run_counted(500).size() == 1);
  detail::fail_thread_start_for_testing(0);
  CHECK(pool_info().threads == 1);
  run_counted(500);  // the old pool is gone: this must not touch it
  set_num_threads(4);
  CHECK(pool_info().threads == 4);
  run_counted(500);
  set_num_threads(default_num_threads());
}

TEST_CASE("pool_info reports the running pool", "[thread_pool]") {
  set_num_threads(1);
  CHECK(pool_info().threads == 1);
  CHECK(pool_info().serial_fallback_reason.empty());
  set_num_threads(3);
  CHECK(pool_info().requested == 3);
  CHECK(pool_info().threads == 3);
  set_num_threads(default_num_threads());
}
