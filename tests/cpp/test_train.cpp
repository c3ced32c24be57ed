// The backward: every ISA's transposed product gemm_nf4t_f32 against a float64 reference within
// its rounding bound and against the scalar specification, over whole and partial row ranges,
// bit-identical over uneven column splits and thread counts, and the driver's batch-1 row blocks
// added in block order; the C++ training core (train.h) against float64 finite differences
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
#include "qlora/train.h"
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
                          int64_t batch, int64_t out, int64_t in, int64_t r0 = 0, int64_t r1 = -1) {
  if (r1 < 0) r1 = out;
  const double eps = std::ldexp(1.0, -24);
  double worst = -1.0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < in; ++i) {
      double ref = 0.0, mag = 0.0;
      for (int64_t o = r0; o < r1; ++o) {
        const double t = double(g[b * out + o]) * deq[o * in + i];
        ref += t;
        mag += std::fabs(t);
      }
      const double bound = double(r1 - r0 + 4) * eps * mag * 1.01 + 1e-30;
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
                             const std::vector<int64_t>& cuts, int64_t r0 = 0, int64_t r1 = -1) {
  std::vector<float> dx(static_cast<size_t>(batch * w.in_features), -7.0f);
  TransposedArgs p;
  p.w = w;
  p.g = g.data();
  p.batch = batch;
  p.row_begin = r0;
  p.row_end = r1 < 0 ? w.out_features : r1;
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
  // groups that straddle rows (100 with 1100 columns), block-aligned groups of 64 to 256 columns
  // (wider than the AVX2 batch-1 tile at 128 and 256), and a column tail.
  auto shape = GENERATE(std::vector<int64_t>{600, 1100, 100}, std::vector<int64_t>{530, 1024, 64},
                        std::vector<int64_t>{77, 576, 128}, std::vector<int64_t>{40, 4096, 64},
                        std::vector<int64_t>{130, 1000, 64}, std::vector<int64_t>{33, 1024, 128},
                        std::vector<int64_t>{20, 768, 256});
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

TEST_CASE("gemm_nf4t_f32 over a row range: the sum over those rows only, any column split") {
  // Row ranges that start and end off every internal row step (8 and 4 streamed rows, 64-row
  // slabs, 512-row panels), on aligned groups (64, 128, 512 wider than a tile) and on groups that
  // straddle rows (100, 17); the empty range gives zeros.
  auto shape = GENERATE(std::vector<int64_t>{600, 1100, 100}, std::vector<int64_t>{530, 1024, 64},
                        std::vector<int64_t>{77, 576, 128}, std::vector<int64_t>{140, 1024, 512},
                        std::vector<int64_t>{131, 129, 17});
  const int64_t out = shape[0], in = shape[1], gs = shape[2];
  const Layer l = make_layer(out, in, gs);
  const std::vector<std::pair<int64_t, int64_t>> ranges = {
      {0, out}, {1, out}, {3, std::min<int64_t>(out, 70)}, {out / 3, out - 5}, {out - 1, out}, {7, 7}};
  for (bool nested : {false, true}) {
    const Nf4Weight v = l.view(nested);
    const auto deq = l.deq(nested);
    for (const KernelTable* t : gemmt_tables()) {
      const int64_t cb = std::max<int64_t>(t->col_block, 1);
      std::vector<int64_t> cuts = {0};
      for (int64_t step = 1; cuts.back() < in; ++step) cuts.push_back(std::min(in, cuts.back() + ((step * 3) % 4 + 1) * cb));
      for (const auto& [r0, r1] : ranges) {
        for (int64_t batch : {1, 2, 5}) {
          INFO("isa " << t->name << " out " << out << " in " << in << " gs " << gs << " nested " << nested
                      << " rows " << r0 << ".." << r1 << " batch " << batch);
          const auto g = qlora_test::normal_vector(static_cast<size_t>(batch * out), static_cast<uint32_t>(r0 + batch));
          const auto whole = run_gemmt(*t, v, g, batch, {0, in}, r0, r1);
          REQUIRE(run_gemmt(*t, v, g, batch, cuts, r0, r1) == whole);
          REQUIRE(gemmt_bound_excess(whole, g, deq, batch, out, in, r0, r1) <= 0.0);
          if (r0 == r1) REQUIRE(std::all_of(whole.begin(), whole.end(), [](float x) { return x == 0.0f; }));
        }
      }
    }
  }
}

TEST_CASE("gemm_nf4t driver, batch 1: the kGemmTRowBlock partials added in block order, any thread count") {
  // The driver's documented arithmetic, rebuilt from the kernel: one partial per 512-row block
  // over all columns, then ((p0 + p1) + p2) + ... The shapes have 2 to 4 blocks, the last one
  // partial, in every group layout.
  IsaGuard guard;
  auto shape = GENERATE(std::vector<int64_t>{1300, 1024, 64}, std::vector<int64_t>{1030, 300, 100},
                        std::vector<int64_t>{1537, 129, 17}, std::vector<int64_t>{1025, 512, 128});
  const int64_t out = shape[0], in = shape[1], gs = shape[2];
  const Layer l = make_layer(out, in, gs);
  for (const KernelTable* t : qlora_test::runnable_tables()) {
    set_active_isa(t->name);
    const KernelTable& k = active_kernels();
    for (bool nested : {false, true}) {
      const Nf4Weight v = l.view(nested);
      INFO("isa " << t->name << " out " << out << " in " << in << " gs " << gs << " nested " << nested);
      const auto g = qlora_test::normal_vector(static_cast<size_t>(out), static_cast<uint32_t>(out + in));
      std::vector<float> want(static_cast<size_t>(in), 0.0f);
      const int64_t blocks = (out + kGemmTRowBlock - 1) / kGemmTRowBlock;
      REQUIRE(blocks >= 2);
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const auto part = run_gemmt(k, v, g, 1, {0, in}, blk * kGemmTRowBlock, std::min(out, (blk + 1) * kGemmTRowBlock));
        for (int64_t c = 0; c < in; ++c) want[c] = blk == 0 ? part[c] : want[c] + part[c];
      }
      REQUIRE(gemmt_bound_excess(want, g, l.deq(nested), 1, out, in) <= 0.0);
      for (int threads : {1, 2, 3}) {
        set_num_threads(threads);
        std::vector<float> dx(static_cast<size_t>(in), -7.0f);
        gemm_nf4t(v, g.data(), 1, dx.data());
        REQUIRE(dx == want);
      }
    }
  }
}

TEST_CASE("gemm_nf4t driver: every ISA, batches across chunks, bit-identical for 1, 2, 3 threads") {
  IsaGuard guard;
  const Layer l = make_layer(130, 1000, 64);
  const Layer odd = make_layer(67, 129, 17);
  const Layer tall = make_layer(1100, 160, 32);  // three batch-1 row blocks
  for (const KernelTable* t : qlora_test::runnable_tables()) {
    set_active_isa(t->name);
    for (const Layer* lp : {&l, &odd, &tall}) {
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

// ------------------------------------------------------------------ the training core

namespace {

uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The dropout multipliers train.h documents, written out again here.
std::vector<double> reference_multipliers(float p, uint64_t seed, int64_t batch, int64_t in) {
  const uint64_t key = mix64(seed);
  const uint64_t threshold = static_cast<uint64_t>(std::llround((1.0 - double(p)) * 16777216.0));
  const double scale = static_cast<float>(1.0 / (1.0 - double(p)));
  std::vector<double> m(static_cast<size_t>(batch * in));
  for (int64_t i = 0; i < batch * in; ++i) {
    const uint64_t h = mix64(key + static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ull);
    m[static_cast<size_t>(i)] = (h >> 40) < threshold ? scale : 0.0;
  }
  return m;
}

// A tiny training problem and its float64 forward, loss L = sum(G * y) and gradients.
struct Problem {
  int64_t out, in, rank, batch;
  float scaling, p;
  uint64_t seed;
  bool bias_on;
  Layer layer;
  std::vector<float> x, a, b, bias, g;
  std::vector<double> deq, m;

  Problem(int64_t out_, int64_t in_, int64_t gs, int64_t rank_, int64_t batch_, float p_, bool bias_)
      : out(out_), in(in_), rank(rank_), batch(batch_), scaling(1.5f), p(p_), seed(1234 + out_ * 7 + in_),
        bias_on(bias_), layer(make_layer(out_, in_, gs)) {
    x = qlora_test::normal_vector(static_cast<size_t>(batch * in), 41);
    a = qlora_test::normal_vector(static_cast<size_t>(rank * in), 42, 0.2f);
    b = qlora_test::normal_vector(static_cast<size_t>(out * rank), 43, 0.2f);
    bias = qlora_test::normal_vector(static_cast<size_t>(out), 44);
    g = qlora_test::normal_vector(static_cast<size_t>(batch * out), 45);
    const auto d = layer.deq(false);
    deq.assign(d.begin(), d.end());
    m = reference_multipliers(p, seed, batch, in);
  }
  LoraAdapter lora() const { return {a.data(), b.data(), rank, scaling}; }
  Dropout dropout() const { return {p, seed}; }

  // L(x, A, B, bias) = sum over (r, o) of G[r, o] * y[r, o], all in float64.
  double loss(const std::vector<double>& xs, const std::vector<double>& as, const std::vector<double>& bs,
              const std::vector<double>& biases) const {
    double total = 0.0;
    for (int64_t r = 0; r < batch; ++r) {
      std::vector<double> u(static_cast<size_t>(rank), 0.0);
      for (int64_t k = 0; k < rank; ++k)
        for (int64_t c = 0; c < in; ++c) u[k] += xs[r * in + c] * m[r * in + c] * as[k * in + c];
      for (int64_t o = 0; o < out; ++o) {
        double y = bias_on ? biases[o] : 0.0;
        for (int64_t c = 0; c < in; ++c) y += xs[r * in + c] * deq[o * in + c];
        double l = 0.0;
        for (int64_t k = 0; k < rank; ++k) l += u[k] * bs[o * rank + k];
        total += g[r * out + o] * (y + double(scaling) * l);
      }
    }
    return total;
  }
};

std::vector<double> widen(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// Central differences of the loss along every element of one parameter. The loss is linear in
// each single element, so they are exact up to float64 rounding.
std::vector<double> finite_differences(const Problem& pr, int which) {
  auto xs = widen(pr.x), as = widen(pr.a), bs = widen(pr.b), biases = widen(pr.bias);
  std::vector<double>* v = which == 0 ? &xs : which == 1 ? &as : which == 2 ? &bs : &biases;
  std::vector<double> grad(v->size());
  const double h = 0.25;
  for (size_t i = 0; i < v->size(); ++i) {
    const double keep = (*v)[i];
    (*v)[i] = keep + h;
    const double up = pr.loss(xs, as, bs, biases);
    (*v)[i] = keep - h;
    const double down = pr.loss(xs, as, bs, biases);
    (*v)[i] = keep;
    grad[i] = (up - down) / (2 * h);
  }
  return grad;
}

struct Grads {
  std::vector<float> dx, da, db, dbias, y, u;
};

Grads run_train(const Problem& pr) {
  Grads r;
  r.y.resize(static_cast<size_t>(pr.batch * pr.out));
  r.u.resize(static_cast<size_t>(pr.batch * pr.rank));
  forward_train(pr.layer.view(false), pr.x.data(), pr.batch, pr.lora(), pr.bias_on ? pr.bias.data() : nullptr,
                pr.dropout(), r.y.data(), r.u.data());
  r.dx.assign(static_cast<size_t>(pr.batch * pr.in), -5.0f);
  r.da.assign(static_cast<size_t>(pr.rank * pr.in), -5.0f);
  r.db.assign(static_cast<size_t>(pr.out * pr.rank), -5.0f);
  r.dbias.assign(static_cast<size_t>(pr.out), -5.0f);
  backward(pr.layer.view(false), pr.x.data(), pr.batch, pr.lora(), pr.dropout(), r.u.data(), pr.g.data(),
           {r.dx.data(), r.da.data(), r.db.data(), pr.bias_on ? r.dbias.data() : nullptr});
  return r;
}

// The float64 gradients with per-element bounds of the float32 arithmetic train.h states:
// each float32 sum of n terms is within (n + 2) * 2^-24 of the sum of their magnitudes
// (products and the sum rounded once each, allowing +2 for the scalings), plus the effect of
// the rounding of gb = G B on what is built from it.
struct Expected {
  std::vector<double> dx, dx_bound, da, da_bound, db, db_bound, dbias, dbias_bound;
};

Expected expected_grads(const Problem& pr, const std::vector<float>& u) {
  const double eps = std::ldexp(1.0, -24), s = pr.scaling;
  const int64_t B = pr.batch, O = pr.out, I = pr.in, R = pr.rank;
  Expected e;
  std::vector<double> gb(static_cast<size_t>(B * R), 0.0), gb_err(gb.size(), 0.0);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t k = 0; k < R; ++k) {
      double mag = 0.0;
      for (int64_t o = 0; o < O; ++o) {
        gb[r * R + k] += double(pr.g[r * O + o]) * pr.b[o * R + k];
        mag += std::fabs(double(pr.g[r * O + o]) * pr.b[o * R + k]);
      }
      gb_err[r * R + k] = double(O + 2) * eps * mag;
    }
  e.db.assign(static_cast<size_t>(O * R), 0.0);
  e.db_bound = e.db;
  for (int64_t o = 0; o < O; ++o)
    for (int64_t k = 0; k < R; ++k) {
      double sum = 0.0, mag = 0.0;
      for (int64_t r = 0; r < B; ++r) {
        sum += double(pr.g[r * O + o]) * u[r * R + k];
        mag += std::fabs(double(pr.g[r * O + o]) * u[r * R + k]);
      }
      e.db[o * R + k] = s * sum;
      e.db_bound[o * R + k] = s * double(B + 3) * eps * mag;
    }
  e.da.assign(static_cast<size_t>(R * I), 0.0);
  e.da_bound = e.da;
  for (int64_t k = 0; k < R; ++k)
    for (int64_t c = 0; c < I; ++c) {
      double sum = 0.0, mag = 0.0, prop = 0.0;
      for (int64_t r = 0; r < B; ++r) {
        const double xt = double(pr.x[r * I + c]) * pr.m[r * I + c];
        sum += gb[r * R + k] * xt;
        mag += std::fabs(gb[r * R + k] * xt);
        prop += gb_err[r * R + k] * std::fabs(xt);
      }
      e.da[k * I + c] = s * sum;
      e.da_bound[k * I + c] = s * (double(B + 4) * eps * mag + prop * (1 + double(B + 4) * eps));
    }
  e.dx.assign(static_cast<size_t>(B * I), 0.0);
  e.dx_bound = e.dx;
  for (int64_t r = 0; r < B; ++r)
    for (int64_t c = 0; c < I; ++c) {
      double base = 0.0, base_mag = 0.0, v = 0.0, v_mag = 0.0, prop = 0.0;
      for (int64_t o = 0; o < O; ++o) {
        base += double(pr.g[r * O + o]) * pr.deq[o * I + c];
        base_mag += std::fabs(double(pr.g[r * O + o]) * pr.deq[o * I + c]);
      }
      for (int64_t k = 0; k < R; ++k) {
        v += gb[r * R + k] * pr.a[k * I + c];
        v_mag += std::fabs(gb[r * R + k] * pr.a[k * I + c]);
        prop += gb_err[r * R + k] * std::fabs(double(pr.a[k * I + c]));
      }
      const double sm = s * pr.m[r * I + c];
      e.dx[r * I + c] = base + sm * v;
      e.dx_bound[r * I + c] = double(O + 4) * eps * base_mag + std::fabs(sm) * ((double(R + 5) * eps) * v_mag + prop * 1.01) +
                              eps * std::fabs(base + sm * v);
    }
  e.dbias.assign(static_cast<size_t>(O), 0.0);
  e.dbias_bound = e.dbias;
  for (int64_t o = 0; o < O; ++o) {
    double mag = 0.0;
    for (int64_t r = 0; r < B; ++r) {
      e.dbias[o] += pr.g[r * O + o];
      mag += std::fabs(double(pr.g[r * O + o]));
    }
    e.dbias_bound[o] = double(B + 2) * eps * mag;
  }
  return e;
}

void require_within(const std::vector<float>& got, const std::vector<double>& want, const std::vector<double>& bound,
                    const char* what) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    INFO(what << " element " << i << " got " << got[i] << " want " << want[i] << " bound " << bound[i]);
    REQUIRE(std::fabs(double(got[i]) - want[i]) <= bound[i] * 1.01 + 1e-30);
  }
}

}  // namespace

TEST_CASE("dropout: the documented counter-based hash, rates, rows independent of the batch") {
  for (float p : {0.0f, 0.1f, 0.5f, 0.9f}) {
    INFO("p " << p);
    const int64_t batch = 37, in = 301;
    std::vector<uint8_t> mask(static_cast<size_t>(batch * in));
    dropout_mask({p, 99}, batch, in, mask.data());
    const auto ref = reference_multipliers(p, 99, batch, in);
    double kept = 0;
    for (size_t i = 0; i < mask.size(); ++i) {
      REQUIRE((mask[i] != 0) == (ref[i] != 0.0));
      kept += mask[i];
    }
    // A binomial count: 5 standard deviations of the kept fraction.
    const double n = double(mask.size()), q = 1.0 - p;
    REQUIRE(std::fabs(kept / n - q) <= 5.0 * std::sqrt(q * (1 - q) / n) + 1e-12);
    std::vector<uint8_t> fewer(static_cast<size_t>(5 * in));
    dropout_mask({p, 99}, 5, in, fewer.data());
    REQUIRE(std::equal(fewer.begin(), fewer.end(), mask.begin()));
    std::vector<uint8_t> other(mask.size());
    dropout_mask({p, 100}, batch, in, other.data());
    if (p > 0.0f) REQUIRE(other != mask);
  }
  REQUIRE(dropout_scale(0.0f) == 1.0f);
  REQUIRE(dropout_scale(0.5f) == 2.0f);
  REQUIRE_THROWS_AS(dropout_mask({1.0f, 0}, 1, 1, nullptr), std::invalid_argument);
  REQUIRE_THROWS_AS(dropout_mask({-0.1f, 0}, 1, 1, nullptr), std::invalid_argument);
}

TEST_CASE("forward_train without dropout equals forward bit for bit in every precision, and u is x A^T") {
  IsaGuard guard;
  for (const KernelTable* t : qlora_test::runnable_tables()) {
    set_active_isa(t->name);
    for (int64_t batch : {1, 3, 40}) {
      for (Precision prec : {Precision::kFp32, Precision::kBf16, Precision::kInt8}) {
        INFO("isa " << t->name << " batch " << batch << " precision " << precision_name(prec));
        const Problem pr(33, 128, 64, 5, batch, 0.0f, true);
        ForwardOptions opts;
        opts.precision = prec;
        std::vector<float> y(static_cast<size_t>(batch * pr.out)), y_ref(y.size()), u(static_cast<size_t>(batch * pr.rank));
        forward_train(pr.layer.view(false), pr.x.data(), batch, pr.lora(), pr.bias.data(), pr.dropout(), y.data(),
                      u.data(), opts);
        LoraSegment seg;
        seg.a = pr.a.data();
        seg.b = pr.b.data();
        seg.rank = pr.rank;
        seg.scaling = pr.scaling;
        forward(pr.layer.view(false), pr.x.data(), batch, &seg, 1, pr.bias.data(), y_ref.data(), opts);
        REQUIRE(y == y_ref);
      }
      const Problem pr(33, 129, 64, 5, batch, 0.0f, true);
      std::vector<float> y(static_cast<size_t>(batch * pr.out)), y_ref(y.size()), u(static_cast<size_t>(batch * pr.rank));
      forward_train(pr.layer.view(false), pr.x.data(), batch, pr.lora(), pr.bias.data(), pr.dropout(), y.data(), u.data());
      forward(pr.layer.view(false), pr.x.data(), batch, pr.a.data(), pr.b.data(), pr.rank, pr.scaling, pr.bias.data(),
              y_ref.data());
      REQUIRE(y == y_ref);
      std::vector<float> xa(u.size());
      active_kernels().lora_down(pr.x.data(), pr.in, pr.a.data(), pr.rank, 0, batch, xa.data());
      REQUIRE(u == xa);
    }
  }
}

TEST_CASE("training gradients match float64 finite differences and the float64 formulas") {
  IsaGuard guard;
  struct Case {
    int64_t out, in, gs, rank, batch;
    float p;
    bool bias;
  };
  const std::vector<Case> cases = {{3, 5, 4, 2, 1, 0.0f, true},  {7, 17, 17, 3, 2, 0.3f, true},
                                   {5, 33, 32, 1, 3, 0.5f, false}, {9, 40, 64, 4, 7, 0.1f, true},
                                   {4, 64, 100, 2, 5, 0.0f, false}};
  for (const KernelTable* t : qlora_test::runnable_tables()) {
    set_active_isa(t->name);
    for (const Case& c : cases) {
      INFO("isa " << t->name << " out " << c.out << " in " << c.in << " gs " << c.gs << " rank " << c.rank
                  << " batch " << c.batch << " p " << c.p << " bias " << c.bias);
      const Problem pr(c.out, c.in, c.gs, c.rank, c.batch, c.p, c.bias);
      const Grads got = run_train(pr);
      const Expected e = expected_grads(pr, got.u);
      require_within(got.dx, e.dx, e.dx_bound, "dx");
      require_within(got.da, e.da, e.da_bound, "dA");
      require_within(got.db, e.db, e.db_bound, "dB");
      if (c.bias) require_within(got.dbias, e.dbias, e.dbias_bound, "dbias");
      // The formulas are the loss's derivatives: finite differences agree to float64 rounding.
      // dB from the formula uses the float32 u; the loss uses the exact one, within dB's bound.
      const std::vector<std::pair<int, const std::vector<double>*>> fd = {{0, &e.dx}, {1, &e.da}, {3, &e.dbias}};
      for (const auto& [which, formula] : fd) {
        if (which == 3 && !c.bias) continue;
        const auto num = finite_differences(pr, which);
        for (size_t i = 0; i < num.size(); ++i) REQUIRE(std::fabs(num[i] - (*formula)[i]) <= 1e-9 * (1 + std::fabs(num[i])));
        const std::vector<float>& mine = which == 0 ? got.dx : which == 1 ? got.da : got.dbias;
        const std::vector<double>& bound = which == 0 ? e.dx_bound : which == 1 ? e.da_bound : e.dbias_bound;
        for (size_t i = 0; i < num.size(); ++i) REQUIRE(std::fabs(double(mine[i]) - num[i]) <= bound[i] * 1.01 + 1e-9 * (1 + std::fabs(num[i])));
      }
      // dB against the derivative: the float32 u it is built from is within (in + 3) roundings
      // of sum |x~ a| of the exact one, which adds s * sum over r of |g| * that to the bound.
      const auto num_b = finite_differences(pr, 2);
      const double eps = std::ldexp(1.0, -24);
      for (int64_t o = 0; o < c.out; ++o) {
        for (int64_t k = 0; k < c.rank; ++k) {
          double prop = 0.0;
          for (int64_t r = 0; r < c.batch; ++r) {
            double mag = 0.0;
            for (int64_t i = 0; i < c.in; ++i) mag += std::fabs(double(pr.x[r * c.in + i]) * pr.m[r * c.in + i] * pr.a[k * c.in + i]);
            prop += std::fabs(double(pr.g[r * c.out + o])) * double(c.in + 3) * eps * mag;
          }
          const size_t i = static_cast<size_t>(o * c.rank + k);
          REQUIRE(std::fabs(double(got.db[i]) - num_b[i]) <= (e.db_bound[i] + pr.scaling * prop) * 1.01 + 1e-9 * (1 + std::fabs(num_b[i])));
        }
      }
    }
  }
}

TEST_CASE("backward is bit-identical for 1, 2 and 3 threads; unwanted gradients are skipped") {
  IsaGuard guard;
  for (const KernelTable* t : qlora_test::runnable_tables()) {
    if (std::string(t->name) == "scalar") continue;  // the SIMD tables run the same LoRA code
    set_active_isa(t->name);
    for (int64_t batch : {1, 300}) {
      INFO("isa " << t->name << " batch " << batch);
      const Problem pr(130, 1000, 64, 8, batch, 0.1f, true);
      set_num_threads(1);
      const Grads one = run_train(pr);
      for (int threads : {2, 3}) {
        set_num_threads(threads);
        const Grads more = run_train(pr);
        REQUIRE(more.y == one.y);
        REQUIRE(more.u == one.u);
        REQUIRE(more.dx == one.dx);
        REQUIRE(more.da == one.da);
        REQUIRE(more.db == one.db);
        REQUIRE(more.dbias == one.dbias);
      }
      // Only dA, then only dx: the same values, the other buffers untouched.
      std::vector<float> da(one.da.size(), -5.0f), dx(one.dx.size(), -5.0f);
      backward(pr.layer.view(false), pr.x.data(), batch, pr.lora(), pr.dropout(), nullptr, pr.g.data(),
               {nullptr, da.data(), nullptr, nullptr});
      REQUIRE(da == one.da);
      backward(pr.layer.view(false), nullptr, batch, pr.lora(), pr.dropout(), nullptr, pr.g.data(),
               {dx.data(), nullptr, nullptr, nullptr});
      REQUIRE(dx == one.dx);
    }
  }
}

TEST_CASE("training arguments are checked") {
  const Problem pr(4, 8, 8, 2, 2, 0.0f, false);
  std::vector<float> y(8), u(4), dx(16);
  REQUIRE_THROWS_AS(forward_train(pr.layer.view(false), pr.x.data(), 2, pr.lora(), nullptr, {1.0f, 0}, y.data(), u.data()),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(forward_train(pr.layer.view(false), pr.x.data(), 2, pr.lora(), nullptr, {}, y.data(), nullptr),
                    std::invalid_argument);
  LoraAdapter bad = pr.lora();
  bad.b = nullptr;
  REQUIRE_THROWS_AS(backward(pr.layer.view(false), pr.x.data(), 2, bad, {}, u.data(), pr.g.data(), {dx.data()}),
                    std::invalid_argument);
  std::vector<float> db(8);
  REQUIRE_THROWS_AS(backward(pr.layer.view(false), pr.x.data(), 2, pr.lora(), {}, nullptr, pr.g.data(),
                             {nullptr, nullptr, db.data(), nullptr}),
                    std::invalid_argument);
}
