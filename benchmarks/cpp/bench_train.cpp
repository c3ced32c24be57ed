// Google Benchmark cases of the backward, linked into qlora_bench_kernels beside the forward's
// cases (registered at static initialization, so bench_kernels.cpp's main runs them too): the
// input gradient gemm_nf4t (dx = g @ deq(W)) per instruction set at 4096x4096 and 14336x4096
// (28 MiB of codes, about this machine's L3: the shape where batch 1's access pattern matters),
// and the full LoRA backward (input, A, B and bias gradients, rank 16) with the active one at
// 4096x4096, at batch 1, 32, 128 and 512, beside forward/ISA/SHAPE/bN for the ratio. FLOPS count
// the base product.
//
//   qlora_bench_kernels --benchmark_filter='(forward|input_grad|backward)/[a-z0-9_]+/(4096|14336)x4096/b(1|32|128|512)/'
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "qlora/thread_pool.h"
#include "qlora/train.h"

namespace {

constexpr int64_t kOut = 4096, kIn = 4096, kGroupSize = 64, kRank = 16;
constexpr int64_t kTallOut = 14336;
const std::vector<int64_t> kBatches = {1, 32, 128, 512};

std::vector<float> lcg_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::vector<float> v(n);
  uint32_t s = seed * 2654435761u + 1u;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = scale * (static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
  return v;
}

struct Layer {
  int64_t out = kOut;
  std::vector<uint8_t> codes;
  std::vector<float> absmax;
  qlora::Nf4Weight view() const {
    qlora::Nf4Weight w;
    w.codes = codes.data();
    w.scales = absmax.data();
    w.out_features = out;
    w.in_features = kIn;
    w.group_size = kGroupSize;
    w.num_groups = static_cast<int64_t>(absmax.size());
    return w;
  }
};

Layer make_layer(int64_t out) {
  Layer q;
  q.out = out;
  const auto w = lcg_floats(static_cast<size_t>(out * kIn), 1);
  q.codes.resize(static_cast<size_t>(qlora::packed_bytes(out, kIn)));
  q.absmax.resize(static_cast<size_t>(qlora::group_count(out * kIn, kGroupSize)));
  qlora::quantize_nf4(w.data(), out, kIn, kGroupSize, q.codes.data(), q.absmax.data());
  return q;
}

const Layer& layer(int64_t out = kOut) {
  static const Layer square = make_layer(kOut);
  if (out == kOut) return square;
  static const Layer tall = make_layer(kTallOut);
  return tall;
}

void counters(benchmark::State& state, int64_t batch, int64_t out = kOut) {
  state.counters["FLOPS"] = benchmark::Counter(2.0 * static_cast<double>(batch * out * kIn) *
                                                   static_cast<double>(state.iterations()),
                                               benchmark::Counter::kIsRate);
  state.counters["threads"] = qlora::get_num_threads();
}

void bm_input_grad(benchmark::State& state, std::string isa, int64_t out, int64_t batch) {
  const Layer& l = layer(out);
  qlora::set_active_isa(isa);
  const auto g = lcg_floats(static_cast<size_t>(batch * out), 2);
  std::vector<float> dx(static_cast<size_t>(batch * kIn));
  for (auto _ : state) {
    qlora::gemm_nf4t(l.view(), g.data(), batch, dx.data());
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  counters(state, batch, out);
}

void bm_backward(benchmark::State& state, std::string isa, int64_t batch, float dropout) {
  const Layer& l = layer();
  qlora::set_active_isa(isa);
  const auto x = lcg_floats(static_cast<size_t>(batch * kIn), 3);
  const auto g = lcg_floats(static_cast<size_t>(batch * kOut), 4);
  const auto a = lcg_floats(static_cast<size_t>(kRank * kIn), 5, 0.05f);
  const auto b = lcg_floats(static_cast<size_t>(kOut * kRank), 6, 0.05f);
  const auto u = lcg_floats(static_cast<size_t>(batch * kRank), 7);
  std::vector<float> dx(static_cast<size_t>(batch * kIn)), da(static_cast<size_t>(kRank * kIn)),
      db(static_cast<size_t>(kOut * kRank)), dbias(static_cast<size_t>(kOut));
  const qlora::LoraAdapter lora{a.data(), b.data(), kRank, 2.0f};
  const qlora::Dropout drop{dropout, 42};
  const qlora::LoraGrads grads{dx.data(), da.data(), db.data(), dbias.data()};
  for (auto _ : state) {
    qlora::backward(l.view(), x.data(), batch, lora, drop, u.data(), g.data(), grads);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  counters(state, batch);
}

double fastest(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

const bool kRegistered = [] {
  const std::string shape = std::to_string(kOut) + "x" + std::to_string(kIn);
  for (const std::string& isa : qlora::available_isas()) {
    // The ISAs with their own kernel: the others run the same one from their fallback chain.
    const bool own = qlora::own_kernels_by_name(isa).gemm_nf4t_f32 != nullptr;
    for (int64_t batch : kBatches) {
      if (isa == "scalar" && batch > 1) continue;  // minutes per call; batch 1 shows the ratio
      const std::string b = "/b" + std::to_string(batch);
      if (own) {
        for (int64_t out : {kOut, kTallOut}) {
          if (isa == "scalar" && out != kOut) continue;
          const std::string name = "input_grad/" + isa + "/" + std::to_string(out) + "x" + std::to_string(kIn) + b;
          benchmark::RegisterBenchmark(name.c_str(), bm_input_grad, isa, out, batch)
              ->Unit(benchmark::kMillisecond)
              ->UseRealTime()
              ->ComputeStatistics("min", fastest);
        }
      }
      if (isa != qlora::available_isas().front()) continue;
      for (float p : {0.0f, 0.1f}) {
        const std::string name = "backward/" + isa + "/" + shape + b + (p > 0 ? "/dropout" : "");
        benchmark::RegisterBenchmark(name.c_str(), bm_backward, isa, batch, p)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime()
            ->ComputeStatistics("min", fastest);
      }
    }
  }
  return true;
}();

}  // namespace
