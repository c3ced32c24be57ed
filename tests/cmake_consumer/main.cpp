// The consumer of the installed C++ package: quantizes a small weight with qlora::QLoraLinear,
// runs a forward with a LoRA adapter and a bias, and checks it against a plain double-precision
// reference, first of the dequantized weight (tight: float32 rounding only) and then of the
// original weight (loose: NF4's quantization error). Exits non-zero on any mismatch, so a
// package that links but computes wrongly fails CI.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "qlora/qlora_linear.h"
#include "qlora/thread_pool.h"

int main() {
  const int64_t out = 48, in = 200, rank = 4, batch = 3, group = 64;
  const float scaling = 0.5f;
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](size_t n, float sigma) {
    std::vector<float> v(n);
    for (auto& e : v) e = sigma * normal(gen);
    return v;
  };
  const auto w = fill(out * in, 1.0f), x = fill(batch * in, 1.0f), a = fill(rank * in, 0.1f),
             b = fill(out * rank, 0.1f), bias = fill(out, 1.0f);

  qlora::QLoraLinear layer(w.data(), out, in, group);
  layer.set_lora(a.data(), b.data(), rank, scaling);
  layer.set_bias(bias.data());
  std::vector<float> y(batch * out), deq(out * in);
  layer.forward(x.data(), batch, y.data());
  layer.dequantize(deq.data());

  int bad = 0;
  double err2 = 0.0, ref2 = 0.0;
  for (int64_t i = 0; i < batch; ++i) {
    for (int64_t o = 0; o < out; ++o) {
      double lora = 0.0, lora_mag = 0.0;
      for (int64_t k = 0; k < rank; ++k) {
        double xa = 0.0, xa_mag = 0.0;
        for (int64_t c = 0; c < in; ++c) {
          xa += double(x[i * in + c]) * a[k * in + c];
          xa_mag += std::fabs(double(x[i * in + c]) * a[k * in + c]);
        }
        lora += xa * b[o * rank + k];
        lora_mag += xa_mag * std::fabs(b[o * rank + k]);
      }
      double ref_q = bias[o] + scaling * lora, ref_w = ref_q;
      double mag = std::fabs(bias[o]) + scaling * lora_mag;
      for (int64_t c = 0; c < in; ++c) {
        ref_q += double(x[i * in + c]) * deq[o * in + c];
        ref_w += double(x[i * in + c]) * w[o * in + c];
        mag += std::fabs(double(x[i * in + c]) * deq[o * in + c]);
      }
      const double got = y[i * out + o];
      // Every product and partial sum rounds at most once in float32.
      if (std::fabs(got - ref_q) > double(in + rank + 4) * std::ldexp(1.0, -24) * mag) {
        std::printf("y[%lld, %lld] = %.9g, reference %.9g\n", (long long)i, (long long)o, got, ref_q);
        ++bad;
      }
      err2 += (got - ref_w) * (got - ref_w);
      ref2 += ref_w * ref_w;
    }
  }
  // NF4 with group 64 reconstructs a normal weight to about 10% relative error.
  const double rel = std::sqrt(err2 / ref2);
  std::printf("qlora::core %d threads: %d mismatches, error vs float weight %.4f\n",
              qlora::get_num_threads(), bad, rel);
  return bad == 0 && rel < 0.2 ? 0 : 1;
}
