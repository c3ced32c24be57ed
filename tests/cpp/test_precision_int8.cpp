// The int8 precision: every ISA's own quantize_q8 and gemm_nf4_q8 against the scalar
// specification. quantize_q8 must give the same bytes, scales and sums bit for bit (special
// values included); gemm_nf4_q8 sums bit-identical per-block terms in another order, so it must
// stay within the summation bound derived below, and give the same bits for any split of the
// output rows. ISAs built in but not supported by this CPU are reported as skipped.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/kernels.h"
#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "qlora/precision.h"
#include "qlora/thread_pool.h"
#include "test_util.h"

using namespace qlora;

namespace {

// Every ISA of isa_list.h whose own table has an int8 entry: those this CPU runs, and a
// WARN naming the others, so a run on a CPU without them says what it did not test.
std::vector<const KernelTable*> int8_tables(bool want_quantize) {
  std::vector<const KernelTable*> out;
  const std::vector<const KernelTable*> all = {
#define QLORA_TABLE_OF(name, cls) kernels::name::table(),
      QLORA_ISA_LIST(QLORA_TABLE_OF)
#undef QLORA_TABLE_OF
  };
  for (const KernelTable* t : all) {
    if (t == nullptr || t->required_features == kFeatureNone) continue;
    const bool has = want_quantize ? t->quantize_q8 != nullptr : t->gemm_nf4_q8.fn != nullptr;
    if (!has) continue;
    if ((t->required_features & ~cpu_features()) != 0) {
      WARN("SKIPPED: " << t->name << " int8 kernels not tested: this CPU lacks its instructions");
      continue;
    }
    out.push_back(t);
  }
  if (out.empty()) WARN("SKIPPED: no SIMD int8 kernel runs on this CPU; only the scalar specification is used");
  return out;
}

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

struct Q8 {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
};

Q8 quantize_with(const KernelTable& t, const std::vector<float>& x, int64_t batch, int64_t in,
                 int64_t b_begin = 0, int64_t b_end = -1) {
  const int64_t cols = padded_cols(in), blocks = cols / kQ8Block;
  Q8 r;
  r.q.assign(static_cast<size_t>(batch * cols), int8_t{99});
  r.scale.assign(static_cast<size_t>(batch * blocks), -7.0f);
  r.sum.assign(static_cast<size_t>(batch * blocks), 12345);
  t.quantize_q8(x.data(), in, b_begin, b_end < 0 ? batch : b_end, r.q.data(), r.scale.data(), r.sum.data());
  return r;
}

void require_same(const Q8& a, const Q8& b) {
  REQUIRE(a.q == b.q);
  REQUIRE(a.sum == b.sum);
  REQUIRE(a.scale.size() == b.scale.size());
  for (size_t i = 0; i < a.scale.size(); ++i) {
    INFO("block " << i << ": " << a.scale[i] << " vs " << b.scale[i]);
    REQUIRE(bits_of(a.scale[i]) == bits_of(b.scale[i]));
  }
}

// A layer quantized by the scalar table, with plain and double-quantized scale views.
struct Layer {
  int64_t out = 0, in = 0, gs = 0;
  std::vector<uint8_t> codes;
  std::vector<float> absmax;
  std::vector<uint8_t> qscales;
  std::vector<float> nested_scales, nested_map;

  Nf4Weight view(bool nested) const {
    Nf4Weight v = qlora_test::plain_view(codes, absmax, out, in, gs);
    if (nested) {
      v.scales = nullptr;
      v.qscales = qscales.data();
      v.nested_scales = nested_scales.data();
      v.nested_map = nested_map.data();
      v.nested_offset = 0.37f;
    }
    return v;
  }
};

Layer make_layer(int64_t out, int64_t in, int64_t gs, uint32_t seed) {
  Layer l;
  l.out = out;
  l.in = in;
  l.gs = gs;
  const auto w = qlora_test::normal_vector(static_cast<size_t>(out * in), seed);
  l.codes.resize(static_cast<size_t>(packed_bytes(out, in)));
  l.absmax.resize(static_cast<size_t>(group_count(out * in, gs)));
  const std::string saved = active_kernels().name;
  set_active_isa("scalar");
  quantize_nf4(w.data(), out, in, gs, l.codes.data(), l.absmax.data());
  set_active_isa(saved);
  const size_t groups = l.absmax.size();
  l.qscales.resize(groups);
  for (size_t g = 0; g < groups; ++g) l.qscales[g] = static_cast<uint8_t>((g * 37 + 11) % 256);
  l.nested_scales.resize((groups + kNestedBlock - 1) / kNestedBlock);
  for (size_t i = 0; i < l.nested_scales.size(); ++i) l.nested_scales[i] = 0.3f + 0.1f * static_cast<float>(i);
  l.nested_map.resize(256);
  for (int i = 0; i < 256; ++i) l.nested_map[static_cast<size_t>(i)] = (static_cast<float>(i) - 127.0f) / 128.0f;
  return l;
}

// The bound of a SIMD gemm_nf4_q8 against the scalar one. Both compute, for each block k, the
// same float term t_k = float(isum_k) * (d_k * (scale_k * (1/127))) (isum_k is an exact int32,
// the two multiplies are the same float32 operations), and differ only in the order in which
// they add the nb terms and then the bias. Any order of recursive summation of m terms is
// within gamma_{m-1} * sum |t| of the exact sum (Higham, Accuracy and Stability, 4.2), so the
// two results are within 2 * gamma_nb * (sum_k |t_k| + |bias|) of each other.
double q8_bound(const Nf4Weight& w, const Q8& x, int64_t b, int64_t o, const float* bias) {
  const int64_t in = w.in_features, cols = padded_cols(in), blocks = cols / kQ8Block;
  const uint8_t* row = w.codes + o * packed_row_bytes(in);
  double mag = bias != nullptr ? std::fabs(double(bias[o])) : 0.0;
  for (int64_t k = 0; k < blocks; ++k) {
    int64_t isum = 0;
    for (int64_t j = 0; j < kQ8Block; ++j) {
      const int64_t c = k * kQ8Block + j;
      isum += int64_t{x.q[static_cast<size_t>(b * cols + c)]} * kNf4Int8[get_code(row, c)];
    }
    const float ws = group_scale(w, (o * in + k * kQ8Block) / w.group_size) * (1.0f / 127.0f);
    const float s = x.scale[static_cast<size_t>(b * blocks + k)] * ws;
    mag += std::fabs(double(static_cast<float>(isum) * s));
  }
  const double u = std::ldexp(1.0, -24), n = double(blocks + 1);
  return 2.0 * n * u / (1.0 - n * u) * mag;
}

// Runs t's gemm_nf4_q8 over all rows at once and over uneven splits; both must agree bit for
// bit, and with the scalar result within q8_bound.
void check_gemm(const KernelTable& t, const Nf4Weight& w, const std::vector<float>& x, int64_t batch,
                const float* bias) {
  const KernelTable& scalar = *kernels::scalar::table();
  const Q8 q = quantize_with(scalar, x, batch, w.in_features);
  ForwardArgs p;
  p.w = w;
  p.x = x.data();
  p.batch = batch;
  p.x_q8 = q.q.data();
  p.x_q8_scale = q.scale.data();
  p.x_q8_sum = q.sum.data();
  p.bias = bias;
  const size_t n = static_cast<size_t>(batch * w.out_features);
  std::vector<float> y_ref(n, -1.0f), y_whole(n, -2.0f), y_split(n, -3.0f);
  p.y = y_ref.data();
  scalar.gemm_nf4_q8.fn(p, 0, w.out_features);
  p.y = y_whole.data();
  t.gemm_nf4_q8.fn(p, 0, w.out_features);
  const int64_t rb = std::max<int64_t>(t.gemm_nf4_q8.row_block, 1);
  std::vector<int64_t> cuts = {0};
  for (int64_t step = 1; cuts.back() < w.out_features; ++step)
    cuts.push_back(std::min(w.out_features, cuts.back() + ((step * 5) % 7 + 1) * rb));
  p.y = y_split.data();
  for (size_t i = 0; i + 1 < cuts.size(); ++i) t.gemm_nf4_q8.fn(p, cuts[i], cuts[i + 1]);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t o = 0; o < w.out_features; ++o) {
      const size_t i = static_cast<size_t>(b * w.out_features + o);
      INFO("batch row " << b << " output " << o << ": " << y_whole[i] << " vs scalar " << y_ref[i]);
      REQUIRE(bits_of(y_split[i]) == bits_of(y_whole[i]));
      if (std::isnan(y_ref[i])) {
        REQUIRE(std::isnan(y_whole[i]));
        continue;
      }
      REQUIRE(std::fabs(double(y_whole[i]) - double(y_ref[i])) <= q8_bound(w, q, b, o, bias));
    }
  }
}

}  // namespace

TEST_CASE("int8: the scalar quantize_q8 follows quantize_q8_block's definition") {
  // A few hand-checked values: amax 127 makes the reciprocal exactly 1, so x is q before
  // rounding, and ties go to even.
  std::vector<float> x(32, 0.0f);
  x[0] = 127.0f;
  x[1] = 0.5f;
  x[2] = 1.5f;
  x[3] = 2.5f;
  x[4] = -0.5f;
  x[5] = -1.5f;
  x[6] = -126.5f;
  const Q8 q = quantize_with(*kernels::scalar::table(), x, 1, 32);
  REQUIRE(q.scale[0] == 1.0f);
  const std::vector<int8_t> expect = {127, 0, 2, 2, 0, -2, -126};
  for (size_t i = 0; i < expect.size(); ++i) REQUIRE(q.q[i] == expect[i]);
  REQUIRE(q.sum[0] == 127 + 2 + 2 - 2 - 126);
}

TEST_CASE("int8: every ISA's quantize_q8 equals the scalar one bit for bit") {
  const KernelTable& scalar = *kernels::scalar::table();
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const KernelTable* t : int8_tables(true)) {
    for (int64_t in : qlora_test::kOddSizes) {
      for (int64_t batch : {1, 3}) {
        INFO("isa " << t->name << " in " << in << " batch " << batch);
        auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), static_cast<uint32_t>(in * 7 + batch), 3.0f);
        // Special blocks in the first row when it has room: zeros, a NaN, an infinity, values
        // so small that 127 / amax overflows, subnormals, ties at amax 127.
        const int64_t blocks = (in + 31) / 32;
        for (int64_t k = 0; k < blocks; ++k) {
          const int64_t c0 = k * 32, c1 = std::min(in, c0 + 32);
          for (int64_t c = c0; c < c1; ++c) {
            float& v = x[static_cast<size_t>(c)];
            switch (k % 8) {
              case 1: v = 0.0f; break;
              case 2: if (c == c0 + (c1 - c0) / 2) v = nan; break;
              case 3: if (c == c1 - 1) v = -inf; break;
              case 4: v = v * 1e-38f; break;
              case 5: v = v * 1e-44f; break;
              case 6: v = (c == c0) ? 127.0f : static_cast<float>(c - c0) - 0.5f * static_cast<float>((c - c0) % 3 == 0); break;
              case 7: if (c == c0) v = -inf; else if (c == c0 + 1 && c1 - c0 > 1) v = inf; break;
              default: break;
            }
          }
        }
        const Q8 ref = quantize_with(scalar, x, batch, in);
        require_same(quantize_with(*t, x, batch, in), ref);
        if (batch > 1) {
          // A range of rows leaves the others untouched, as the driver's split relies on.
          Q8 part = quantize_with(*t, x, batch, in, 1, 2);
          const Q8 part_ref = quantize_with(scalar, x, batch, in, 1, 2);
          require_same(part, part_ref);
        }
      }
    }
  }
}

TEST_CASE("int8: every ISA's gemm_nf4_q8 is within the summation bound of scalar, for any row split") {
  // Batches reach every path: 1, the batched register path, and the panel path (from 16 rows on
  // YMM, 24 on AVX-512). in_features is a multiple of 32 whenever q8_layout_ok holds; the block
  // counts sweep the odd sizes. Group sizes: whole blocks (32, 64, 128), 96 (3 blocks:
  // superblocks start mid-group) and 160 with in_features not a multiple of it (groups
  // straddle rows).
  const auto tables = int8_tables(false);
  for (const KernelTable* t : tables) {
    for (int64_t nblocks : {1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33}) {
      const int64_t in = nblocks * 32;
      for (int64_t gs : {int64_t{32}, int64_t{64}, int64_t{96}, int64_t{128}, int64_t{160}}) {
        for (int64_t out : {1, 5, 7, 18}) {
          const Layer l = make_layer(out, in, gs, static_cast<uint32_t>(in + gs + out));
          for (bool nested : {false, true}) {
            const Nf4Weight w = l.view(nested);
            REQUIRE(q8_layout_ok(w));
            const auto bias = qlora_test::normal_vector(static_cast<size_t>(out), 3);
            for (int64_t batch : {1, 2, 3, 4, 5, 8, 9, 17, 25}) {
              INFO("isa " << t->name << " out " << out << " in " << in << " gs " << gs << " nested " << nested
                          << " batch " << batch);
              const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), static_cast<uint32_t>(batch + in));
              check_gemm(*t, w, x, batch, (batch + out) % 2 == 0 ? bias.data() : nullptr);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("int8: larger shapes, batch tiles and groups, NaN and infinity in x") {
  for (const KernelTable* t : int8_tables(false)) {
    const Layer l = make_layer(67, 1056, 64, 5);
    const auto bias = qlora_test::normal_vector(67, 6);
    for (int64_t batch : {1, 7, 16, 33, 40}) {
      INFO("isa " << t->name << " batch " << batch);
      auto x = qlora_test::normal_vector(static_cast<size_t>(batch * 1056), static_cast<uint32_t>(batch), 2.0f);
      if (batch > 1) {
        x[1056 + 40] = std::numeric_limits<float>::quiet_NaN();
        x[1056 * (batch - 1) + 1000] = std::numeric_limits<float>::infinity();
      }
      check_gemm(*t, l.view(false), x, batch, bias.data());
      check_gemm(*t, l.view(true), x, batch, nullptr);
    }
  }
}

TEST_CASE("int8: a non-finite weight scale stays in its own row") {
  // The batch-1 kernel loads a whole vector of scales where it fits, so a row's load also reads
  // the next rows' scales (and, double-quantized, stale scratch); only its own may count. Row 2
  // gets NaN scales (plain: absmax; double-quantized: a NaN entry of the nested map): rows 0, 1
  // and 3.. must stay finite and within the bound, row 2 NaN as in the specification.
  for (const KernelTable* t : int8_tables(false)) {
    for (const auto& [out, in, gs] : {std::tuple<int64_t, int64_t, int64_t>{18, 256, 64}, {18, 1024, 128},
                                      {9, 96, 32}, {18, 1056, 96}, {11, 4096, 64}}) {
      Layer l = make_layer(out, in, gs, static_cast<uint32_t>(out + in + gs));
      for (auto& q : l.qscales) q = q == 255 ? uint8_t{0} : q;
      l.nested_map[255] = std::numeric_limits<float>::quiet_NaN();
      for (int64_t g = 2 * in / gs; g < 3 * in / gs; ++g) {
        l.absmax[static_cast<size_t>(g)] = std::numeric_limits<float>::quiet_NaN();
        l.qscales[static_cast<size_t>(g)] = 255;
      }
      const auto bias = qlora_test::normal_vector(static_cast<size_t>(out), 8);
      for (int64_t batch : {1, 2, 5}) {
        const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), static_cast<uint32_t>(batch));
        for (bool nested : {false, true}) {
          INFO("isa " << t->name << " out " << out << " in " << in << " gs " << gs << " nested " << nested
                      << " batch " << batch);
          std::vector<float> y(static_cast<size_t>(batch * out));
          check_gemm(*t, l.view(nested), x, batch, bias.data());
          ForwardOptions opts;
          opts.precision = Precision::kInt8;
          opts.table = t;
          forward(l.view(nested), x.data(), batch, nullptr, 0, bias.data(), y.data(), opts);
          for (int64_t b = 0; b < batch; ++b) {
            for (int64_t o = 0; o < out; ++o) {
              INFO("batch row " << b << " output " << o);
              REQUIRE(std::isnan(y[static_cast<size_t>(b * out + o)]) == (o == 2));
            }
          }
        }
      }
    }
  }
}

TEST_CASE("int8: forward through the driver, every batch regime, any thread count") {
  // Batches 255-300 cross the 256-row chunk. The result must not depend on the thread count,
  // and on a CPU with a SIMD int8 kernel it must be that kernel that ran.
  const Layer l = make_layer(130, 512, 64, 9);
  const Nf4Weight w = l.view(false);
  const auto bias = qlora_test::normal_vector(130, 10);
  const std::string saved = active_kernels().name;
  const int saved_threads = get_num_threads();
  for (int64_t batch : {1, 2, 6, 8, 9, 32, 255, 256, 257, 300}) {
    const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * 512), static_cast<uint32_t>(batch + 40));
    ForwardOptions opts;
    opts.precision = Precision::kInt8;
    std::vector<float> y1(static_cast<size_t>(batch * 130)), y2(y1.size()), y_scalar(y1.size());
    set_num_threads(1);
    const GemmChoice c = forward(w, x.data(), batch, nullptr, 0, bias.data(), y1.data(), opts);
    set_num_threads(2);
    forward(w, x.data(), batch, nullptr, 0, bias.data(), y2.data(), opts);
    set_num_threads(saved_threads);
    INFO("batch " << batch << " kernel " << c.isa);
    REQUIRE(y1 == y2);
    const bool simd = std::string(c.isa) != "scalar" && c.precision == Precision::kInt8;
    if (!int8_tables(false).empty()) REQUIRE(simd);
    // Against the scalar int8 kernel called the same way.
    opts.table = kernels::scalar::table();
    forward(w, x.data(), batch, nullptr, 0, bias.data(), y_scalar.data(), opts);
    const Q8 q = quantize_with(*kernels::scalar::table(), x, batch, 512);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t o = 0; o < 130; ++o) {
        const size_t i = static_cast<size_t>(b * 130 + o);
        REQUIRE(std::fabs(double(y1[i]) - double(y_scalar[i])) <= q8_bound(w, q, b, o, bias.data()));
      }
    }
  }
  set_active_isa(saved);
}

TEST_CASE("int8: layers failing q8_layout_ok run in fp32 and equal the fp32 forward exactly") {
  for (const auto& shape : {std::vector<int64_t>{9, 100, 50}, std::vector<int64_t>{9, 96, 17},
                            std::vector<int64_t>{9, 100, 32}}) {
    const Layer l = make_layer(shape[0], shape[1], shape[2], 11);
    const Nf4Weight w = l.view(false);
    REQUIRE_FALSE(q8_layout_ok(w));
    for (int64_t batch : {1, 5}) {
      const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * shape[1]), 12);
      std::vector<float> y8(static_cast<size_t>(batch * shape[0])), y32(y8.size());
      ForwardOptions opts;
      opts.precision = Precision::kInt8;
      const GemmChoice c = forward(w, x.data(), batch, nullptr, 0, nullptr, y8.data(), opts);
      REQUIRE(c.precision == Precision::kFp32);
      forward(w, x.data(), batch, nullptr, 0, nullptr, y32.data(), ForwardOptions{});
      REQUIRE(y8 == y32);
    }
  }
}

#if defined(__aarch64__)
TEST_CASE("int8: an aarch64 CPU with the dot product runs int8 on neon_dot") {
  // Under qemu-aarch64 the default (max) CPU has dotprod; the run prints what it saw.
  const Layer l = make_layer(4, 64, 64, 13);
  const bool dot = (cpu_features() & kFeatureNeonDot) != 0;
  const GemmChoice c = choose_gemm(Precision::kInt8, 1, l.view(false));
  WARN("aarch64: dotprod " << (dot ? "present" : "absent") << ", active ISA " << active_kernels().name
                           << ", int8 kernel from " << c.isa);
  if (!dot) {
    WARN("SKIPPED: neon_dot not tested: this CPU lacks the dot-product extension");
    return;
  }
  REQUIRE(std::string(c.isa) == "neon_dot");
  REQUIRE(c.precision == Precision::kInt8);
}
#endif
