// Drivers of the core operations: argument checks, one kernel-table lookup per call, and the
// split of work into tasks for the thread pool. The split never changes what an element's
// arithmetic is (see kernels.h), so results do not depend on the thread count.
#include "qlora/ops.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/thread_pool.h"

// Formats the message only on failure: these checks run on every forward, and building their
// strings eagerly (std::to_string and concatenations, dozens of allocations) was a large part
// of the fixed cost of a small forward call.
#define QLORA_REQUIRE(ok, msg)                   \
  do {                                           \
    if (!(ok)) throw std::invalid_argument(msg); \
  } while (0)

namespace qlora {
namespace {

// Below this many multiply-adds a call runs on the calling thread: waking workers costs more.
constexpr int64_t kMinParallelWork = int64_t{1} << 17;

// Tasks for `units` independent units of `work_per_unit` each, aligned to `align` units.
int64_t chunk_units(int64_t units, int64_t work_per_unit, int64_t align) {
  const int64_t threads = get_num_threads();
  if (threads <= 1 || units * work_per_unit < kMinParallelWork) return units;
  // A few tasks per thread so a thread slowed by a noisy neighbour does not hold up the call.
  const int64_t tasks = threads * 4;
  int64_t per = (units + tasks - 1) / tasks;
  per = std::max<int64_t>(per, (kMinParallelWork / 4) / std::max<int64_t>(work_per_unit, 1));
  per = (per + align - 1) / align * align;
  return std::max<int64_t>(per, align);
}

}  // namespace

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) {
    throw std::invalid_argument(std::string(what) + " overflows: " + std::to_string(a) + " * " +
                                std::to_string(b));
  }
  return r;
}

int64_t group_count(int64_t n_total, int64_t group_size) {
  QLORA_REQUIRE(group_size >= 1, "group_size must be >= 1, got " + std::to_string(group_size));
  QLORA_REQUIRE(n_total >= 1, "the weight must have at least one element");
  return (n_total - 1) / group_size + 1;
}

int64_t packed_bytes(int64_t out_features, int64_t in_features) {
  QLORA_REQUIRE(out_features >= 1 && in_features >= 1,
                "out_features and in_features must be >= 1, got (" + std::to_string(out_features) +
                    ", " + std::to_string(in_features) + ")");
  return checked_mul(out_features, packed_row_bytes(in_features), "packed code size");
}

void validate_weight(const Nf4Weight& w) {
  const int64_t n = checked_mul(w.out_features, w.in_features, "out_features * in_features");
  packed_bytes(w.out_features, w.in_features);
  QLORA_REQUIRE(w.num_groups == group_count(n, w.group_size),
                "num_groups must be ceil(" + std::to_string(n) + " / " +
                    std::to_string(w.group_size) +
                    ") = " + std::to_string(group_count(n, w.group_size)) + ", got " +
                    std::to_string(w.num_groups));
  QLORA_REQUIRE(w.codes != nullptr, "codes must not be null");
  const bool plain = w.scales != nullptr;
  const bool nested = w.qscales != nullptr && w.nested_scales != nullptr && w.nested_map != nullptr;
  QLORA_REQUIRE(plain != nested,
                "exactly one of scales or the double-quantized scales must be given");
}

void quantize_nf4(const float* w, int64_t out_features, int64_t in_features, int64_t group_size,
                  uint8_t* codes, float* absmax) {
  QLORA_REQUIRE(w != nullptr && codes != nullptr && absmax != nullptr, "quantize_nf4: null buffer");
  const int64_t n = checked_mul(out_features, in_features, "out_features * in_features");
  packed_bytes(out_features, in_features);
  const int64_t groups = group_count(n, group_size);
  const KernelTable& k = active_kernels();

  const int64_t gper = chunk_units(groups, group_size, 1);
  parallel_for((groups + gper - 1) / gper, [&](int64_t t) {
    const int64_t g0 = t * gper, g1 = std::min(groups, g0 + gper);
    k.group_absmax(w, n, group_size, g0, g1, absmax + g0);
  });
  if (n % group_size != 0) absmax[groups - 1] = std::max(absmax[groups - 1], kMinAbsmax);
  const int64_t rper = chunk_units(out_features, in_features, 1);
  parallel_for((out_features + rper - 1) / rper, [&](int64_t t) {
    const int64_t r0 = t * rper, r1 = std::min(out_features, r0 + rper);
    k.quantize_rows(w, in_features, n, group_size, absmax, r0, r1, codes);
  });
}

void dequantize_nf4(const Nf4Weight& w, float* out) {
  validate_weight(w);
  QLORA_REQUIRE(out != nullptr, "dequantize_nf4: null output");
  const KernelTable& k = active_kernels();
  const int64_t rper = chunk_units(w.out_features, w.in_features, 1);
  parallel_for((w.out_features + rper - 1) / rper, [&](int64_t t) {
    const int64_t r0 = t * rper, r1 = std::min(w.out_features, r0 + rper);
    k.dequantize_rows(w, r0, r1, out + r0 * w.in_features);
  });
}

void forward(const Nf4Weight& w, const float* x, int64_t batch, const float* a, const float* b,
             int64_t rank, float scaling, const float* bias, float* y) {
  validate_weight(w);
  QLORA_REQUIRE(batch >= 0, "batch must be >= 0, got " + std::to_string(batch));
  QLORA_REQUIRE(rank >= 0, "rank must be >= 0, got " + std::to_string(rank));
  if (batch == 0) return;
  QLORA_REQUIRE(x != nullptr && y != nullptr, "forward: null x or y");
  QLORA_REQUIRE(rank == 0 || (a != nullptr && b != nullptr), "forward: rank > 0 needs A and B");
  checked_mul(batch, w.in_features, "batch * in_features");
  checked_mul(batch, w.out_features, "batch * out_features");
  const KernelTable& k = active_kernels();

  std::vector<float> xa;
  if (rank > 0) {
    xa.resize(static_cast<size_t>(checked_mul(batch, rank, "batch * rank")));
    const int64_t work = checked_mul(rank, w.in_features, "rank * in_features");
    const int64_t bper = chunk_units(batch, work, 1);
    parallel_for((batch + bper - 1) / bper, [&](int64_t t) {
      const int64_t b0 = t * bper, b1 = std::min(batch, b0 + bper);
      k.lora_down(x, w.in_features, a, rank, b0, b1, xa.data());
    });
  }

  const int64_t chunks = (batch + kBatchChunk - 1) / kBatchChunk;
  const int64_t work_per_row = std::min(batch, kBatchChunk) * w.in_features;
  const int64_t rper = chunk_units(w.out_features, work_per_row, std::max<int64_t>(k.row_block, 1));
  const int64_t row_tasks = (w.out_features + rper - 1) / rper;
  parallel_for(row_tasks * chunks, [&](int64_t t) {
    const int64_t c = t / row_tasks, rt = t % row_tasks;
    const int64_t b0 = c * kBatchChunk;
    ForwardArgs p;
    p.w = w;
    p.x = x + b0 * w.in_features;
    p.batch = std::min(kBatchChunk, batch - b0);
    p.xa = rank > 0 ? xa.data() + b0 * rank : nullptr;
    p.lora_b = b;
    p.rank = rank;
    p.scaling = scaling;
    p.bias = bias;
    p.y = y + b0 * w.out_features;
    const int64_t r0 = rt * rper, r1 = std::min(w.out_features, r0 + rper);
    k.forward_rows(p, r0, r1);
  });
}

void codes_from_bnb(const uint8_t* flat, int64_t out_features, int64_t in_features, uint8_t* codes) {
  const int64_t row_bytes = packed_row_bytes(in_features);
  std::fill(codes, codes + packed_bytes(out_features, in_features),
            static_cast<uint8_t>(kNf4ZeroCode | (kNf4ZeroCode << 4)));
  for (int64_t r = 0; r < out_features; ++r) {
    uint8_t* dst = codes + r * row_bytes;
    for (int64_t c = 0; c < in_features; ++c) {
      const int64_t i = r * in_features + c;
      const uint8_t code = static_cast<uint8_t>((i % 2 == 0) ? (flat[i / 2] >> 4) : (flat[i / 2] & 0x0f));
      uint8_t& byte = dst[code_byte(c)];
      const int shift = code_shift(c);
      byte = static_cast<uint8_t>((byte & ~(0x0f << shift)) | (code << shift));
    }
  }
}

void codes_to_bnb(const uint8_t* codes, int64_t out_features, int64_t in_features, uint8_t* flat) {
  const int64_t n = checked_mul(out_features, in_features, "out_features * in_features");
  const int64_t row_bytes = packed_row_bytes(in_features);
  std::fill(flat, flat + (n + 1) / 2, static_cast<uint8_t>(kNf4ZeroCode));  // odd tail: low nibble 7
  for (int64_t r = 0; r < out_features; ++r) {
    const uint8_t* src = codes + r * row_bytes;
    for (int64_t c = 0; c < in_features; ++c) {
      const int64_t i = r * in_features + c;
      const uint8_t code = get_code(src, c);
      uint8_t& byte = flat[i / 2];
      byte = (i % 2 == 0) ? static_cast<uint8_t>((byte & 0x0f) | (code << 4))
                          : static_cast<uint8_t>((byte & 0xf0) | code);
    }
  }
}

}  // namespace qlora
