// The backward: every ISA's transposed product gemm_nf4t_f32 against a float64 reference within
// its rounding bound and against the scalar specification, bit-identical over uneven column
// splits and thread counts; the C++ training core (train.h) against float64 finite differences
// and the float64 gradient formulas, deterministic across thread counts.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "qlora/thread_pool.h"
#include "test_util.h"

using namespace qlora;

namespace {

struct IsaGuard {
  std::string saved = active_kernels().name;
  ~IsaGuard() {
    set_active_isa(saved);
    set_num_threads(default_num_threads());
  }
};

// A quantized layer with both scale encodings (any 8-bit codes over any map exercise the
// double-quantized arithmetic) and its scalar dequantization, the reference's weight.
struct Layer {
  int64_t out, in, gs;
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
  std::vector<float> deq(bool nested) const {
    std::vector<float> d(static_cast<size_t>(out * in));
    kernels_by_name("scalar").dequantize_rows(view(nested), 0, out, d.data());
    return d;
  }
};

Layer make_layer(int64_t out, int64_t in, int64_t gs) {
  Layer l{out, in, gs, {}, {}, {}, {}, {}};
  const auto w = qlora_test::normal_vector(static_cast<size_t>(out * in), static_cast<uint32_t>(3 * out + in + gs));
  l.codes.resize(static_cast<size_t>(packed_bytes(out, in)));
  l.absmax.resize(static_cast<size_t>(group_count(out * in, gs)));
  const KernelTable& s = kernels_by_name("scalar");
  const int64_t groups = static_cast<int64_t>(l.absmax.size());
  s.group_absmax(w.data(), out * in, gs, 0, groups, l.absmax.data());
  if ((out * in) % gs != 0) l.absmax.back() = std::max(l.absmax.back(), kMinAbsmax);
  s.quantize_rows(w.data(), in, out * in, gs, l.absmax.data(), 0, out, l.codes.data());
  l.qscales.resize(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g) l.qscales[static_cast<size_t>(g)] = static_cast<uint8_t>((g * 37 + 11) % 256);
  l.nested_map.resize(256);
  for (int i = 0; i < 256; ++i) l.nested_map[static_cast<size_t>(i)] = (static_cast<float>(i) - 127.0f) / 128.0f;
  l.nested_scales.resize(static_cast<size_t>((groups + kNestedBlock - 1) / kNestedBlock));
  for (size_t i = 0; i < l.nested_scales.size(); ++i) l.nested_scales[i] = 0.3f + 0.1f * static_cast<float>(i);
  return l;
}

// dx (batch x in) against g @ deq summed in float64. A kernel adds out_features terms, each
// rounded at most twice (the product, or the scale folded into g, and the sum), so
// |err| <= (out + 2) * 2^-24 * sum |g * deq|; the bound allows out + 4, as the forward's does.
double gemmt_bound_excess(const std::vector<float>& dx, const std::vector<float>& g, const std::vector<float>& deq,
                          int64_t batch, int64_t out, int64_t in) {
  const double eps = std::ldexp(1.0, -24);
  double worst = -1.0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < in; ++i) {
      double ref = 0.0, mag = 0.0;
      for (int64_t o = 0; o < out; ++o) {
        const double t = double(g[b * out + o]) * deq[o * in + i];
        ref += t;
        mag += std::fabs(t);
      }
      const double bound = double(out + 4) * eps * mag * 1.01 + 1e-30;
      worst = std::max(worst, std::fabs(double(dx[b * in + i]) - ref) - bound);
    }
  }
  return worst;  // <= 0 when every element is within its bound
}

// The tables with their own gemm_nf4t_f32 that this CPU runs (their own entries, no fallback).
std::vector<const KernelTable*> gemmt_tables() {
  std::vector<const KernelTable*> out;
  for (const auto& name : available_isas()) {
    const KernelTable& t = own_kernels_by_name(name);
    if (t.gemm_nf4t_f32 != nullptr) out.push_back(&t);
  }
  return out;
}

std::vector<float> run_gemmt(const KernelTable& t, const Nf4Weight& w, const std::vector<float>& g, int64_t batch,
                             const std::vector<int64_t>& cuts) {
  std::vector<float> dx(static_cast<size_t>(batch * w.in_features), -7.0f);
  TransposedArgs p;
  p.w = w;
  p.g = g.data();
  p.batch = batch;
  p.dx = dx.data();
  for (size_t i = 0; i + 1 < cuts.size(); ++i) t.gemm_nf4t_f32(p, cuts[i], cuts[i + 1]);
  return dx;
}

}  // namespace

TEST_CASE("gemm_nf4t_f32 of every ISA is within the float64 bound and near scalar, odd sizes") {
  const auto tables = gemmt_tables();
  REQUIRE(tables.size() >= 1);  // scalar at least
  const KernelTable& scalar = own_kernels_by_name("scalar");
  for (int64_t out : {1, 5, 33, 70}) {
    for (int64_t in : qlora_test::kOddSizes) {
      for (int64_t gs : {int64_t{17}, int64_t{32}, int64_t{64}, int64_t{100}, int64_t{128}}) {
        const Layer l = make_layer(out, in, gs);
        const bool nested = (in + gs) % 2 == 0;
        const Nf4Weight v = l.view(nested);
        const auto deq = l.deq(nested);
        for (int64_t batch : {1, 2, 7, 13}) {
          const auto g = qlora_test::normal_vector(static_cast<size_t>(batch * out), static_cast<uint32_t>(batch + in));
          const auto ref = run_gemmt(scalar, v, g, batch, {0, in});
          REQUIRE(gemmt_bound_excess(ref, g, deq, batch, out, in) <= 0.0);
          for (const KernelTable* t : tables) {
            INFO("isa " << t->name << " out " << out << " in " << in << " gs " << gs << " batch " << batch
                        << " nested " << nested);
            const auto dx = run_gemmt(*t, v, g, batch, {0, in});
            REQUIRE(gemmt_bound_excess(dx, g, deq, batch, out, in) <= 0.0);
            // Both within the bound of the exact sum, so within twice of each other.
            for (size_t i = 0; i < dx.size(); ++i) {
              double mag = 0.0;
              const int64_t b = static_cast<int64_t>(i) / in, c = static_cast<int64_t>(i) % in;
              for (int64_t o = 0; o < out; ++o) mag += std::fabs(double(g[b * out + o]) * deq[o * in + c]);
              REQUIRE(std::fabs(double(dx[i]) - ref[i]) <= 2.0 * double(out + 4) * std::ldexp(1.0, -24) * mag * 1.01 + 1e-30);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("gemm_nf4t_f32 gives the same bits for any column split; many rows and columns") {
  // Shapes past one 512-row chunk of the batched panel and past one batch-1 column tile, with
  // groups that straddle rows (100 with 1100 columns), block-aligned groups, and a column tail.
  auto shape = GENERATE(std::vector<int64_t>{600, 1100, 100}, std::vector<int64_t>{530, 1024, 64},
                        std::vector<int64_t>{77, 576, 128}, std::vector<int64_t>{40, 4096, 64},
                        std::vector<int64_t>{130, 1000, 64});
  const int64_t out = shape[0], in = shape[1], gs = shape[2];
  const Layer l = make_layer(out, in, gs);
  for (bool nested : {false, true}) {
    const Nf4Weight v = l.view(nested);
    const auto deq = l.deq(nested);
    for (const KernelTable* t : gemmt_tables()) {
      const int64_t cb = std::max<int64_t>(t->col_block, 1);
      std::vector<int64_t> cuts = {0};
      for (int64_t step = 1; cuts.back() < in; ++step) cuts.push_back(std::min(in, cuts.back() + ((step * 7) % 5 + 1) * cb));
      for (int64_t batch : {1, 3, 4, 12, 29}) {
        INFO("isa " << t->name << " out " << out << " in " << in << " gs " << gs << " nested " << nested << " batch "
                    << batch << " col_block " << cb);
        const auto g = qlora_test::normal_vector(static_cast<size_t>(batch * out), static_cast<uint32_t>(batch));
        const auto whole = run_gemmt(*t, v, g, batch, {0, in});
        REQUIRE(run_gemmt(*t, v, g, batch, cuts) == whole);
        REQUIRE(gemmt_bound_excess(whole, g, deq, batch, out, in) <= 0.0);
      }
    }
  }
}

TEST_CASE("gemm_nf4t driver: every ISA, batches across chunks, bit-identical for 1, 2, 3 threads") {
  IsaGuard guard;
  const Layer l = make_layer(130, 1000, 64);
  const Layer odd = make_layer(67, 129, 17);
  for (const KernelTable* t : qlora_test::runnable_tables()) {
    set_active_isa(t->name);
    for (const Layer* lp : {&l, &odd}) {
      for (bool nested : {false, true}) {
        const Nf4Weight v = lp->view(nested);
        const auto deq = lp->deq(nested);
        for (int64_t batch : {1, 4, 9, 255, 256, 300}) {
          INFO("isa " << t->name << " out " << lp->out << " in " << lp->in << " nested " << nested << " batch " << batch);
          const auto g = qlora_test::normal_vector(static_cast<size_t>(batch * lp->out), 5);
          std::vector<float> dx1(static_cast<size_t>(batch * lp->in));
          set_num_threads(1);
          gemm_nf4t(v, g.data(), batch, dx1.data());
          REQUIRE(gemmt_bound_excess(dx1, g, deq, batch, lp->out, lp->in) <= 0.0);
          for (int threads : {2, 3}) {
            set_num_threads(threads);
            std::vector<float> dx(dx1.size());
            gemm_nf4t(v, g.data(), batch, dx.data());
            REQUIRE(dx == dx1);
          }
        }
      }
    }
  }
}
