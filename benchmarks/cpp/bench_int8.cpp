// Google Benchmark cases of the int8 kernels, single-threaded, per ISA this CPU runs that has
// its own int8 entries (and scalar's quantize_q8 for reference): quantize_q8 (bytes/s of fp32
// input) and gemm_nf4_q8 over a 4096 x 4096 NF4 weight at group 64 (FLOP/s of the product, and
// bytes/s of NF4 weight read), at batch 1, 8, 32, 128 and 512, called directly on the calling
// thread in the driver's 256-row batch chunks; plus the fp32 product of the same ISA chain at
// the same batches for comparison.
//
//   qlora_bench_int8 --benchmark_filter='gemm_nf4_q8/avx512_vnni'
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

std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::vector<float> v(n);
  uint32_t s = seed * 2654435761u + 1u;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f;
  }
  return v;
}

struct Weight {
  std::vector<uint8_t> codes;
  std::vector<float> absmax;
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

const Weight& weight() {
  static const Weight w = [] {
    Weight r;
    const auto f = random_floats(static_cast<size_t>(kOut * kIn), 1);
    r.codes.resize(static_cast<size_t>(qlora::packed_bytes(kOut, kIn)));
    r.absmax.resize(static_cast<size_t>(qlora::group_count(kOut * kIn, kGroupSize)));
    qlora::quantize_nf4(f.data(), kOut, kIn, kGroupSize, r.codes.data(), r.absmax.data());
    return r;
  }();
  return w;
}

struct Activations {
  std::vector<float> x;
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
};

Activations activations(int64_t batch) {
  Activations a;
  const int64_t cols = qlora::padded_cols(kIn), blocks = cols / qlora::kQ8Block;
  a.x = random_floats(static_cast<size_t>(batch * kIn), 2);
  a.q.resize(static_cast<size_t>(batch * cols));
  a.scale.resize(static_cast<size_t>(batch * blocks));
  a.sum.resize(static_cast<size_t>(batch * blocks));
  qlora::kernels_by_name("scalar").quantize_q8(a.x.data(), kIn, 0, batch, a.q.data(), a.scale.data(), a.sum.data());
  return a;
}

void bm_quantize_q8(benchmark::State& state, const qlora::KernelTable* t, int64_t batch) {
  Activations a = activations(batch);
  for (auto _ : state) {
    t->quantize_q8(a.x.data(), kIn, 0, batch, a.q.data(), a.scale.data(), a.sum.data());
    benchmark::DoNotOptimize(a.q.data());
    benchmark::ClobberMemory();
  }
  state.counters["bytes"] = benchmark::Counter(4.0 * double(batch * kIn) * double(state.iterations()),
                                               benchmark::Counter::kIsRate, benchmark::Counter::kIs1024);
}

void bm_gemm(benchmark::State& state, qlora::GemmKernel k, int64_t batch) {
  const Weight& w = weight();
  const Activations a = activations(batch);
  const int64_t cols = qlora::padded_cols(kIn), blocks = cols / qlora::kQ8Block;
  std::vector<float> y(static_cast<size_t>(batch * kOut));
  for (auto _ : state) {
    for (int64_t b0 = 0; b0 < batch; b0 += qlora::kBatchChunk) {
      qlora::ForwardArgs p;
      p.w = w.view();
      p.x = a.x.data() + b0 * kIn;
      p.batch = std::min(qlora::kBatchChunk, batch - b0);
      p.x_q8 = a.q.data() + b0 * cols;
      p.x_q8_scale = a.scale.data() + b0 * blocks;
      p.x_q8_sum = a.sum.data() + b0 * blocks;
      p.y = y.data() + b0 * kOut;
      k.fn(p, 0, kOut);
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["FLOPS"] = benchmark::Counter(2.0 * double(batch) * kOut * kIn * iters, benchmark::Counter::kIsRate);
  state.counters["weight_bytes"] = benchmark::Counter(
      double(w.codes.size() + 4 * w.absmax.size()) * iters, benchmark::Counter::kIsRate, benchmark::Counter::kIs1024);
}

int register_all() {
  for (const std::string& name : qlora::available_isas()) {
    const qlora::KernelTable& own = qlora::own_kernels_by_name(name);
    const qlora::KernelTable& resolved = qlora::kernels_by_name(name);
    if (own.quantize_q8 != nullptr) {
      for (int64_t batch : {int64_t{1}, int64_t{32}}) {
        benchmark::RegisterBenchmark(("quantize_q8/" + name + "/4096/" + std::to_string(batch)).c_str(),
                                     bm_quantize_q8, &own, batch)->UseRealTime();
      }
    }
    if (own.gemm_nf4_q8.fn != nullptr) {
      for (int64_t batch : kBatches) {
        benchmark::RegisterBenchmark(("gemm_nf4_q8/" + name + "/4096x4096/" + std::to_string(batch)).c_str(),
                                     bm_gemm, own.gemm_nf4_q8, batch)->UseRealTime();
        benchmark::RegisterBenchmark(("gemm_nf4_f32/" + name + "/4096x4096/" + std::to_string(batch)).c_str(),
                                     bm_gemm, resolved.gemm_nf4_f32, batch)->UseRealTime();
      }
    }
  }
  return 0;
}
const int kRegistered = register_all();

}  // namespace

BENCHMARK_MAIN();
