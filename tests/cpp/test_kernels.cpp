// Every kernel table this CPU can run, against an independent reference written here (flat
// indexing, double-precision forward) and against the scalar table: quantization and
// dequantization bit-exact, forward within the float32 rounding bound.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "test_util.h"

using namespace qlora;

namespace {

struct Quantized {
  std::vector<uint8_t> codes;
  std::vector<float> absmax;
};

// bitsandbytes' quantizer, written over the flat weight with the flat (bnb) nibble order.
void reference_quantize(const std::vector<float>& w, int64_t group_size, std::vector<uint8_t>& flat_codes,
                        std::vector<float>& absmax) {
  const int64_t n = static_cast<int64_t>(w.size());
  const int64_t groups = (n + group_size - 1) / group_size;
  absmax.assign(static_cast<size_t>(groups), 0.0f);
  flat_codes.assign(static_cast<size_t>(n), 0);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t lo = g * group_size, hi = std::min(n, lo + group_size);
    float m = 0.0f;
    for (int64_t i = lo; i < hi; ++i) m = std::max(m, std::fabs(w[i]));
    const bool partial = (hi - lo) < group_size;
    if (partial) m = std::max(m, 1e-38f);
    absmax[g] = m;
    const float mc = std::max(m, 1e-38f);
    const float inv = 1.0f / mc;
    for (int64_t i = lo; i < hi; ++i) {
      float v = partial ? w[i] / mc : w[i] * inv;
      v = std::min(1.0f, std::max(-1.0f, v));
      int best = 0;
      for (int c = 0; c < 15; ++c) {
        if (v > (kNf4Codebook[c] + kNf4Codebook[c + 1]) / 2.0f) best = c + 1;
      }
      flat_codes[i] = static_cast<uint8_t>(best);
    }
  }
}

Quantized quantize_with(const std::string& isa, const std::vector<float>& w, int64_t out, int64_t in,
                        int64_t gs) {
  set_active_isa(isa);
  Quantized q;
  q.codes.resize(static_cast<size_t>(packed_bytes(out, in)));
  q.absmax.resize(static_cast<size_t>(group_count(out * in, gs)));
  quantize_nf4(w.data(), out, in, gs, q.codes.data(), q.absmax.data());
  return q;
}

Nf4Weight view(const Quantized& q, int64_t out, int64_t in, int64_t gs) {
  return qlora_test::plain_view(q.codes, q.absmax, out, in, gs);
}

struct IsaGuard {
  std::string saved = active_kernels().name;
  ~IsaGuard() { set_active_isa(saved); }
};

}  // namespace

TEST_CASE("scalar quantization equals the flat reference; every ISA equals scalar") {
  IsaGuard guard;
  const std::vector<int64_t> group_sizes = {1, 2, 3, 7, 16, 31, 32, 33, 64, 100, 128, 256, 4096};
  for (int64_t out : {1, 3, 17}) {
    for (int64_t in : qlora_test::kOddSizes) {
      for (int64_t gs : group_sizes) {
        auto w = qlora_test::normal_vector(static_cast<size_t>(out * in), static_cast<uint32_t>(out * 1000 + in));
        if (in > 40) std::fill(w.begin(), w.begin() + std::min<int64_t>(out * in, gs), 0.0f);  // a zero group
        std::vector<uint8_t> flat;
        std::vector<float> ref_absmax;
        reference_quantize(w, gs, flat, ref_absmax);
        const Quantized s = quantize_with("scalar", w, out, in, gs);
        REQUIRE(s.absmax == ref_absmax);
        for (int64_t r = 0; r < out; ++r)
          for (int64_t c = 0; c < in; ++c)
            REQUIRE(get_code(s.codes.data() + r * packed_row_bytes(in), c) == flat[r * in + c]);
        for (const KernelTable* t : qlora_test::runnable_tables()) {
          INFO("isa " << t->name << " out " << out << " in " << in << " gs " << gs);
          const Quantized q = quantize_with(t->name, w, out, in, gs);
          REQUIRE(q.absmax == s.absmax);
          REQUIRE(q.codes == s.codes);
          std::vector<float> deq_s(static_cast<size_t>(out * in)), deq_t(deq_s.size());
          set_active_isa("scalar");
          dequantize_nf4(view(s, out, in, gs), deq_s.data());
          set_active_isa(t->name);
          dequantize_nf4(view(s, out, in, gs), deq_t.data());
          REQUIRE(deq_t == deq_s);
          for (int64_t i = 0; i < out * in; ++i) {
            const int64_t g = i / gs;
            REQUIRE(deq_s[i] == kNf4Codebook[flat[i]] * ref_absmax[g]);
          }
        }
      }
    }
  }
}

TEST_CASE("forward of every ISA is within the float32 rounding bound of a float64 reference") {
  IsaGuard guard;
  for (int64_t out : {1, 5, 33, 70}) {
    for (int64_t in : qlora_test::kOddSizes) {
      for (int64_t gs : {int64_t{7}, int64_t{32}, int64_t{64}, int64_t{100}}) {
        for (int64_t batch : {1, 2, 3, 9}) {
          const int64_t rank = std::min<int64_t>({4, out, in});
          const auto w = qlora_test::normal_vector(static_cast<size_t>(out * in), 7);
          const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), 8);
          const auto a = qlora_test::normal_vector(static_cast<size_t>(rank * in), 9, 0.1f);
          const auto b = qlora_test::normal_vector(static_cast<size_t>(out * rank), 10, 0.1f);
          const auto bias = qlora_test::normal_vector(static_cast<size_t>(out), 11);
          const float scaling = 0.75f;
          const Quantized q = quantize_with("scalar", w, out, in, gs);
          std::vector<float> deq(static_cast<size_t>(out * in));
          dequantize_nf4(view(q, out, in, gs), deq.data());
          for (const KernelTable* t : qlora_test::runnable_tables()) {
            INFO("isa " << t->name << " out " << out << " in " << in << " gs " << gs << " batch " << batch);
            set_active_isa(t->name);
            std::vector<float> y(static_cast<size_t>(batch * out), -1.0f);
            forward(view(q, out, in, gs), x.data(), batch, a.data(), b.data(), rank, scaling, bias.data(),
                    y.data());
            qlora_test::check_forward_within_bound(y, x, deq, a, b, bias.data(), scaling, batch, out, in, rank);
          }
        }
      }
    }
  }
}

TEST_CASE("every ISA quantizes codebook values and exact midpoints like scalar") {
  // Random weights almost never land on a midpoint, so the tie rule (lower code) would go
  // untested. Each row ends in -1.0, so every group's absmax is 1.0 and w * (1 / absmax) is w.
  IsaGuard guard;
  std::vector<float> row;
  std::vector<uint8_t> expected;
  for (int i = 0; i < 16; ++i) {
    row.push_back(kNf4Codebook[i]);
    expected.push_back(static_cast<uint8_t>(i));
  }
  for (int i = 0; i < 15; ++i) {
    const float mid = (kNf4Codebook[i] + kNf4Codebook[i + 1]) * 0.5f;
    row.push_back(mid);
    expected.push_back(static_cast<uint8_t>(i));
    row.push_back(std::nextafter(mid, 2.0f));
    expected.push_back(static_cast<uint8_t>(i + 1));
  }
  row.push_back(-1.0f);
  expected.push_back(0);
  const int64_t in = static_cast<int64_t>(row.size()), out = 3;
  std::vector<float> w;
  for (int64_t r = 0; r < out; ++r) w.insert(w.end(), row.begin(), row.end());
  for (const KernelTable* t : qlora_test::runnable_tables()) {
    INFO("isa " << t->name);
    const Quantized q = quantize_with(t->name, w, out, in, in);
    for (int64_t r = 0; r < out; ++r) {
      REQUIRE(q.absmax[static_cast<size_t>(r)] == 1.0f);
      for (int64_t c = 0; c < in; ++c)
        REQUIRE(get_code(q.codes.data() + r * packed_row_bytes(in), c) == expected[static_cast<size_t>(c)]);
    }
  }
}

TEST_CASE("kernels give the same bits for any row split, with plain and double-quantized scales") {
  // The drivers hand gemm_nf4_f32 and dequantize_rows ranges that depend on the thread count;
  // here the kernels are called directly over uneven splits (multiples of its row_block, as the
  // drivers guarantee) and must match one call over all rows, for batch 1 and batch > 1. The
  // shapes cover groups that start mid-block and, with in_features and group_size multiples of
  // 32, rows that start mid-group while every block stays inside one group; 576 columns span
  // several 256-column panels of the NEON GEMM.
  const int64_t rank = 3;
  auto shape = GENERATE(std::vector<int64_t>{45, 129, 50}, std::vector<int64_t>{21, 96, 64},
                        std::vector<int64_t>{13, 64, 32}, std::vector<int64_t>{9, 576, 128});
  const int64_t out = shape[0], in = shape[1], gs = shape[2];
  INFO("out " << out << " in " << in << " gs " << gs);
  const int64_t n = out * in, groups = (n + gs - 1) / gs;
  const auto w = qlora_test::normal_vector(static_cast<size_t>(n), 21);
  std::vector<uint8_t> codes(static_cast<size_t>(packed_bytes(out, in)));
  std::vector<float> absmax(static_cast<size_t>(groups));
  {
    IsaGuard guard;
    set_active_isa("scalar");
    quantize_nf4(w.data(), out, in, gs, codes.data(), absmax.data());
  }
  std::vector<uint8_t> qscales(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g) qscales[static_cast<size_t>(g)] = static_cast<uint8_t>((g * 37 + 11) % 256);
  std::vector<float> nested_map(256), nested_scales(static_cast<size_t>((groups + kNestedBlock - 1) / kNestedBlock));
  for (int i = 0; i < 256; ++i) nested_map[static_cast<size_t>(i)] = (static_cast<float>(i) - 127.0f) / 128.0f;
  for (size_t i = 0; i < nested_scales.size(); ++i) nested_scales[i] = 0.3f + 0.1f * static_cast<float>(i);

  const Nf4Weight plain = qlora_test::plain_view(codes, absmax, out, in, gs);
  Nf4Weight nested = plain;
  nested.scales = nullptr;
  nested.qscales = qscales.data();
  nested.nested_scales = nested_scales.data();
  nested.nested_map = nested_map.data();
  nested.nested_offset = 0.37f;

  const KernelTable& scalar = kernels_by_name("scalar");
  for (const Nf4Weight& wv : {plain, nested}) {
    std::vector<float> deq(static_cast<size_t>(n));
    scalar.dequantize_rows(wv, 0, out, deq.data());
    for (const KernelTable* t : qlora_test::runnable_tables()) {
      const int64_t rb = std::max<int64_t>(t->gemm_nf4_f32.row_block, 1);
      std::vector<int64_t> cuts = {0};
      for (int64_t step = 1; cuts.back() < out; ++step) cuts.push_back(std::min(out, cuts.back() + step * rb));
      INFO("isa " << t->name << (wv.scales != nullptr ? " plain" : " double-quantized") << " scales");
      std::vector<float> deq_t(static_cast<size_t>(n));
      for (size_t i = 0; i + 1 < cuts.size(); ++i)
        t->dequantize_rows(wv, cuts[i], cuts[i + 1], deq_t.data() + cuts[i] * in);
      REQUIRE(deq_t == deq);
      for (int64_t batch : {1, 3, 11}) {
        INFO("batch " << batch);
        const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), 22);
        const auto a = qlora_test::normal_vector(static_cast<size_t>(rank * in), 23, 0.1f);
        const auto b = qlora_test::normal_vector(static_cast<size_t>(out * rank), 24, 0.1f);
        const auto bias = qlora_test::normal_vector(static_cast<size_t>(out), 25);
        std::vector<float> xa(static_cast<size_t>(batch * rank));
        t->lora_down(x.data(), in, a.data(), rank, 0, batch, xa.data());
        ForwardArgs p;
        p.w = wv;
        p.x = x.data();
        p.batch = batch;
        p.xa = xa.data();
        p.lora_b = b.data();
        p.rank = rank;
        p.scaling = 0.5f;
        p.bias = bias.data();
        std::vector<float> y_whole(static_cast<size_t>(batch * out)), y_split(y_whole.size());
        p.y = y_whole.data();
        t->gemm_nf4_f32.fn(p, 0, out);
        p.y = y_split.data();
        for (size_t i = 0; i + 1 < cuts.size(); ++i) t->gemm_nf4_f32.fn(p, cuts[i], cuts[i + 1]);
        REQUIRE(y_split == y_whole);
        qlora_test::check_forward_within_bound(y_whole, x, deq, a, b, bias.data(), 0.5, batch, out, in, rank);
      }
    }
  }
}
