// Google Benchmark suite of the core operations, per instruction set this CPU can run and per
// layer shape of common 7B-class models: quantize (bytes/s of fp32 input), dequantize (bytes/s
// of fp32 output) and the fused forward at batch 1, 8, 32, 128 and 512 with a rank-16 LoRA term
// and a bias (FLOP/s of the base matmul, bytes/s of NF4 weight read; the scalar table only up to
// batch 8). Threads follow QLORA_NUM_THREADS or the affinity mask, as in the library; the real
// (wall) time is reported, and with --benchmark_repetitions a "min" aggregate (fastest time)
// besides the mean and median.
//
//   qlora_bench_kernels --benchmark_filter='forward/avx512/4096x4096/'
//   QLORA_NUM_THREADS=1 qlora_bench_kernels --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true --benchmark_filter='quantize|dequantize'
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "qlora/thread_pool.h"

namespace {

constexpr int64_t kGroupSize = 64;
constexpr int64_t kRank = 16;

struct Shape {
  int64_t out, in;
  std::string name() const { return std::to_string(out) + "x" + std::to_string(in); }
};
const std::vector<Shape> kShapes = {{4096, 4096}, {11008, 4096}, {4096, 11008}, {14336, 4096}};
const std::vector<int64_t> kBatches = {1, 8, 32, 128, 512};

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  // A cheap LCG: inputs only need to be varied, and 235 MB of std::normal_distribution would
  // dominate the set-up time.
  std::vector<float> v(n);
  uint32_t s = seed * 2654435761u + 1u;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = scale * (static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
  return v;
}

struct Quantized {
  Shape shape;
  std::vector<uint8_t> codes;
  std::vector<float> absmax;
  qlora::Nf4Weight view() const {
    qlora::Nf4Weight w;
    w.codes = codes.data();
    w.scales = absmax.data();
    w.out_features = shape.out;
    w.in_features = shape.in;
    w.group_size = kGroupSize;
    w.num_groups = static_cast<int64_t>(absmax.size());
    return w;
  }
  int64_t weight_bytes() const {
    return static_cast<int64_t>(codes.size() + absmax.size() * sizeof(float));
  }
};

// One quantized weight per shape, made on first use with the best ISA and kept for the run.
const Quantized& quantized(const Shape& s) {
  static std::map<std::pair<int64_t, int64_t>, std::unique_ptr<Quantized>> cache;
  auto& slot = cache[{s.out, s.in}];
  if (!slot) {
    const std::string saved = qlora::active_kernels().name;
    qlora::set_active_isa(qlora::available_isas().front());
    const auto w = random_floats(static_cast<size_t>(s.out * s.in), 1);
    slot = std::make_unique<Quantized>();
    slot->shape = s;
    slot->codes.resize(static_cast<size_t>(qlora::packed_bytes(s.out, s.in)));
    slot->absmax.resize(static_cast<size_t>(qlora::group_count(s.out * s.in, kGroupSize)));
    qlora::quantize_nf4(w.data(), s.out, s.in, kGroupSize, slot->codes.data(), slot->absmax.data());
    qlora::set_active_isa(saved);
  }
  return *slot;
}

void set_counters(benchmark::State& state, double bytes, double flops) {
  using benchmark::Counter;
  const double iters = static_cast<double>(state.iterations());
  state.counters["bytes"] = Counter(bytes * iters, Counter::kIsRate, Counter::kIs1024);
  if (flops > 0) state.counters["FLOPS"] = Counter(flops * iters, Counter::kIsRate);
  state.counters["threads"] = qlora::get_num_threads();
}

void bm_quantize(benchmark::State& state, std::string isa, Shape s) {
  qlora::set_active_isa(isa);
  const auto w = random_floats(static_cast<size_t>(s.out * s.in), 1);
  std::vector<uint8_t> codes(static_cast<size_t>(qlora::packed_bytes(s.out, s.in)));
  std::vector<float> absmax(static_cast<size_t>(qlora::group_count(s.out * s.in, kGroupSize)));
  for (auto _ : state) {
    qlora::quantize_nf4(w.data(), s.out, s.in, kGroupSize, codes.data(), absmax.data());
    benchmark::DoNotOptimize(codes.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 4.0 * static_cast<double>(s.out * s.in), 0);
}

void bm_dequantize(benchmark::State& state, std::string isa, Shape s) {
  const Quantized& q = quantized(s);
  qlora::set_active_isa(isa);
  std::vector<float> out(static_cast<size_t>(s.out * s.in));
  for (auto _ : state) {
    qlora::dequantize_nf4(q.view(), out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 4.0 * static_cast<double>(s.out * s.in), 0);
}

void bm_forward(benchmark::State& state, std::string isa, Shape s, int64_t batch) {
  const Quantized& q = quantized(s);
  qlora::set_active_isa(isa);
  const auto x = random_floats(static_cast<size_t>(batch * s.in), 2);
  const auto a = random_floats(static_cast<size_t>(kRank * s.in), 3, 0.05f);
  const auto b = random_floats(static_cast<size_t>(s.out * kRank), 4, 0.05f);
  const auto bias = random_floats(static_cast<size_t>(s.out), 5);
  std::vector<float> y(static_cast<size_t>(batch * s.out));
  for (auto _ : state) {
    qlora::forward(q.view(), x.data(), batch, a.data(), b.data(), kRank, 2.0f, bias.data(), y.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, static_cast<double>(q.weight_bytes()), 2.0 * static_cast<double>(batch * s.out * s.in));
}

// With --benchmark_repetitions, the fastest repetition: on a shared machine it is the one least
// disturbed by other processes. Google Benchmark applies a statistic to every counter alike, so
// the rate counters of the "min" row are the slowest rates: derive rates from its time.
double fastest(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  for (const std::string& isa : qlora::available_isas()) {
    for (const Shape& s : kShapes) {
      benchmark::RegisterBenchmark(("quantize/" + isa + "/" + s.name()).c_str(), bm_quantize, isa, s)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->ComputeStatistics("min", fastest);
      benchmark::RegisterBenchmark(("dequantize/" + isa + "/" + s.name()).c_str(), bm_dequantize, isa, s)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->ComputeStatistics("min", fastest);
      for (int64_t batch : kBatches) {
        // The scalar specification needs about a minute per batch-512 call on the largest shape;
        // its batched rows add nothing a SIMD row does not already show.
        if (isa == "scalar" && batch > 8) continue;
        benchmark::RegisterBenchmark(("forward/" + isa + "/" + s.name() + "/b" + std::to_string(batch)).c_str(),
                                     bm_forward, isa, s, batch)
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
