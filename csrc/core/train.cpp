// The training forward and the LoRA backward of one adapter over a frozen NF4 base (train.h):
// argument checks, the counter-based dropout, and the split of each gradient into tasks for the
// thread pool. Every task owns whole output elements and sums them in the fixed order train.h
// states, so the split (and the thread count) never changes a bit. The base's input gradient
// is gemm_nf4t (the ISA kernels); the LoRA products here are rank-thin and run as plain loops
// the compiler vectorizes with baseline flags, under the core's no-contraction rule.
#include "qlora/train.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/thread_pool.h"

#define QLORA_REQUIRE(ok, msg)                   \
  do {                                           \
    if (!(ok)) throw std::invalid_argument(msg); \
  } while (0)

namespace qlora {
namespace {

// Below this many multiply-adds a loop runs on the calling thread (as ops.cpp's drivers do).
constexpr int64_t kMinParallelWork = int64_t{1} << 17;

// Units per task for `units` units of `work` each: a few tasks per thread, each worth waking a
// worker for, a multiple of `align`.
int64_t per_task(int64_t units, int64_t work, int64_t align) {
  const int64_t threads = get_num_threads();
  if (threads <= 1 || units * work < kMinParallelWork) return std::max<int64_t>(units, 1);
  int64_t per = (units + threads * 4 - 1) / (threads * 4);
  per = std::max<int64_t>(per, kMinParallelWork / 4 / std::max<int64_t>(work, 1));
  return std::max<int64_t>((per + align - 1) / align * align, align);
}

// parallel_for over [0, units) in ranges of per_task() units: fn(begin, end).
template <class Fn>
void for_ranges(int64_t units, int64_t work, int64_t align, const Fn& fn) {
  if (units <= 0) return;
  const int64_t per = per_task(units, work, align);
  parallel_for((units + per - 1) / per, [&](int64_t t) { fn(t * per, std::min(units, (t + 1) * per)); });
}

inline uint64_t splitmix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The dropout multipliers of one row's columns [c0, c1): dropout_scale(p) or 0.
class DropoutRow {
 public:
  DropoutRow(const Dropout& d, int64_t in_features)
      : key_(splitmix64(d.seed)), threshold_(dropout_keep_threshold(d.p)), scale_(dropout_scale(d.p)), in_(in_features) {}
  bool active() const { return threshold_ < (1u << 24); }
  void fill(int64_t row, int64_t c0, int64_t c1, float* m) const {
    uint64_t z = key_ + static_cast<uint64_t>(row * in_ + c0 + 1) * kGolden;
    for (int64_t c = c0; c < c1; ++c, z += kGolden) {
      m[c - c0] = (splitmix64(z) >> 40) < threshold_ ? scale_ : 0.0f;
    }
  }

 private:
  static constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
  uint64_t key_;
  uint32_t threshold_;
  float scale_;
  int64_t in_;
};

void check_common(const Nf4Weight& w, int64_t batch, const LoraAdapter& lora, const Dropout& d) {
  validate_weight(w);
  QLORA_REQUIRE(batch >= 0, "batch must be >= 0, got " + std::to_string(batch));
  QLORA_REQUIRE(lora.rank >= 0, "rank must be >= 0, got " + std::to_string(lora.rank));
  QLORA_REQUIRE(lora.rank == 0 || (lora.a != nullptr && lora.b != nullptr), "rank > 0 needs lora_a and lora_b");
  QLORA_REQUIRE(d.p >= 0.0f && d.p < 1.0f, "dropout must be in [0, 1), got " + std::to_string(d.p));
  checked_mul(batch, w.in_features, "batch * in_features");
  checked_mul(batch, w.out_features, "batch * out_features");
  checked_mul(lora.rank, std::max(w.in_features, w.out_features), "rank * features");
}

// x~ = x * m of rows [0, batch), into xd.
void dropped_input(const float* x, int64_t batch, int64_t in, const Dropout& d, float* xd) {
  const DropoutRow drop(d, in);
  for_ranges(batch, in * 8, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      drop.fill(r, 0, in, xd + r * in);
      for (int64_t c = 0; c < in; ++c) xd[r * in + c] *= x[r * in + c];
    }
  });
}

}  // namespace

uint32_t dropout_keep_threshold(float p) {
  return static_cast<uint32_t>(std::llround((1.0 - static_cast<double>(p)) * 16777216.0));
}

float dropout_scale(float p) { return static_cast<float>(1.0 / (1.0 - static_cast<double>(p))); }

void dropout_mask(const Dropout& d, int64_t batch, int64_t in_features, uint8_t* mask) {
  QLORA_REQUIRE(d.p >= 0.0f && d.p < 1.0f, "dropout must be in [0, 1), got " + std::to_string(d.p));
  QLORA_REQUIRE(batch >= 0 && in_features >= 1, "dropout_mask: bad shape");
  const DropoutRow drop(d, in_features);
  std::vector<float> m(static_cast<size_t>(in_features));
  for (int64_t r = 0; r < batch; ++r) {
    drop.fill(r, 0, in_features, m.data());
    for (int64_t c = 0; c < in_features; ++c) mask[r * in_features + c] = m[static_cast<size_t>(c)] != 0.0f ? 1 : 0;
  }
}

void forward_train(const Nf4Weight& w, const float* x, int64_t batch, const LoraAdapter& lora, const float* bias,
                   const Dropout& dropout, float* y, float* u, const ForwardOptions& opts) {
  check_common(w, batch, lora, dropout);
  if (batch == 0) return;
  QLORA_REQUIRE(x != nullptr && y != nullptr, "forward_train: null x or y");
  QLORA_REQUIRE(lora.rank == 0 || u != nullptr, "forward_train: rank > 0 needs u");
  const int64_t in = w.in_features, out = w.out_features, rank = lora.rank;
  forward(w, x, batch, nullptr, 0, bias, y, opts);
  if (rank == 0) return;
  const KernelTable& k = active_kernels();
  const float* xd = x;
  std::vector<float> dropped;
  if (DropoutRow(dropout, in).active()) {
    dropped.resize(static_cast<size_t>(batch * in));
    dropped_input(x, batch, in, dropout, dropped.data());
    xd = dropped.data();
  }
  for_ranges(batch, rank * in, 1, [&](int64_t b0, int64_t b1) { k.lora_down(xd, in, lora.a, rank, b0, b1, u); });
  for_ranges(out, batch * rank, 1, [&](int64_t o0, int64_t o1) {
    k.lora_up(u, rank, lora.b, lora.scaling, nullptr, nullptr, batch, out, o0, o1, y);
  });
}

void backward(const Nf4Weight& w, const float* x, int64_t batch, const LoraAdapter& lora, const Dropout& dropout,
              const float* u, const float* g, const LoraGrads& grads) {
  check_common(w, batch, lora, dropout);
  const int64_t in = w.in_features, out = w.out_features, rank = lora.rank;
  const float s = lora.scaling;
  const bool want_da = grads.da != nullptr && rank > 0, want_db = grads.db != nullptr && rank > 0;
  if (batch == 0) {
    // Gradients of an empty batch are zero sums.
    if (want_da) std::fill(grads.da, grads.da + rank * in, 0.0f);
    if (want_db) std::fill(grads.db, grads.db + out * rank, 0.0f);
    if (grads.dbias != nullptr) std::fill(grads.dbias, grads.dbias + out, 0.0f);
    return;
  }
  QLORA_REQUIRE(g != nullptr, "backward: null grad_y");
  QLORA_REQUIRE(!want_da || x != nullptr, "backward: the A gradient needs x");
  QLORA_REQUIRE(!want_db || u != nullptr, "backward: the B gradient needs u");
  const DropoutRow drop(dropout, in);

  // G B (batch x rank), needed by the A gradient and the LoRA part of the input gradient: for
  // each row, b's rows are added in ascending o, rank-wide (b is read in its own layout).
  std::vector<float> gb;
  if (rank > 0 && (want_da || grads.dx != nullptr)) {
    gb.assign(static_cast<size_t>(batch * rank), 0.0f);
    for_ranges(batch, rank * out, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t r = b0; r < b1; ++r) {
        float* acc = gb.data() + r * rank;
        for (int64_t o = 0; o < out; ++o) {
          const float go = g[r * out + o];
          const float* bo = lora.b + o * rank;
          for (int64_t j = 0; j < rank; ++j) acc[j] += go * bo[j];
        }
      }
    });
  }

  // dB and dbias: rows of W per task, the batch summed in ascending order.
  if (want_db || grads.dbias != nullptr) {
    for_ranges(out, batch * (rank + 1), 8, [&](int64_t o0, int64_t o1) {
      std::vector<float> acc(static_cast<size_t>((o1 - o0) * rank), 0.0f), bsum(static_cast<size_t>(o1 - o0), 0.0f);
      for (int64_t r = 0; r < batch; ++r) {
        const float* gr = g + r * out;
        for (int64_t o = o0; o < o1; ++o) bsum[static_cast<size_t>(o - o0)] += gr[o];
        if (!want_db) continue;
        const float* ur = u + r * rank;
        for (int64_t o = o0; o < o1; ++o) {
          float* ao = acc.data() + (o - o0) * rank;
          const float go = gr[o];
          for (int64_t j = 0; j < rank; ++j) ao[j] += go * ur[j];
        }
      }
      if (want_db) {
        for (int64_t i = 0; i < (o1 - o0) * rank; ++i) grads.db[o0 * rank + i] = s * acc[static_cast<size_t>(i)];
      }
      if (grads.dbias != nullptr) std::copy(bsum.begin(), bsum.end(), grads.dbias + o0);
    });
  }

  // dA: columns per task, the batch summed in ascending order over the dropped-out x.
  if (want_da) {
    for_ranges(in, batch * rank, 64, [&](int64_t c0, int64_t c1) {
      const int64_t n = c1 - c0;
      std::vector<float> acc(static_cast<size_t>(rank * n), 0.0f), xr(static_cast<size_t>(n));
      for (int64_t r = 0; r < batch; ++r) {
        const float* xs = x + r * in + c0;
        if (drop.active()) {
          drop.fill(r, c0, c1, xr.data());
          for (int64_t c = 0; c < n; ++c) xr[static_cast<size_t>(c)] *= xs[c];
          xs = xr.data();
        }
        for (int64_t j = 0; j < rank; ++j) {
          const float gj = gb[static_cast<size_t>(r * rank + j)];
          float* aj = acc.data() + j * n;
          for (int64_t c = 0; c < n; ++c) aj[c] += gj * xs[c];
        }
      }
      for (int64_t j = 0; j < rank; ++j) {
        for (int64_t c = 0; c < n; ++c) grads.da[j * in + c0 + c] = s * acc[static_cast<size_t>(j * n + c)];
      }
    });
  }

  // dx: the base's input gradient, then the LoRA part added row by row.
  if (grads.dx != nullptr) {
    gemm_nf4t(w, g, batch, grads.dx);
    if (rank > 0) {
      for_ranges(batch, rank * in, 1, [&](int64_t r0, int64_t r1) {
        std::vector<float> v(static_cast<size_t>(in)), m(static_cast<size_t>(in));
        for (int64_t r = r0; r < r1; ++r) {
          const float* gr = gb.data() + r * rank;
          std::fill(v.begin(), v.end(), 0.0f);
          for (int64_t j = 0; j < rank; ++j) {
            const float* aj = lora.a + j * in;
            for (int64_t c = 0; c < in; ++c) v[static_cast<size_t>(c)] += gr[j] * aj[c];
          }
          float* dr = grads.dx + r * in;
          if (drop.active()) {
            drop.fill(r, 0, in, m.data());
            for (int64_t c = 0; c < in; ++c) dr[c] += (s * m[static_cast<size_t>(c)]) * v[static_cast<size_t>(c)];
          } else {
            for (int64_t c = 0; c < in; ++c) dr[c] += s * v[static_cast<size_t>(c)];
          }
        }
      });
    }
  }
}

}  // namespace qlora
