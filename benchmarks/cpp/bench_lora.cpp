// Google Benchmark suite of the LoRA kernels and of mixed-adapter forwards. Per instruction set
// this CPU can run (each with its resolved table, so an ISA without its own LoRA kernel shows the
// one it inherits): lora_up and lora_down of one adapter over 1, 8 and 64 rows at rank 8, 16
// and 64 for 4096 outputs / inputs, the kernel called directly on one thread (FLOP/s of the multiply-adds); and the forward of
// a 4096x4096 layer at batch 8, 64 and 256 with no adapter, one adapter over every row, and 8
// adapters of rank 16 over shuffled rows (the issue 9 target compares the last two). Threads of
// the forward follow QLORA_NUM_THREADS or the affinity mask; real time is reported, and with
// --benchmark_repetitions a "min" aggregate besides the mean and median.
//
//   qlora_bench_lora --benchmark_filter='lora_up/avx512'
//   QLORA_NUM_THREADS=2 qlora_bench_lora --benchmark_filter='adapters/avx512' --benchmark_repetitions=5
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "qlora/thread_pool.h"

namespace {

constexpr int64_t kFeatures = 4096;
constexpr int64_t kGroupSize = 64;

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::vector<float> v(n);
  uint32_t s = seed * 2654435761u + 1u;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = scale * (static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
  return v;
}

void set_flops(benchmark::State& state, double flops) {
  state.counters["FLOPS"] = benchmark::Counter(flops * static_cast<double>(state.iterations()),
                                               benchmark::Counter::kIsRate);
}

// rows listed rows (every 3rd of a batch of 3 * rows), as a mixed batch hands them.
void bm_lora_up(benchmark::State& state, std::string isa, int64_t rank, int64_t rows) {
  const qlora::KernelTable& k = qlora::kernels_by_name(isa);
  const auto u = random_floats(static_cast<size_t>(rows * rank), 1);
  const auto b = random_floats(static_cast<size_t>(kFeatures * rank), 2, 0.05f);
  std::vector<int64_t> list(static_cast<size_t>(rows));
  for (int64_t j = 0; j < rows; ++j) list[static_cast<size_t>(j)] = 3 * j;
  std::vector<float> y(static_cast<size_t>(3 * rows * kFeatures));
  for (auto _ : state) {
    k.lora_up(u.data(), rank, b.data(), 2.0f, nullptr, list.data(), rows, kFeatures, 0, kFeatures, y.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 2.0 * static_cast<double>(rows * rank * kFeatures));
}

void bm_lora_down(benchmark::State& state, std::string isa, int64_t rank, int64_t rows) {
  const qlora::KernelTable& k = qlora::kernels_by_name(isa);
  const auto x = random_floats(static_cast<size_t>(rows * kFeatures), 3);
  const auto a = random_floats(static_cast<size_t>(rank * kFeatures), 4, 0.05f);
  std::vector<float> u(static_cast<size_t>(rows * rank));
  for (auto _ : state) {
    k.lora_down(x.data(), kFeatures, a.data(), rank, 0, rows, u.data());
    benchmark::DoNotOptimize(u.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 2.0 * static_cast<double>(rows * rank * kFeatures));
}

struct Layer {
  std::vector<uint8_t> codes;
  std::vector<float> absmax;
  qlora::Nf4Weight view() const {
    qlora::Nf4Weight w;
    w.codes = codes.data();
    w.scales = absmax.data();
    w.out_features = kFeatures;
    w.in_features = kFeatures;
    w.group_size = kGroupSize;
    w.num_groups = static_cast<int64_t>(absmax.size());
    return w;
  }
};

const Layer& layer() {
  static const Layer l = [] {
    Layer q;
    const auto w = random_floats(static_cast<size_t>(kFeatures * kFeatures), 5);
    q.codes.resize(static_cast<size_t>(qlora::packed_bytes(kFeatures, kFeatures)));
    q.absmax.resize(static_cast<size_t>(qlora::group_count(kFeatures * kFeatures, kGroupSize)));
    qlora::quantize_nf4(w.data(), kFeatures, kFeatures, kGroupSize, q.codes.data(), q.absmax.data());
    return q;
  }();
  return l;
}

// adapters: 0 (base only), 1 (one adapter, every row) or N over shuffled rows spread evenly.
void bm_adapters(benchmark::State& state, std::string isa, int64_t batch, int64_t adapters) {
  const Layer& l = layer();
  qlora::set_active_isa(isa);
  constexpr int64_t kRank = 16;
  const auto x = random_floats(static_cast<size_t>(batch * kFeatures), 6);
  std::vector<std::vector<float>> a, b;
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(adapters));
  std::vector<int64_t> perm(static_cast<size_t>(batch));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(7));
  for (int64_t j = 0; j < batch && adapters > 1; ++j) rows[static_cast<size_t>(j % adapters)].push_back(perm[static_cast<size_t>(j)]);
  std::vector<qlora::LoraSegment> segs;
  for (int64_t i = 0; i < adapters; ++i) {
    a.push_back(random_floats(static_cast<size_t>(kRank * kFeatures), 10 + static_cast<uint32_t>(i), 0.02f));
    b.push_back(random_floats(static_cast<size_t>(kFeatures * kRank), 50 + static_cast<uint32_t>(i), 0.02f));
    auto& r = rows[static_cast<size_t>(i)];
    std::sort(r.begin(), r.end());
    qlora::LoraSegment s;
    s.a = a.back().data();
    s.b = b.back().data();
    s.rank = kRank;
    s.scaling = 2.0f;
    if (adapters > 1) {
      s.rows = r.data();
      s.n_rows = static_cast<int64_t>(r.size());
    }
    segs.push_back(s);
  }
  std::vector<float> y(static_cast<size_t>(batch * kFeatures));
  for (auto _ : state) {
    qlora::forward(l.view(), x.data(), batch, segs.data(), static_cast<int64_t>(segs.size()), nullptr, y.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 2.0 * static_cast<double>(batch * kFeatures * kFeatures));
}

double fastest(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  for (const std::string& isa : qlora::available_isas()) {
    for (int64_t rank : {8, 16, 64}) {
      for (int64_t rows : {1, 8, 64}) {
        const std::string tag = isa + "/r" + std::to_string(rank) + "/rows" + std::to_string(rows);
        benchmark::RegisterBenchmark(("lora_up/" + tag).c_str(), bm_lora_up, isa, rank, rows)
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime()
            ->ComputeStatistics("min", fastest);
        benchmark::RegisterBenchmark(("lora_down/" + tag).c_str(), bm_lora_down, isa, rank, rows)
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime()
            ->ComputeStatistics("min", fastest);
      }
    }
    if (isa == "scalar") continue;  // its base product alone takes seconds at these sizes
    for (int64_t batch : {8, 64, 256}) {
      for (int64_t adapters : {0, 1, 8}) {
        benchmark::RegisterBenchmark(("adapters/" + isa + "/4096x4096/b" + std::to_string(batch) + "/n" +
                                      std::to_string(adapters)).c_str(),
                                     bm_adapters, isa, batch, adapters)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime()
            ->ComputeStatistics("min", fastest);
      }
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
