// The C++ training core of one LoRA adapter over a frozen NF4 base: the training forward, which
// returns what the backward needs (u = x~ A^T; the dropout mask is regenerated from its seed,
// never stored), and the backward giving the input, A, B and bias gradients. No Python; the
// pybind11 glue is csrc/bindings/bind_train.cpp. Results are bit-identical for any thread
// count: every element is summed in one fixed order, whatever split the pool makes.
//
// The maths (y = x W^T + s (x~ A^T) B^T + bias, x~ = dropout(x) on the LoRA input only,
// u = x~ A^T, G = dL/dy, s the scaling):
//   dB = s G^T u,  dA = s (G B)^T x~,  dx = G deq(W) + s (mask / (1 - p)) * ((G B) A),
//   dbias = sum over rows of G.
#pragma once

#include <cstdint>

#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "qlora/precision.h"

namespace qlora {

// Dropout with probability p in [0, 1), reproducible from a 64-bit seed by a counter-based hash
// (no state, so any thread computes any element): element (row, col) of a batch x in_features
// input is kept when
//   h = splitmix64(splitmix64(seed) + (row * in_features + col + 1) * 0x9E3779B97F4A7C15)
//   (h >> 40) < keep_threshold(p),  keep_threshold(p) = llround((1 - p) * 2^24)
// where splitmix64 is the finalizer z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
// z *= 0x94D049BB133111EB; z ^= z >> 31 (all mod 2^64), and a kept element is scaled by
// dropout_scale(p) = float(1 / (1 - p)) (computed in double, rounded once). p = 0 keeps every
// element and scales by exactly 1. Rows count from 0 within the call's batch.
struct Dropout {
  float p = 0.0f;
  uint64_t seed = 0;
};
uint32_t dropout_keep_threshold(float p);
float dropout_scale(float p);
// mask[r * in_features + c] = 1 if kept else 0, for rows [0, batch) (tests, bindings).
void dropout_mask(const Dropout& d, int64_t batch, int64_t in_features, uint8_t* mask);

// One adapter: a (rank x in_features), b (out_features x rank), row-major float32.
struct LoraAdapter {
  const float* a = nullptr;
  const float* b = nullptr;
  int64_t rank = 0;
  float scaling = 0.0f;
};

// y (batch x out) = x @ deq(W)^T in opts.precision + bias + s * u @ B^T, u (batch x rank) =
// dropout(x) @ A^T in float32; u is written for the backward. bias may be null. The base
// product and bias are computed as forward() computes them and the LoRA term is added as its
// drivers add it (lora_down, then lora_up), so with p = 0 y equals forward()'s bit for bit.
// rank 0 gives the base alone and writes no u. Throws std::invalid_argument on bad arguments
// (p outside [0, 1), null buffers, negative sizes).
void forward_train(const Nf4Weight& w, const float* x, int64_t batch, const LoraAdapter& lora,
                   const float* bias, const Dropout& dropout, float* y, float* u,
                   const ForwardOptions& opts = {});

// Output buffers of backward(); a null pointer means "not wanted" (e.g. no input gradient for
// a first layer, no bias gradient for a frozen bias), and its work is skipped.
struct LoraGrads {
  float* dx = nullptr;     // batch x in_features
  float* da = nullptr;     // rank x in_features
  float* db = nullptr;     // out_features x rank
  float* dbias = nullptr;  // out_features
};

// The gradients for upstream gradient g (batch x out_features), given the forward's input x,
// its u and the same dropout (seed and p). Arithmetic, each sum in the order written:
//   gb[r, k]   = sum over o ascending of g[r, o] * b[o, k]            (G B, float32)
//   db[o, k]   = s * (sum over r ascending of g[r, o] * u[r, k])
//   da[k, c]   = s * (sum over r ascending of gb[r, k] * x~[r, c])
//   dx[r, c]   = gemm_nf4t(g)[r, c] + (s * m[r, c]) * (sum over k ascending of gb[r, k] * a[k, c])
//   dbias[o]   = sum over r ascending of g[r, o]
// with x~ = x * m, m = dropout_scale(p) where kept and 0 elsewhere. x is only read when da is
// wanted; u only when db is. rank 0 leaves da and db untouched (they are empty).
void backward(const Nf4Weight& w, const float* x, int64_t batch, const LoraAdapter& lora,
              const Dropout& dropout, const float* u, const float* g, const LoraGrads& grads);

}  // namespace qlora
