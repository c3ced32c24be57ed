// Google Benchmark cases of the bf16 precision's kernels, called directly on one thread (no
// driver, no pool): pack_bf16 (bytes/s of fp32 input) and gemm_nf4_bf16 at batch 1, 8, 32, 128
// and 512 on a 4096 x 4096 layer with group 64, for every table with its own bf16 entries that
// this CPU runs, beside the fp32 kernel of the best ISA on the same data (FLOP/s of the product,
// bytes/s of NF4 weight read). A batch above 256 is handed to the kernel in chunks of
// kBatchChunk rows, as the driver does.
//
//   qlora_bench_bf16 --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
//   qlora_bench_bf16 --benchmark_filter='gemm_nf4_bf16/avx512_bf16/b1$'
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/kernels.h"
#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "qlora/precision.h"

namespace {

constexpr int64_t kOut = 4096, kIn = 4096, kGroupSize = 64;
const std::vector<int64_t> kBatches = {1, 8, 32, 128, 512};

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::vector<float> v(n);
  uint32_t s = seed * 2654435761u + 1u;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = scale * (static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
  return v;
}

struct Layer {
  std::vector<uint8_t> codes;
  std::vector<float> absmax;
  std::vector<float> bias;
  qlora::Nf4Weight view() const {
    qlora::Nf4Weight w;
    w.codes = codes.data();
    w.scales = absmax.data();
    w.out_features = kOut;
    w.in_features = kIn;
    w.group_size = kGroupSize;
    w.num_groups = static_cast<int64_t>(absmax.size());
    return w;
  }
};

const Layer& layer() {
  static const Layer l = [] {
    Layer q;
    const auto w = random_floats(static_cast<size_t>(kOut * kIn), 1);
    q.codes.resize(static_cast<size_t>(qlora::packed_bytes(kOut, kIn)));
    q.absmax.resize(static_cast<size_t>(qlora::group_count(kOut * kIn, kGroupSize)));
    qlora::quantize_nf4(w.data(), kOut, kIn, kGroupSize, q.codes.data(), q.absmax.data());
    q.bias = random_floats(kOut, 5);
    return q;
  }();
  return l;
}

void set_counters(benchmark::State& state, double bytes, double flops) {
  using benchmark::Counter;
  const double iters = static_cast<double>(state.iterations());
  state.counters["bytes"] = Counter(bytes * iters, Counter::kIsRate, Counter::kIs1024);
  if (flops > 0) state.counters["FLOPS"] = Counter(flops * iters, Counter::kIsRate);
}

void bm_pack_bf16(benchmark::State& state, const qlora::KernelTable* t, int64_t batch) {
  const auto x = random_floats(static_cast<size_t>(batch * kIn), 2);
  std::vector<uint16_t> out(static_cast<size_t>(batch * qlora::padded_cols(kIn)));
  for (auto _ : state) {
    t->pack_bf16(x.data(), kIn, 0, batch, out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 4.0 * static_cast<double>(batch * kIn), 0);
}

// One call of a product kernel over every output row, per batch chunk.
void bm_gemm(benchmark::State& state, const qlora::GemmKernel* k, qlora::Precision precision, int64_t batch) {
  const Layer& l = layer();
  const auto x = random_floats(static_cast<size_t>(batch * kIn), 3);
  const int64_t cols = qlora::padded_cols(kIn);
  std::vector<uint16_t> xb(static_cast<size_t>(batch * cols));
  qlora::kernels_by_name("scalar").pack_bf16(x.data(), kIn, 0, batch, xb.data());
  std::vector<float> y(static_cast<size_t>(batch * kOut));
  for (auto _ : state) {
    for (int64_t b0 = 0; b0 < batch; b0 += qlora::kBatchChunk) {
      qlora::ForwardArgs p;
      p.w = l.view();
      p.batch = std::min(qlora::kBatchChunk, batch - b0);
      p.x = x.data() + b0 * kIn;
      if (precision == qlora::Precision::kBf16) p.x_bf16 = xb.data() + b0 * cols;
      p.bias = l.bias.data();
      p.y = y.data() + b0 * kOut;
      k->fn(p, 0, kOut);
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, static_cast<double>(l.codes.size() + l.absmax.size() * sizeof(float)),
               2.0 * static_cast<double>(batch * kOut * kIn));
}

double fastest(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  std::vector<const qlora::KernelTable*> bf16;
  for (const std::string& isa : qlora::available_isas()) {
    const qlora::KernelTable& own = qlora::own_kernels_by_name(isa);
    if (own.gemm_nf4_bf16.fn != nullptr && own.required_features != qlora::kFeatureNone) bf16.push_back(&own);
  }
  const std::string shape = std::to_string(kOut) + "x" + std::to_string(kIn);
  for (const qlora::KernelTable* t : bf16) {
    if (t->pack_bf16 == nullptr) continue;
    for (int64_t batch : {int64_t{1}, int64_t{512}}) {
      benchmark::RegisterBenchmark(("pack_bf16/" + std::string(t->name) + "/" + std::to_string(kIn) + "/b" +
                                    std::to_string(batch)).c_str(),
                                   bm_pack_bf16, t, batch)
          ->Unit(benchmark::kMicrosecond)
          ->UseRealTime()
          ->ComputeStatistics("min", fastest);
    }
  }
  // The fp32 kernel every batch would use on this CPU, for the side-by-side.
  const qlora::KernelTable& best = qlora::kernels_by_name(qlora::available_isas().front());
  for (int64_t batch : kBatches) {
    benchmark::RegisterBenchmark(("gemm_nf4_f32/" + std::string(best.name) + "/" + shape + "/b" +
                                  std::to_string(batch)).c_str(),
                                 bm_gemm, &best.gemm_nf4_f32, qlora::Precision::kFp32, batch)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->ComputeStatistics("min", fastest);
    for (const qlora::KernelTable* t : bf16) {
      benchmark::RegisterBenchmark(("gemm_nf4_bf16/" + std::string(t->name) + "/" + shape + "/b" +
                                    std::to_string(batch)).c_str(),
                                   bm_gemm, &t->gemm_nf4_bf16, qlora::Precision::kBf16, batch)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->ComputeStatistics("min", fastest);
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
