// The LoRA kernels and the forward's adapter segments. lora_up of every ISA that provides one is
// compared bit for bit with the scalar specification (it is defined as exact float32 arithmetic
// per output, so vectorizing over outputs changes nothing), over odd output counts and ranks,
// listed and unlisted rows, per-row scales, and uneven splits of the output range. lora_down is
// checked against a float64 reference within its bound and for the same bits whatever rows are
// handed in beside a row. The forward driver with mixed segments (scattered and contiguous rows,
// empty and rank-0 segments, mixed ranks, per-row scales, batches crossing a chunk) must equal
// its base product plus each segment's term computed row by row, and the float64 reference, for
// any thread count.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
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
  ~IsaGuard() { set_active_isa(saved); }
};

// The own tables of the compiled ISAs that provide `has`, skipping (with a message) those this
// CPU cannot run.
template <typename Has>
std::vector<const KernelTable*> own_tables_with(Has has) {
  std::vector<const KernelTable*> out;
  const auto avail = available_isas();
  for (const auto& name : compiled_isas()) {
    if (name == "scalar") continue;
    if (std::find(avail.begin(), avail.end(), name) == avail.end()) {
      WARN("skipped: this CPU cannot run the " << name << " kernels");
      continue;
    }
    const KernelTable& t = own_kernels_by_name(name);
    if (has(t)) out.push_back(&t);
  }
  return out;
}

// Cut points of [0, n) into pieces of 1, 2, 3, ... elements: every piece a different length,
// starting at every kind of offset.
std::vector<int64_t> uneven_cuts(int64_t n) {
  std::vector<int64_t> cuts = {0};
  for (int64_t step = 1; cuts.back() < n; ++step) cuts.push_back(std::min(n, cuts.back() + step));
  return cuts;
}

}  // namespace

TEST_CASE("lora_up of every ISA equals the scalar specification bit for bit, for any output split") {
  const KernelTable& scalar = kernels_by_name("scalar");
  const auto tables = own_tables_with([](const KernelTable& t) { return t.lora_up != nullptr; });
  const int64_t batch = 11;
  // Rows listed out of a batch of 11: scattered, a run, all of them; and unlisted rows.
  const std::vector<std::vector<int64_t>> row_lists = {{0, 2, 3, 7, 10}, {4, 5, 6}, {9}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}};
  for (const KernelTable* t : tables) {
    for (int64_t out : {1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 67, 127, 129, 255}) {
      for (int64_t rank : {1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64}) {
        const auto u = qlora_test::normal_vector(static_cast<size_t>(batch * rank), static_cast<uint32_t>(rank));
        const auto b = qlora_test::normal_vector(static_cast<size_t>(out * rank), static_cast<uint32_t>(out + 7), 0.3f);
        const auto y0 = qlora_test::normal_vector(static_cast<size_t>(batch * out), static_cast<uint32_t>(out * rank));
        const auto scales = qlora_test::normal_vector(static_cast<size_t>(batch), 99);
        for (size_t variant = 0; variant < row_lists.size() + 3; ++variant) {
          // Variants: each row list (with per-row scales on odd ones), then 1, 4 and 11 unlisted rows.
          const bool listed = variant < row_lists.size();
          const int64_t* rows = listed ? row_lists[variant].data() : nullptr;
          const int64_t n_rows = listed ? static_cast<int64_t>(row_lists[variant].size())
                                        : std::vector<int64_t>{1, 4, 11}[variant - row_lists.size()];
          const float* row_scale = variant % 2 == 1 ? scales.data() : nullptr;
          INFO("isa " << t->name << " out " << out << " rank " << rank << " variant " << variant);
          std::vector<float> want = y0, whole = y0, split = y0;
          scalar.lora_up(u.data(), rank, b.data(), 0.625f, row_scale, rows, n_rows, out, 0, out, want.data());
          t->lora_up(u.data(), rank, b.data(), 0.625f, row_scale, rows, n_rows, out, 0, out, whole.data());
          REQUIRE(whole == want);
          const auto cuts = uneven_cuts(out);
          for (size_t i = 0; i + 1 < cuts.size(); ++i) {
            t->lora_up(u.data(), rank, b.data(), 0.625f, row_scale, rows, n_rows, out, cuts[i], cuts[i + 1],
                       split.data());
          }
          REQUIRE(split == want);
        }
      }
    }
  }
}

TEST_CASE("lora_up leaves rows and outputs outside its lists untouched") {
  const auto tables = own_tables_with([](const KernelTable& t) { return t.lora_up != nullptr; });
  const int64_t batch = 6, out = 40, rank = 16;
  const auto u = qlora_test::normal_vector(static_cast<size_t>(2 * rank), 1);
  const auto b = qlora_test::normal_vector(static_cast<size_t>(out * rank), 2);
  const std::vector<int64_t> rows = {1, 4};
  for (const KernelTable* t : tables) {
    INFO("isa " << t->name);
    std::vector<float> y(static_cast<size_t>(batch * out), 3.0f);
    t->lora_up(u.data(), rank, b.data(), 1.0f, nullptr, rows.data(), 2, out, 5, 29, y.data());
    for (int64_t r = 0; r < batch; ++r) {
      for (int64_t o = 0; o < out; ++o) {
        const bool touched = (r == 1 || r == 4) && o >= 5 && o < 29;
        if (!touched) REQUIRE(y[static_cast<size_t>(r * out + o)] == 3.0f);
        if (touched) REQUIRE(y[static_cast<size_t>(r * out + o)] != 3.0f);
      }
    }
  }
}

TEST_CASE("lora_down of every ISA is within its bound and gives the same bits for any row grouping") {
  std::vector<const KernelTable*> tables = own_tables_with([](const KernelTable& t) { return t.lora_down != nullptr; });
  tables.push_back(&kernels_by_name("scalar"));
  const int64_t batch = 7;
  for (const KernelTable* t : tables) {
    for (int64_t in : qlora_test::kOddSizes) {
      for (int64_t rank : {1, 3, 4, 5, 8, 16, 17, 64}) {
        INFO("isa " << t->name << " in " << in << " rank " << rank);
        const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), static_cast<uint32_t>(in));
        const auto a = qlora_test::normal_vector(static_cast<size_t>(rank * in), static_cast<uint32_t>(rank), 0.2f);
        std::vector<float> whole(static_cast<size_t>(batch * rank)), split(whole.size()), single(whole.size());
        t->lora_down(x.data(), in, a.data(), rank, 0, batch, whole.data());
        for (auto [b0, b1] : {std::pair<int64_t, int64_t>{0, 2}, {2, 3}, {3, 7}}) {
          t->lora_down(x.data(), in, a.data(), rank, b0, b1, split.data());
        }
        for (int64_t r = 0; r < batch; ++r) {
          t->lora_down(x.data() + r * in, in, a.data(), rank, 0, 1, single.data() + r * rank);
        }
        REQUIRE(split == whole);
        REQUIRE(single == whole);
        const double eps = std::ldexp(1.0, -24);
        for (int64_t r = 0; r < batch; ++r) {
          for (int64_t k = 0; k < rank; ++k) {
            double ref = 0.0, mag = 0.0;
            for (int64_t c = 0; c < in; ++c) {
              const double p = double(x[static_cast<size_t>(r * in + c)]) * a[static_cast<size_t>(k * in + c)];
              ref += p;
              mag += std::fabs(p);
            }
            REQUIRE(std::fabs(double(whole[static_cast<size_t>(r * rank + k)]) - ref) <= double(in + 1) * eps * mag * 1.01 + 1e-30);
          }
        }
      }
    }
  }
}

namespace {

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
      v.nested_offset = 0.25f;
    }
    return v;
  }
};

Layer make_layer(int64_t out, int64_t in, int64_t gs) {
  Layer l{out, in, gs, {}, {}, {}, {}, {}};
  const auto w = qlora_test::normal_vector(static_cast<size_t>(out * in), static_cast<uint32_t>(out * 3 + in + gs));
  l.codes.resize(static_cast<size_t>(packed_bytes(out, in)));
  l.absmax.resize(static_cast<size_t>(group_count(out * in, gs)));
  quantize_nf4(w.data(), out, in, gs, l.codes.data(), l.absmax.data());
  const size_t groups = l.absmax.size();
  l.qscales.resize(groups);
  for (size_t g = 0; g < groups; ++g) l.qscales[g] = static_cast<uint8_t>((g * 53 + 3) % 256);
  l.nested_scales = qlora_test::normal_vector((groups + kNestedBlock - 1) / kNestedBlock, 8, 0.5f);
  l.nested_map.resize(256);
  for (int i = 0; i < 256; ++i) l.nested_map[static_cast<size_t>(i)] = -1.0f + 2.0f * static_cast<float>(i) / 255.0f;
  return l;
}

struct Adapter {
  std::vector<float> a, b, row_scale;
  std::vector<int64_t> rows;
  int64_t rank = 0;
  float scaling = 0.0f;
  bool all_rows = false;
};

// A mix over `batch` rows: scattered rows with per-row scales, a contiguous run, every row
// (rows null), an empty list, a rank-0 segment and rows that no segment lists.
std::vector<Adapter> make_mix(int64_t batch, int64_t in, int64_t out, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<Adapter> mix;
  auto add = [&](int64_t rank, std::vector<int64_t> rows, bool all, bool per_row) {
    Adapter ad;
    ad.rank = rank;
    ad.a = qlora_test::normal_vector(static_cast<size_t>(rank * in), seed + static_cast<uint32_t>(mix.size()), 0.1f);
    ad.b = qlora_test::normal_vector(static_cast<size_t>(out * rank), seed + 50 + static_cast<uint32_t>(mix.size()), 0.1f);
    ad.rows = std::move(rows);
    ad.all_rows = all;
    ad.scaling = 0.5f + 0.25f * static_cast<float>(mix.size());
    if (per_row) ad.row_scale = qlora_test::normal_vector(all ? static_cast<size_t>(batch) : ad.rows.size(), seed + 99);
    mix.push_back(std::move(ad));
  };
  std::vector<int64_t> scattered, run;
  for (int64_t r = 0; r < batch; ++r) {
    if (gen() % 3 == 0) scattered.push_back(r);
  }
  for (int64_t r = batch / 3; r < std::min(batch, batch / 3 + 5); ++r) run.push_back(r);
  add(16, scattered, false, true);
  add(5, run, false, false);
  add(64, {}, false, false);
  add(1, {}, true, batch % 2 == 0);
  add(0, run, false, false);
  std::vector<int64_t> last;
  if (batch > 1) last.push_back(batch - 1);
  add(3, last, false, false);
  return mix;
}

std::vector<LoraSegment> segments_of(const std::vector<Adapter>& mix) {
  std::vector<LoraSegment> segs;
  for (const Adapter& ad : mix) {
    LoraSegment s;
    s.a = ad.rank > 0 ? ad.a.data() : nullptr;
    s.b = ad.rank > 0 ? ad.b.data() : nullptr;
    s.rank = ad.rank;
    s.scaling = ad.scaling;
    // An empty list still needs a pointer: null means every row.
    static const int64_t kNoRows = 0;
    s.rows = ad.all_rows ? nullptr : ad.rows.empty() ? &kNoRows : ad.rows.data();
    s.n_rows = ad.all_rows ? 0 : static_cast<int64_t>(ad.rows.size());
    s.row_scale = ad.row_scale.empty() ? nullptr : ad.row_scale.data();
    segs.push_back(s);
  }
  return segs;
}

}  // namespace

TEST_CASE("forward with mixed adapter segments equals its base plus each segment row by row, for any thread count") {
  IsaGuard guard;
  const KernelTable& scalar = kernels_by_name("scalar");
  struct Shape {
    int64_t out, in, gs;
  };
  for (Shape sh : {Shape{67, 100, 17}, Shape{40, 128, 64}, Shape{33, 96, 100}, Shape{48, 256, 128}}) {
    const Layer l = make_layer(sh.out, sh.in, sh.gs);
    for (bool nested : {false, true}) {
      const Nf4Weight v = l.view(nested);
      std::vector<float> deq(static_cast<size_t>(sh.out * sh.in));
      scalar.dequantize_rows(v, 0, sh.out, deq.data());
      for (int64_t batch : {1, 2, 5, 8, 9, 37, 300}) {
        const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * sh.in), static_cast<uint32_t>(batch));
        const auto bias = qlora_test::normal_vector(static_cast<size_t>(sh.out), 4);
        const auto mix = make_mix(batch, sh.in, sh.out, static_cast<uint32_t>(batch * 7 + sh.gs));
        const auto segs = segments_of(mix);
        for (const KernelTable* t : qlora_test::runnable_tables()) {
          for (bool with_bias : {false, true}) {
            INFO("isa " << t->name << " out " << sh.out << " in " << sh.in << " gs " << sh.gs << " nested "
                        << nested << " batch " << batch << " bias " << with_bias);
            set_active_isa(t->name);
            const float* pb = with_bias ? bias.data() : nullptr;
            set_num_threads(1);
            std::vector<float> want(static_cast<size_t>(batch * sh.out));
            forward(v, x.data(), batch, nullptr, 0, pb, want.data());
            // Each segment's term added row by row, in segment order, with the table's own kernels.
            for (const Adapter& ad : mix) {
              if (ad.rank == 0) continue;
              const int64_t n = ad.all_rows ? batch : static_cast<int64_t>(ad.rows.size());
              for (int64_t j = 0; j < n; ++j) {
                const int64_t r = ad.all_rows ? j : ad.rows[static_cast<size_t>(j)];
                std::vector<float> u(static_cast<size_t>(ad.rank));
                t->lora_down(x.data() + r * sh.in, sh.in, ad.a.data(), ad.rank, 0, 1, u.data());
                const float s = ad.row_scale.empty() ? ad.scaling : ad.row_scale[static_cast<size_t>(j)];
                scalar.lora_up(u.data(), ad.rank, ad.b.data(), s, nullptr, &r, 1, sh.out, 0, sh.out, want.data());
              }
            }
            for (int threads : {1, 2, 3, 5}) {
              set_num_threads(threads);
              std::vector<float> y(want.size(), -7.0f);
              forward(v, x.data(), batch, segs.data(), static_cast<int64_t>(segs.size()), pb, y.data());
              INFO("threads " << threads);
              REQUIRE(y == want);
            }
            // The float64 reference: every term rounds at most once per operation.
            const double eps = std::ldexp(1.0, -24);
            for (int64_t r = 0; r < batch; ++r) {
              for (int64_t o = 0; o < sh.out; ++o) {
                double ref = pb != nullptr ? pb[o] : 0.0, mag = std::fabs(ref);
                int64_t terms = sh.in + 2;
                for (int64_t c = 0; c < sh.in; ++c) {
                  const double p = double(x[static_cast<size_t>(r * sh.in + c)]) * deq[static_cast<size_t>(o * sh.in + c)];
                  ref += p;
                  mag += std::fabs(p);
                }
                for (const Adapter& ad : mix) {
                  if (ad.rank == 0) continue;
                  int64_t j = r;
                  if (!ad.all_rows) {
                    const auto it = std::find(ad.rows.begin(), ad.rows.end(), r);
                    if (it == ad.rows.end()) continue;
                    j = it - ad.rows.begin();
                  }
                  const double s = ad.row_scale.empty() ? ad.scaling : ad.row_scale[static_cast<size_t>(j)];
                  terms += sh.in + ad.rank + 3;
                  for (int64_t k = 0; k < ad.rank; ++k) {
                    double xa = 0.0, xa_mag = 0.0;
                    for (int64_t c = 0; c < sh.in; ++c) {
                      const double p = double(x[static_cast<size_t>(r * sh.in + c)]) * ad.a[static_cast<size_t>(k * sh.in + c)];
                      xa += p;
                      xa_mag += std::fabs(p);
                    }
                    ref += s * xa * ad.b[static_cast<size_t>(o * ad.rank + k)];
                    mag += std::fabs(s) * xa_mag * std::fabs(ad.b[static_cast<size_t>(o * ad.rank + k)]);
                  }
                }
                REQUIRE(std::fabs(double(want[static_cast<size_t>(r * sh.out + o)]) - ref) <=
                        double(terms) * eps * mag * 1.01 + 1e-30);
              }
            }
          }
        }
      }
    }
  }
  set_num_threads(default_num_threads());
}
