// The forward paths the odd-size sweep of test_kernels.cpp does not reach: batch 1 with groups
// aligned to 32-column blocks (decoded in registers), the batched path over several K-chunks and
// with batch tails of the register tile, the batched path with aligned groups (its panel is
// decoded by transposing codes), groups that are a multiple of 32 while in_features is not, and
// double-quantized scales through dequantize and forward. Every runnable ISA, against a float64
// reference built from the scalar dequantization.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "qlora/thread_pool.h"
#include "test_util.h"

using namespace qlora;

namespace {

struct Layer {
  int64_t out, in, gs;
  std::vector<uint8_t> codes;
  std::vector<float> absmax;
  // double-quantized scales
  std::vector<uint8_t> qscales;
  std::vector<float> nested_scales, nested_map;
  float offset = 0.0f;

  Nf4Weight view(bool nested) const {
    Nf4Weight v;
    v.codes = codes.data();
    v.out_features = out;
    v.in_features = in;
    v.group_size = gs;
    v.num_groups = static_cast<int64_t>(absmax.size());
    if (nested) {
      v.qscales = qscales.data();
      v.nested_scales = nested_scales.data();
      v.nested_map = nested_map.data();
      v.nested_offset = offset;
    } else {
      v.scales = absmax.data();
    }
    return v;
  }
};

Layer make_layer(int64_t out, int64_t in, int64_t gs) {
  Layer l{out, in, gs, {}, {}, {}, {}, {}, 0.0f};
  const auto w = qlora_test::normal_vector(static_cast<size_t>(out * in), static_cast<uint32_t>(out + in + gs));
  l.codes.resize(static_cast<size_t>(packed_bytes(out, in)));
  l.absmax.resize(static_cast<size_t>(group_count(out * in, gs)));
  set_active_isa("scalar");
  quantize_nf4(w.data(), out, in, gs, l.codes.data(), l.absmax.data());
  // Any 8-bit codes over any map serve to exercise the nested arithmetic.
  const size_t groups = l.absmax.size();
  l.qscales.resize(groups);
  for (size_t g = 0; g < groups; ++g) l.qscales[g] = static_cast<uint8_t>((g * 37 + 11) % 256);
  l.nested_scales = qlora_test::normal_vector((groups + kNestedBlock - 1) / kNestedBlock, 5, 0.5f);
  l.nested_map.resize(256);
  for (int i = 0; i < 256; ++i) l.nested_map[i] = -1.0f + 2.0f * static_cast<float>(i) / 255.0f;
  l.offset = 1.25f;
  return l;
}

struct IsaGuard {
  std::string saved = active_kernels().name;
  ~IsaGuard() { set_active_isa(saved); }
};

void check_forward(const Layer& l, bool nested, int64_t batch, int64_t rank, bool with_bias) {
  const int64_t out = l.out, in = l.in;
  const Nf4Weight v = l.view(nested);
  std::vector<float> deq(static_cast<size_t>(out * in)), deq_isa(deq.size());
  set_active_isa("scalar");
  dequantize_nf4(v, deq.data());
  const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), 21);
  const auto a = qlora_test::normal_vector(static_cast<size_t>(rank * in), 22, 0.1f);
  const auto b = qlora_test::normal_vector(static_cast<size_t>(out * rank), 23, 0.1f);
  const auto bias = qlora_test::normal_vector(static_cast<size_t>(out), 24);
  const float scaling = 0.5f;
  for (const KernelTable* t : qlora_test::runnable_tables()) {
    INFO("isa " << t->name << " out " << out << " in " << in << " gs " << l.gs << " nested " << nested
                << " batch " << batch << " rank " << rank);
    set_active_isa(t->name);
    dequantize_nf4(v, deq_isa.data());
    REQUIRE(deq_isa == deq);
    std::vector<float> y(static_cast<size_t>(batch * out), -1.0f);
    forward(v, x.data(), batch, a.data(), b.data(), rank, scaling, with_bias ? bias.data() : nullptr, y.data());
    qlora_test::check_forward_within_bound(y, x, deq, a, b, with_bias ? bias.data() : nullptr, scaling, batch,
                                           out, in, rank);
  }
}

}  // namespace

TEST_CASE("batch-1 forward with block-aligned groups, tails of the row tile") {
  IsaGuard guard;
  for (int64_t gs : {int64_t{32}, int64_t{64}, int64_t{128}, int64_t{512}}) {
    for (int64_t out : {1, 3, 4, 7, 33}) {
      const Layer l = make_layer(out, 1024, gs);
      check_forward(l, false, 1, 4, true);
      check_forward(l, true, 1, 0, false);
    }
  }
}

TEST_CASE("groups a multiple of 32 with in_features not a multiple of 32") {
  IsaGuard guard;
  for (int64_t in : {100, 333}) {
    for (int64_t gs : {int64_t{32}, int64_t{64}}) {
      const Layer l = make_layer(19, in, gs);
      for (int64_t batch : {1, 2, 13}) check_forward(l, false, batch, 3, true);
      check_forward(l, true, 5, 3, true);
    }
  }
}

TEST_CASE("batched forward over several K-chunks and batch tiles") {
  IsaGuard guard;
  // 1100 columns: three K-chunks of the 512-column GEMM panel, the last ending in a partial block.
  for (int64_t gs : {int64_t{64}, int64_t{100}}) {
    const Layer l = make_layer(300, 1100, gs);
    for (int64_t batch : {2, 12, 13, 30}) check_forward(l, false, batch, 8, batch % 2 == 0);
    check_forward(l, true, 7, 8, true);
  }
  const Layer wide = make_layer(40, 1056, 64);
  check_forward(wide, true, 25, 16, true);
}

TEST_CASE("batched forward with block-aligned groups: partial last chunk, row tails") {
  IsaGuard guard;
  // 1088 columns: K-chunks of 512, 512 and 64 (two blocks); 70 rows: a partial panel.
  for (int64_t gs : {int64_t{32}, int64_t{64}, int64_t{544}, int64_t{1088}}) {
    const Layer l = make_layer(70, 1088, gs);
    for (int64_t batch : {2, 7, 13}) check_forward(l, false, batch, 4, true);
    check_forward(l, true, 3, 0, false);
  }
}

TEST_CASE("aligned-group paths are bit-identical for any thread count") {
  IsaGuard guard;
  const Layer l = make_layer(300, 512, 64);
  const Nf4Weight v = l.view(false);
  const int64_t rank = 8;
  const auto a = qlora_test::normal_vector(static_cast<size_t>(rank * 512), 31, 0.05f);
  const auto b = qlora_test::normal_vector(static_cast<size_t>(300 * rank), 32, 0.05f);
  for (const KernelTable* t : qlora_test::runnable_tables()) {
    set_active_isa(t->name);
    for (int64_t batch : {1, 6, 37}) {
      INFO("isa " << t->name << " batch " << batch);
      const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * 512), 33);
      auto run = [&] {
        std::vector<float> y(static_cast<size_t>(batch * 300));
        forward(v, x.data(), batch, a.data(), b.data(), rank, 0.5f, nullptr, y.data());
        return y;
      };
      set_num_threads(1);
      const auto y1 = run();
      for (int threads : {2, 3, 5}) {
        set_num_threads(threads);
        REQUIRE(run() == y1);
      }
    }
  }
  set_num_threads(default_num_threads());
}
