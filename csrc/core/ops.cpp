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

namespace {

// Rows [lo, hi) of a segment's list that fall in batch rows [b0, b1).
std::pair<int64_t, int64_t> rows_in(const LoraSegment& s, int64_t b0, int64_t b1) {
  if (s.rows == nullptr) return {b0, b1};
  const int64_t* end = s.rows + s.n_rows;
  return {std::lower_bound(s.rows, end, b0) - s.rows, std::lower_bound(s.rows, end, b1) - s.rows};
}

void check_segment(const LoraSegment& s, int64_t batch, int64_t i) {
  const std::string which = "LoRA segment " + std::to_string(i);
  QLORA_REQUIRE(s.rank >= 0, which + ": rank must be >= 0, got " + std::to_string(s.rank));
  if (s.rank == 0) return;
  QLORA_REQUIRE(s.a != nullptr && s.b != nullptr, which + ": rank > 0 needs A and B");
  if (s.rows == nullptr) return;
  QLORA_REQUIRE(s.n_rows >= 0 && s.n_rows <= batch,
                which + ": n_rows must be in [0, " + std::to_string(batch) + "], got " +
                    std::to_string(s.n_rows));
  for (int64_t j = 0; j < s.n_rows; ++j) {
    QLORA_REQUIRE(s.rows[j] >= 0 && s.rows[j] < batch && (j == 0 || s.rows[j] > s.rows[j - 1]),
                  which + ": rows must be strictly ascending in [0, " + std::to_string(batch) +
                      "), got " + std::to_string(s.rows[j]) + " at position " + std::to_string(j));
  }
}

}  // namespace

GemmChoice forward(const Nf4Weight& w, const float* x, int64_t batch, const LoraSegment* loras,
                   int64_t n_loras, const float* bias, float* y, const ForwardOptions& opts) {
  validate_weight(w);
  QLORA_REQUIRE(batch >= 0, "batch must be >= 0, got " + std::to_string(batch));
  QLORA_REQUIRE(n_loras >= 0 && (n_loras == 0 || loras != nullptr), "forward: bad LoRA segments");
  for (int64_t i = 0; i < n_loras; ++i) check_segment(loras[i], batch, i);
  const int64_t first_chunk = std::min(batch, kBatchChunk);
  if (batch == 0) return choose_gemm(opts.precision, 1, w, opts.table);
  QLORA_REQUIRE(x != nullptr && y != nullptr, "forward: null x or y");
  checked_mul(batch, w.in_features, "batch * in_features");
  checked_mul(batch, w.out_features, "batch * out_features");
  const int64_t cols = padded_cols(w.in_features);
  checked_mul(batch, cols, "batch * padded in_features");
  const KernelTable& k = active_kernels();

  // The down projection u = x_r @ A^T of every segment on the rows it covers, all segments in
  // one parallel loop of jobs cut to about equal work. Listed rows are read in place, each run of
  // consecutive rows one kernel call, never gathered: lora_down's sum for a row does not depend
  // on the rows beside it. u and the jobs live in per-calling-thread buffers (workers see them
  // through the pointers taken here), so a forward allocates nothing for them once warm.
  struct DownJob {
    int64_t seg, j0, j1;
  };
  thread_local std::vector<float> u_keep;
  thread_local std::vector<int64_t> u_at_keep;
  thread_local std::vector<DownJob> jobs_keep;
  std::vector<float> u_big;
  u_at_keep.assign(static_cast<size_t>(n_loras), 0);
  int64_t u_total = 0, down_work = 0;
  for (int64_t i = 0; i < n_loras; ++i) {
    const LoraSegment& s = loras[i];
    const int64_t n = s.rows == nullptr ? batch : s.n_rows;
    if (s.rank == 0 || n == 0) continue;
    u_at_keep[static_cast<size_t>(i)] = u_total;
    u_total += checked_mul(n, s.rank, "rows * rank");
    down_work += checked_mul(n, checked_mul(s.rank, w.in_features, "rank * in_features"), "LoRA work");
  }
  // Buffers kept between calls stay small; a huge batch gets its own for this call only.
  constexpr int64_t kKeepFloats = int64_t{1} << 18;
  float* u = nullptr;
  if (u_total <= kKeepFloats) {
    if (u_keep.size() < static_cast<size_t>(u_total)) u_keep.resize(static_cast<size_t>(u_total));
    u = u_keep.data();
  } else {
    u_big.resize(static_cast<size_t>(u_total));
    u = u_big.data();
  }
  const int64_t* u_at = u_at_keep.data();
  jobs_keep.clear();
  if (down_work > 0) {
    const int64_t threads = get_num_threads();
    const int64_t grain = (threads <= 1 || down_work < kMinParallelWork)
                              ? down_work
                              : std::max((down_work + threads * 4 - 1) / (threads * 4), kMinParallelWork / 4);
    for (int64_t i = 0; i < n_loras; ++i) {
      const LoraSegment& s = loras[i];
      const int64_t n = s.rows == nullptr ? batch : s.n_rows;
      if (s.rank == 0 || n == 0) continue;
      const int64_t per = std::max<int64_t>(1, grain / (s.rank * w.in_features));
      for (int64_t j0 = 0; j0 < n; j0 += per) jobs_keep.push_back({i, j0, std::min(n, j0 + per)});
    }
  }
  const DownJob* jobs = jobs_keep.data();
  parallel_for(static_cast<int64_t>(jobs_keep.size()), [&](int64_t t) {
    const DownJob& job = jobs[t];
    const LoraSegment& s = loras[job.seg];
    float* us = u + u_at[job.seg];
    if (s.rows == nullptr) {
      k.lora_down(x, w.in_features, s.a, s.rank, job.j0, job.j1, us);
      return;
    }
    for (int64_t j = job.j0; j < job.j1;) {
      int64_t e = j + 1;
      while (e < job.j1 && s.rows[e] == s.rows[e - 1] + 1) ++e;
      k.lora_down(x + s.rows[j] * w.in_features, w.in_features, s.a, s.rank, 0, e - j, us + j * s.rank);
      j = e;
    }
  });

  // The product kernel of each batch chunk, then the activations in the forms they need.
  const int64_t chunks = (batch + kBatchChunk - 1) / kBatchChunk;
  std::vector<GemmChoice> choice(static_cast<size_t>(chunks));
  bool need_bf16 = false, need_q8 = false;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t nb = std::min(kBatchChunk, batch - c * kBatchChunk);
    choice[static_cast<size_t>(c)] = choose_gemm(opts.precision, nb, w, opts.table);
    need_bf16 = need_bf16 || choice[static_cast<size_t>(c)].precision == Precision::kBf16;
    need_q8 = need_q8 || choice[static_cast<size_t>(c)].precision == Precision::kInt8;
  }
  std::vector<uint16_t> x_bf16;
  std::vector<int8_t> x_q8;
  std::vector<float> x_q8_scale;
  std::vector<int32_t> x_q8_sum;
  const int64_t blocks = cols / kQ8Block;
  const int64_t xper = chunk_units(batch, cols, 1);
  if (need_bf16) {
    x_bf16.resize(static_cast<size_t>(batch * cols));
    parallel_for((batch + xper - 1) / xper, [&](int64_t t) {
      const int64_t b0 = t * xper, b1 = std::min(batch, b0 + xper);
      k.pack_bf16(x, w.in_features, b0, b1, x_bf16.data());
    });
  }
  if (need_q8) {
    x_q8.resize(static_cast<size_t>(batch * cols));
    x_q8_scale.resize(static_cast<size_t>(batch * blocks));
    x_q8_sum.resize(static_cast<size_t>(batch * blocks));
    parallel_for((batch + xper - 1) / xper, [&](int64_t t) {
      const int64_t b0 = t * xper, b1 = std::min(batch, b0 + xper);
      k.quantize_q8(x, w.in_features, b0, b1, x_q8.data(), x_q8_scale.data(), x_q8_sum.data());
    });
  }

  // Tasks: (chunk, output-row range), each range a multiple of its kernel's row_block.
  struct Task {
    int64_t chunk, r0, r1;
  };
  std::vector<Task> tasks;
  const int64_t work_per_row = first_chunk * w.in_features;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t rb = std::max<int64_t>(choice[static_cast<size_t>(c)].kernel.row_block, 1);
    const int64_t rper = chunk_units(w.out_features, work_per_row, rb);
    for (int64_t r0 = 0; r0 < w.out_features; r0 += rper) {
      tasks.push_back({c, r0, std::min(w.out_features, r0 + rper)});
    }
  }
  parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
    const Task& task = tasks[static_cast<size_t>(t)];
    const int64_t b0 = task.chunk * kBatchChunk;
    const int64_t nb = std::min(kBatchChunk, batch - b0);
    ForwardArgs p;
    p.w = w;
    p.x = x + b0 * w.in_features;
    p.batch = nb;
    if (!x_bf16.empty()) p.x_bf16 = x_bf16.data() + b0 * cols;
    if (!x_q8.empty()) {
      p.x_q8 = x_q8.data() + b0 * cols;
      p.x_q8_scale = x_q8_scale.data() + b0 * blocks;
      p.x_q8_sum = x_q8_sum.data() + b0 * blocks;
    }
    p.bias = bias;
    p.y = y + b0 * w.out_features;
    choice[static_cast<size_t>(task.chunk)].kernel.fn(p, task.r0, task.r1);
    // The LoRA terms of this chunk's rows, for the same output rows, while y is in cache.
    for (int64_t i = 0; i < n_loras; ++i) {
      const LoraSegment& s = loras[i];
      if (s.rank == 0) continue;
      const auto [lo, hi] = rows_in(s, b0, b0 + nb);
      if (hi <= lo) continue;
      k.lora_up(u + u_at[i] + lo * s.rank, s.rank, s.b, s.scaling,
                s.row_scale != nullptr ? s.row_scale + lo : nullptr,
                s.rows != nullptr ? s.rows + lo : nullptr, hi - lo, w.out_features, task.r0,
                task.r1, s.rows != nullptr ? y : y + lo * w.out_features);
    }
  });
  return choice.front();
}

void forward(const Nf4Weight& w, const float* x, int64_t batch, const float* a, const float* b,
             int64_t rank, float scaling, const float* bias, float* y) {
  LoraSegment s;
  s.a = a;
  s.b = b;
  s.rank = rank;
  s.scaling = scaling;
  forward(w, x, batch, &s, rank > 0 ? 1 : 0, bias, y);
}

void gemm_nf4t(const Nf4Weight& w, const float* g, int64_t batch, float* dx) {
  validate_weight(w);
  QLORA_REQUIRE(batch >= 0, "batch must be >= 0, got " + std::to_string(batch));
  if (batch == 0) return;
  QLORA_REQUIRE(g != nullptr && dx != nullptr, "gemm_nf4t: null g or dx");
  checked_mul(batch, w.in_features, "batch * in_features");
  checked_mul(batch, w.out_features, "batch * out_features");
  const KernelTable& k = active_kernels();
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t cb = std::max<int64_t>(k.col_block, 1);
  const int64_t blocks = batch == 1 ? (out + kGemmTRowBlock - 1) / kGemmTRowBlock : 1;
  if (blocks > 1) {
    // Batch 1: tasks are (row block, column range). A task streams its block of W row after row
    // as the forward does, instead of a 128-byte strip of every row of W (rows 2 KiB or more
    // apart, a pattern the prefetchers follow badly once W is past the caches). Columns are
    // split only as far as needed to give every thread work; that split never changes a
    // partial's arithmetic. The partials live in the calling thread's buffer, reached by pointer
    // from the tasks (a thread_local named inside them would be each worker's own).
    thread_local std::vector<float> partial_buf;
    partial_buf.resize(static_cast<size_t>(checked_mul(blocks, in, "row blocks * in_features")));
    float* partial = partial_buf.data();
    const int64_t threads = get_num_threads();
    const bool parallel = threads > 1 && out * in >= kMinParallelWork;
    const int64_t col_tasks = parallel ? std::max<int64_t>(1, (2 * threads + blocks - 1) / blocks) : 1;
    const int64_t cper = std::max(cb, ((in + col_tasks - 1) / col_tasks + cb - 1) / cb * cb);
    const int64_t ctasks = (in + cper - 1) / cper;
    auto run = [&](int64_t t) {
      const int64_t blk = t / ctasks, c0 = (t % ctasks) * cper, c1 = std::min(in, c0 + cper);
      TransposedArgs p;
      p.w = w;
      p.g = g;
      p.batch = 1;
      p.row_begin = blk * kGemmTRowBlock;
      p.row_end = std::min(out, p.row_begin + kGemmTRowBlock);
      p.dx = partial + blk * in;
      k.gemm_nf4t_f32(p, c0, c1);
    };
    if (parallel) {
      parallel_for(blocks * ctasks, run);
    } else {
      for (int64_t t = 0; t < blocks * ctasks; ++t) run(t);
    }
    const float* part = partial;
    const int64_t rper = chunk_units(in, blocks, 16);
    parallel_for((in + rper - 1) / rper, [&](int64_t t) {
      const int64_t c0 = t * rper, c1 = std::min(in, c0 + rper);
      for (int64_t c = c0; c < c1; ++c) dx[c] = part[c];
      for (int64_t blk = 1; blk < blocks; ++blk) {
        const float* src = part + blk * in;
        for (int64_t c = c0; c < c1; ++c) dx[c] += src[c];
      }
    });
    return;
  }
  const int64_t chunks = (batch + kBatchChunk - 1) / kBatchChunk;
  const int64_t work_per_col = std::min(batch, kBatchChunk) * out;
  const int64_t cper = chunk_units(in, work_per_col, cb);
  const int64_t col_tasks = (in + cper - 1) / cper;
  parallel_for(col_tasks * chunks, [&](int64_t t) {
    const int64_t c = t / col_tasks, ct = t % col_tasks;
    const int64_t b0 = c * kBatchChunk;
    TransposedArgs p;
    p.w = w;
    p.g = g + b0 * out;
    p.batch = std::min(kBatchChunk, batch - b0);
    p.row_begin = 0;
    p.row_end = out;
    p.dx = dx + b0 * in;
    const int64_t c0 = ct * cper, c1 = std::min(in, c0 + cper);
    k.gemm_nf4t_f32(p, c0, c1);
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
