// The bf16 precision's SIMD kernels (avx512_bf16, amx) against its scalar specification:
// pack_bf16 bit for bit (NaN, infinities, denormals and ties included); gemm_nf4_bf16 within the
// bound of summing the same exact products in another float32 order, over odd sizes, every
// group layout, double-quantized scales, bias on and off and batches that reach every path; the
// same bits for any split of the output rows and any thread count. A table this CPU cannot run
// is reported as skipped (a WARN naming it), never passed silently.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "qlora/precision.h"
#include "qlora/thread_pool.h"
#include "test_util.h"

using namespace qlora;

namespace {

bool available(const std::string& name) {
  const auto isas = available_isas();
  return std::find(isas.begin(), isas.end(), name) != isas.end();
}

// The tables with their own bf16 entries this CPU runs; each one it cannot run is reported.
std::vector<const KernelTable*> bf16_tables() {
  std::vector<const KernelTable*> out;
  for (const char* name : {"amx", "avx512_bf16"}) {
    const auto compiled = compiled_isas();
    if (std::find(compiled.begin(), compiled.end(), name) == compiled.end()) continue;
    if (!available(name)) {
      WARN("SKIPPED: this CPU (or OS) does not offer " << name << "; its bf16 kernels were not run");
      continue;
    }
    out.push_back(&own_kernels_by_name(name));
  }
  return out;
}

struct Layer {
  int64_t out, in, gs;
  std::vector<uint8_t> codes;
  std::vector<float> absmax;
  std::vector<uint8_t> qscales;
  std::vector<float> nested_scales, nested_map;

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
      v.nested_offset = 0.37f;
    } else {
      v.scales = absmax.data();
    }
    return v;
  }
};

Layer make_layer(int64_t out, int64_t in, int64_t gs) {
  Layer l{out, in, gs, {}, {}, {}, {}, {}};
  const auto w = qlora_test::normal_vector(static_cast<size_t>(out * in), static_cast<uint32_t>(3 * out + 7 * in + gs));
  l.codes.resize(static_cast<size_t>(packed_bytes(out, in)));
  l.absmax.resize(static_cast<size_t>(group_count(out * in, gs)));
  const KernelTable& s = kernels_by_name("scalar");
  const int64_t n = out * in, groups = static_cast<int64_t>(l.absmax.size());
  s.group_absmax(w.data(), n, gs, 0, groups, l.absmax.data());
  if (n % gs != 0) l.absmax.back() = std::max(l.absmax.back(), kMinAbsmax);
  s.quantize_rows(w.data(), in, n, gs, l.absmax.data(), 0, out, l.codes.data());
  // Any 8-bit codes over any map exercise the nested arithmetic.
  l.qscales.resize(static_cast<size_t>(groups));
  for (int64_t g = 0; g < groups; ++g) l.qscales[static_cast<size_t>(g)] = static_cast<uint8_t>((g * 37 + 11) % 256);
  l.nested_scales.resize(static_cast<size_t>((groups + kNestedBlock - 1) / kNestedBlock));
  for (size_t i = 0; i < l.nested_scales.size(); ++i) l.nested_scales[i] = 0.3f + 0.1f * static_cast<float>(i);
  l.nested_map.resize(256);
  for (int i = 0; i < 256; ++i) l.nested_map[static_cast<size_t>(i)] = (static_cast<float>(i) - 127.0f) / 128.0f;
  return l;
}

// Activations packed by the specification, batch x padded_cols(in).
std::vector<uint16_t> spec_pack(const std::vector<float>& x, int64_t batch, int64_t in) {
  std::vector<uint16_t> out(static_cast<size_t>(batch * padded_cols(in)));
  kernels_by_name("scalar").pack_bf16(x.data(), in, 0, batch, out.data());
  return out;
}

ForwardArgs args_for(const Nf4Weight& w, const std::vector<uint16_t>& xb, int64_t batch, const float* bias,
                     std::vector<float>& y) {
  ForwardArgs p;
  p.w = w;
  p.x_bf16 = xb.data();
  p.batch = batch;
  p.bias = bias;
  y.assign(static_cast<size_t>(batch * w.out_features), -7.0f);
  p.y = y.data();
  return p;
}

// Two float32 sums of the same exact products p_c = x^_c * w^_c (bf16 operands, so exact in
// float32) and the bias, in different orders: each is within (m - 1) * 2^-24 * T of the exact
// sum to first order, m = in + 1 terms and T = sum |p_c| + |bias| (1.01 covers the higher-order
// terms for these sizes), so they differ by at most twice that. The hardware's flushes add at
// most 2^-126 per addition and 2^-126 * |other operand| per denormal operand.
void check_against_spec(const std::vector<float>& y, const std::vector<float>& y_spec, const Nf4Weight& w,
                        const std::vector<uint16_t>& xb, const float* bias, int64_t batch) {
  const int64_t out = w.out_features, in = w.in_features, cols = padded_cols(in);
  std::vector<float> deq(static_cast<size_t>(out * in));
  kernels_by_name("scalar").dequantize_rows(w, 0, out, deq.data());
  const double u = std::ldexp(1.0, -24), tiny = std::ldexp(1.0, -126);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t o = 0; o < out; ++o) {
      double terms = bias != nullptr ? std::fabs(double(bias[o])) : 0.0, operands = 0.0;
      for (int64_t c = 0; c < in; ++c) {
        const double xv = bf16_to_f32(xb[static_cast<size_t>(b * cols + c)]);
        const double wv = bf16_to_f32(f32_to_bf16(deq[static_cast<size_t>(o * in + c)]));
        terms += std::fabs(xv * wv);
        operands += std::fabs(xv) + std::fabs(wv);
      }
      const double bound = 2.0 * double(in + 2) * u * terms * 1.01 + tiny * (operands + 2.0 * double(in) + 4.0);
      const double got = y[static_cast<size_t>(b * out + o)], want = y_spec[static_cast<size_t>(b * out + o)];
      INFO("batch row " << b << " output row " << o << " got " << got << " spec " << want << " bound " << bound);
      REQUIRE(std::fabs(got - want) <= bound);
    }
  }
}

struct IsaGuard {
  std::string saved = active_kernels().name;
  ~IsaGuard() { set_active_isa(saved); }
};

}  // namespace

TEST_CASE("pack_bf16 of each SIMD table equals the scalar f32_to_bf16 bit for bit") {
  // Bit patterns chosen for their rounding: NaNs (signalling, quiet, negative, payload only in the
  // low half), infinities, the largest finite value (rounds to infinity), ties to even both ways,
  // zeros, and denormals that round to zero, to a bf16 denormal and up to the smallest normal.
  const std::vector<uint32_t> special = {
      0x7f800001u, 0x7fc00000u, 0xffc00001u, 0x7fbfffffu, 0xff800001u, 0x7f800000u, 0xff800000u,
      0x7f7fffffu, 0xff7fffffu, 0x7f7f8000u, 0x3f808000u, 0x3f818000u, 0x3f808001u, 0x3f807fffu,
      0x00000000u, 0x80000000u, 0x00000001u, 0x80000001u, 0x00007fffu, 0x00008000u, 0x00018000u,
      0x00010000u, 0x007fffffu, 0x807fffffu, 0x007f8000u, 0x007f7fffu, 0x00800000u, 0x80800000u};
  std::mt19937 gen(5);
  std::vector<const KernelTable*> tables;
  for (const std::string& name : available_isas()) {
    const KernelTable& own = own_kernels_by_name(name);
    if (own.pack_bf16 != nullptr && name != "scalar") tables.push_back(&own);
  }
  if (tables.empty()) WARN("SKIPPED: no SIMD table of this CPU has its own pack_bf16");
  std::vector<int64_t> widths = qlora_test::kOddSizes;
  widths.push_back(1000);
  for (const KernelTable* t : tables) {
    for (int64_t in : widths) {
      const int64_t batch = 3, cols = padded_cols(in);
      std::vector<uint32_t> bits(static_cast<size_t>(batch * in));
      for (size_t i = 0; i < bits.size(); ++i) {
        // A third special values, a third random bit patterns (every class), a third normals.
        const size_t k = i % 3;
        bits[i] = k == 0 ? special[(i / 3) % special.size()] : k == 1 ? gen() : 0u;
        if (k == 2) {
          const float f = std::normal_distribution<float>(0.0f, 3.0f)(gen);
          std::memcpy(&bits[i], &f, sizeof f);
        }
      }
      std::vector<float> x(bits.size());
      std::memcpy(x.data(), bits.data(), bits.size() * sizeof(float));
      std::vector<uint16_t> want(static_cast<size_t>(batch * cols), 0xdeadu), got(want.size(), 0xbeefu);
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t c = 0; c < cols; ++c) {
          want[static_cast<size_t>(b * cols + c)] = c < in ? f32_to_bf16(x[static_cast<size_t>(b * in + c)]) : uint16_t{0};
        }
      }
      // Rows 1 and 2 first, then row 0: a range that does not start at row 0.
      t->pack_bf16(x.data(), in, 1, 3, got.data());
      t->pack_bf16(x.data(), in, 0, 1, got.data());
      INFO("isa " << t->name << " in " << in);
      for (size_t i = 0; i < want.size(); ++i) {
        INFO("element " << i << " input bits " << std::hex << (i % cols < static_cast<size_t>(in) ? bits[(i / cols) * in + i % cols] : 0u));
        REQUIRE(got[i] == want[i]);
      }
    }
  }
  // The scalar table is the specification itself.
  std::vector<float> x = {1.0f, -2.5f, 3.1e-40f};
  std::vector<uint16_t> s(32);
  kernels_by_name("scalar").pack_bf16(x.data(), 3, 0, 1, s.data());
  REQUIRE(s[0] == f32_to_bf16(1.0f));
  REQUIRE(s[2] == f32_to_bf16(3.1e-40f));
  REQUIRE(s[2] != 0);  // the specification keeps denormals; pack_bf16 kernels must too
}

TEST_CASE("gemm_nf4_bf16 of each SIMD table is within the summation-order bound of the specification") {
  const KernelTable& scalar = own_kernels_by_name("scalar");
  const std::vector<const KernelTable*> tables = bf16_tables();
  std::vector<int64_t> widths = qlora_test::kOddSizes;
  // Rows of whole groups of 32 and 64 columns (64, 192: an even number of blocks), several
  // 512-column K-chunks of the GEMM ending in a lone block (1056 = 33 blocks), and not.
  widths.push_back(64);
  widths.push_back(192);
  widths.push_back(1056);
  widths.push_back(1100);
  // Groups across every layout: straddling blocks and rows (17, 100), one per block (32, 96),
  // whole chunks (64, 128), and for widths not a multiple of them, groups straddling rows.
  const std::vector<int64_t> group_sizes = {17, 32, 64, 96, 100, 128};
  // 1: the batch-1 path; 2..24: the register paths and their tails (4-row tiles); 25+: the GEMM
  // and its tiles of up to 12 rows (25 = 9 + 8 + 8, 36 = 3 x 12).
  const std::vector<int64_t> batches = {1, 2, 3, 5, 8, 13, 24, 25, 31, 36};
  for (const KernelTable* t : tables) {
    for (int64_t out : {1, 33, 70}) {
      for (int64_t in : widths) {
        for (int64_t gs : group_sizes) {
          const Layer l = make_layer(out, in, gs);
          const auto bias = qlora_test::normal_vector(static_cast<size_t>(out), 4);
          for (int64_t batch : batches) {
            if (in > 300 && batch % 2 == 1 && batch > 5) continue;  // keep the wide cases short
            const bool nested = (batch + gs) % 2 == 0, with_bias = batch % 3 != 0;
            INFO("isa " << t->name << " out " << out << " in " << in << " gs " << gs << " batch " << batch
                        << (nested ? " double-quantized" : " plain") << (with_bias ? " bias" : ""));
            const Nf4Weight w = l.view(nested);
            const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), static_cast<uint32_t>(in + batch));
            const auto xb = spec_pack(x, batch, in);
            std::vector<float> y, y_spec;
            const float* bp = with_bias ? bias.data() : nullptr;
            ForwardArgs p = args_for(w, xb, batch, bp, y);
            t->gemm_nf4_bf16.fn(p, 0, out);
            ForwardArgs ps = args_for(w, xb, batch, bp, y_spec);
            scalar.gemm_nf4_bf16.fn(ps, 0, out);
            check_against_spec(y, y_spec, w, xb, bp, batch);
          }
        }
      }
    }
  }
}

TEST_CASE("gemm_nf4_bf16 gives the same bits for any split of the output rows") {
  // The drivers hand the kernel ranges that depend on the thread count (multiples of its
  // row_block but the last); here uneven splits must match one call over all rows.
  auto shape = GENERATE(std::vector<int64_t>{45, 129, 50}, std::vector<int64_t>{100, 96, 32},
                        std::vector<int64_t>{77, 256, 64}, std::vector<int64_t>{70, 1100, 128});
  const int64_t out = shape[0], in = shape[1], gs = shape[2];
  const Layer l = make_layer(out, in, gs);
  const auto bias = qlora_test::normal_vector(static_cast<size_t>(out), 9);
  for (const KernelTable* t : bf16_tables()) {
    const int64_t rb = std::max<int64_t>(t->gemm_nf4_bf16.row_block, 1);
    std::vector<int64_t> cuts = {0};
    for (int64_t step = 1; cuts.back() < out; ++step) cuts.push_back(std::min(out, cuts.back() + step * rb));
    for (bool nested : {false, true}) {
      for (int64_t batch : {1, 3, 16, 29, 256}) {
        INFO("isa " << t->name << " out " << out << " in " << in << " gs " << gs << " batch " << batch
                    << (nested ? " double-quantized" : " plain"));
        const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), 10);
        const auto xb = spec_pack(x, batch, in);
        std::vector<float> whole, split;
        ForwardArgs p = args_for(l.view(nested), xb, batch, bias.data(), whole);
        t->gemm_nf4_bf16.fn(p, 0, out);
        p = args_for(l.view(nested), xb, batch, bias.data(), split);
        for (size_t i = 0; i + 1 < cuts.size(); ++i) t->gemm_nf4_bf16.fn(p, cuts[i], cuts[i + 1]);
        REQUIRE(split == whole);
      }
    }
  }
}

TEST_CASE("bf16 forward through the driver: batch chunks, LoRA, and any thread count") {
  // 300 rows cross the 256-row batch chunk. The driver packs x with the active ISA's
  // pack_bf16 and calls the chosen kernel per chunk, so without LoRA its result is bit for bit
  // the kernel's on the specification's packing; the fp32 LoRA term is added on top; and the
  // result is the same for 1, 2 and 3 threads.
  IsaGuard guard;
  const int64_t out = 96, in = 320, rank = 4;
  const Layer l = make_layer(out, in, 64);
  const Nf4Weight w = l.view(true);
  const auto a = qlora_test::normal_vector(static_cast<size_t>(rank * in), 11, 0.1f);
  const auto b = qlora_test::normal_vector(static_cast<size_t>(out * rank), 12, 0.1f);
  const auto bias = qlora_test::normal_vector(static_cast<size_t>(out), 13);
  for (const KernelTable* t : bf16_tables()) {
    set_active_isa(t->name);
    for (int64_t batch : {1, 7, 40, 300}) {
      INFO("isa " << t->name << " batch " << batch);
      const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), 14);
      auto run = [&](int64_t r) {
        LoraSegment seg;
        seg.a = a.data();
        seg.b = b.data();
        seg.rank = r;
        seg.scaling = 0.5f;
        std::vector<float> y(static_cast<size_t>(batch * out));
        ForwardOptions opts;
        opts.precision = Precision::kBf16;
        const GemmChoice c = forward(w, x.data(), batch, &seg, 1, bias.data(), y.data(), opts);
        REQUIRE(c.precision == Precision::kBf16);
        return y;
      };
      set_num_threads(1);
      const auto y1 = run(rank);
      for (int threads : {2, 3}) {
        set_num_threads(threads);
        REQUIRE(run(rank) == y1);
      }
      const auto base = run(0);
      const auto xb = spec_pack(x, batch, in);
      std::vector<float> yk, yspec;
      const ForwardArgs p = args_for(w, xb, batch, bias.data(), yk);
      for (int64_t c0 = 0; c0 < batch; c0 += kBatchChunk) {
        ForwardArgs pc = p;
        pc.batch = std::min(kBatchChunk, batch - c0);
        pc.x_bf16 = xb.data() + c0 * padded_cols(in);
        pc.y = yk.data() + c0 * out;
        const GemmChoice c = choose_gemm(Precision::kBf16, pc.batch, w);
        REQUIRE(std::string(c.isa) == t->name);
        c.kernel.fn(pc, 0, out);
      }
      REQUIRE(base == yk);
      ForwardArgs ps = args_for(w, xb, batch, bias.data(), yspec);
      own_kernels_by_name("scalar").gemm_nf4_bf16.fn(ps, 0, out);
      check_against_spec(yk, yspec, w, xb, bias.data(), batch);
      // The LoRA term in fp32: 0.5 * (x A^T) B^T, up to float32 rounding of the sums.
      for (int64_t r = 0; r < batch; ++r) {
        for (int64_t o = 0; o < out; ++o) {
          double lora = 0.0, mag = 0.0;
          for (int64_t k = 0; k < rank; ++k) {
            double xa = 0.0, xa_mag = 0.0;
            for (int64_t c = 0; c < in; ++c) {
              xa += double(x[static_cast<size_t>(r * in + c)]) * a[static_cast<size_t>(k * in + c)];
              xa_mag += std::fabs(double(x[static_cast<size_t>(r * in + c)]) * a[static_cast<size_t>(k * in + c)]);
            }
            lora += 0.5 * xa * b[static_cast<size_t>(o * rank + k)];
            mag += 0.5 * xa_mag * std::fabs(b[static_cast<size_t>(o * rank + k)]);
          }
          const size_t i = static_cast<size_t>(r * out + o);
          const double bound = double(in + rank + 4) * std::ldexp(1.0, -24) * (mag + std::fabs(double(y1[i]))) * 1.01;
          REQUIRE(std::fabs(double(y1[i]) - double(base[i]) - lora) <= bound);
        }
      }
    }
  }
  set_num_threads(default_num_threads());
}

TEST_CASE("the dispatcher serves bf16 from a bf16 table wherever the CPU has one") {
  IsaGuard guard;
  const Layer l = make_layer(8, 64, 64);
  const Nf4Weight w = l.view(false);
  if (!available("avx512_bf16") && !available("amx")) {
    WARN("SKIPPED: this CPU has neither AVX512-BF16 nor AMX; bf16 requests run in fp32 here");
    REQUIRE(choose_gemm(Precision::kBf16, 1, w).precision == Precision::kFp32);
    return;
  }
  set_active_isa(available("amx") ? "amx" : "avx512_bf16");
  for (int64_t batch : {1, 2, 8, 16, 17, 32, 128, 256}) {
    const GemmChoice c = choose_gemm(Precision::kBf16, batch, w);
    INFO("batch " << batch << " served by " << c.isa);
    REQUIRE(c.precision == Precision::kBf16);
    const std::string isa = c.isa;
    REQUIRE((isa == "amx" || isa == "avx512_bf16"));
  }
}

// ---------------------------------------------------------------- AMX with emulated tiles
// Most CPUs that run these tests lack AMX, so the AMX kernel's own logic (its B tile layout, A
// tile strides, batch and row tails, C tile read-back) would otherwise go unexercised. Here
// x86_amx.cpp is compiled a second time into namespace amx_emu with the tile instructions
// replaced by a scalar emulation of Intel's pseudocode (ldtilecfg checks the configuration it
// is given and every product checks its tile shapes; tdpbf16ps adds each pair's even then odd
// product in float32, denormal operands read as zero; tdpbssd sums int8 products in int32) and
// the permission request answered yes. It proves the data movement; the hardware's
// own behaviour is only tested above, where AMX is granted.
#if defined(__x86_64__)

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace tile_emu {
struct Tile {
  alignas(64) uint8_t b[16][64];
  int rows = 0, colsb = 0;
};
thread_local Tile tiles[8];
thread_local bool configured = false;
thread_local long dot_products = 0;
// ldtilecfg: palette 1, reserved bytes zero, tiles 0-7 at most 16 rows x 64 bytes, 8-15 unused.
void load_config(const void* c) {
  const uint8_t* p = static_cast<const uint8_t*>(c);
  REQUIRE(p[0] == 1);
  for (int i = 1; i < 16; ++i) REQUIRE(p[i] == 0);
  for (int i = 0; i < 16; ++i) {
    uint16_t colsb;
    std::memcpy(&colsb, p + 16 + 2 * i, 2);
    if (i >= 8) {
      REQUIRE(colsb == 0);
      REQUIRE(p[48 + i] == 0);
      continue;
    }
    REQUIRE((colsb > 0 && colsb <= 64 && colsb % 4 == 0));
    REQUIRE((p[48 + i] > 0 && p[48 + i] <= 16));
    tiles[i].colsb = colsb;
    tiles[i].rows = p[48 + i];
  }
  configured = true;
}
void require_config() {
  if (!configured) FAIL("tile instruction without ldtilecfg");
}
void load(int d, const void* base, long stride) {
  require_config();
  std::memset(tiles[d].b, 0, sizeof tiles[d].b);
  for (int r = 0; r < tiles[d].rows; ++r) std::memcpy(tiles[d].b[r], static_cast<const char*>(base) + r * stride, tiles[d].colsb);
}
void store(int s, void* base, long stride) {
  require_config();
  for (int r = 0; r < tiles[s].rows; ++r) std::memcpy(static_cast<char*>(base) + r * stride, tiles[s].b[r], tiles[s].colsb);
}
void zero(int d) {
  require_config();
  std::memset(tiles[d].b, 0, sizeof tiles[d].b);
}
// The shape rules of TDPBF16PS / TDPBSSD (#UD otherwise): C is M x N dwords, A is M x K dwords,
// B is K x N dwords.
void check_shapes(int dst, int a, int b) {
  require_config();
  REQUIRE(tiles[dst].rows == tiles[a].rows);
  REQUIRE(tiles[b].rows == tiles[a].colsb / 4);
  REQUIRE(tiles[dst].colsb == tiles[b].colsb);
}
float bf16_daz(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
void dpbf16ps(int dst, int a, int b) {
  check_shapes(dst, a, b);
  ++dot_products;
  for (int m = 0; m < tiles[dst].rows; ++m) {
    float c[16];
    std::memcpy(c, tiles[dst].b[m], 64);
    const uint16_t* arow = reinterpret_cast<const uint16_t*>(tiles[a].b[m]);
    for (int k = 0; k < tiles[a].colsb / 4; ++k) {
      const uint16_t* brow = reinterpret_cast<const uint16_t*>(tiles[b].b[k]);
      for (int n = 0; n < tiles[dst].colsb / 4; ++n) {
        c[n] += bf16_daz(arow[2 * k]) * bf16_daz(brow[2 * n]);
        c[n] += bf16_daz(arow[2 * k + 1]) * bf16_daz(brow[2 * n + 1]);
      }
    }
    std::memcpy(tiles[dst].b[m], c, 64);
  }
}
void dpbssd(int dst, int a, int b) {
  check_shapes(dst, a, b);
  ++dot_products;
  for (int m = 0; m < tiles[dst].rows; ++m) {
    int32_t c[16];
    std::memcpy(c, tiles[dst].b[m], 64);
    const int8_t* arow = reinterpret_cast<const int8_t*>(tiles[a].b[m]);
    for (int k = 0; k < tiles[a].colsb / 4; ++k) {
      const int8_t* brow = reinterpret_cast<const int8_t*>(tiles[b].b[k]);
      for (int n = 0; n < tiles[dst].colsb / 4; ++n) {
        for (int i = 0; i < 4; ++i) c[n] += int32_t{arow[4 * k + i]} * int32_t{brow[4 * n + i]};
      }
    }
    std::memcpy(tiles[dst].b[m], c, 64);
  }
}
}  // namespace tile_emu

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#undef _tile_dpbssd
#define _tile_loadd(d, base, stride) tile_emu::load(d, base, stride)
#define _tile_stored(s, base, stride) tile_emu::store(s, base, stride)
#define _tile_zero(d) tile_emu::zero(d)
#define _tile_dpbf16ps(d, a, b) tile_emu::dpbf16ps(d, a, b)
#define _tile_dpbssd(d, a, b) tile_emu::dpbssd(d, a, b)
#define _tile_loadconfig(c) tile_emu::load_config(c)
#define _tile_release() (tile_emu::configured = false)
#define syscall(...) 0L
#define amx amx_emu
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-variable"
#include "../../csrc/kernels/x86_amx.cpp"
#pragma GCC diagnostic pop
#undef amx
#undef syscall

TEST_CASE("the AMX bf16 kernel's data movement, with emulated tiles, matches the specification") {
  if (!available("avx512_bf16")) {
    WARN("SKIPPED: the emulated AMX kernel still decodes with AVX512-BF16, which this CPU lacks");
    return;
  }
  const KernelTable* t = kernels::amx_emu::table();
  const KernelTable& scalar = own_kernels_by_name("scalar");
  REQUIRE(t->gemm_nf4_bf16.min_batch == 32);
  const long before = tile_emu::dot_products;
  for (int64_t out : {1, 33, 70}) {
    for (int64_t in : {1, 17, 33, 100, 192, 255, 1056, 1100}) {
      for (int64_t gs : {17, 32, 64, 96, 128}) {
        const Layer l = make_layer(out, in, gs);
        const auto bias = qlora_test::normal_vector(static_cast<size_t>(out), 15);
        // Below, at and above one and two 16-row A tiles, and a partial last 32-row block.
        for (int64_t batch : {1, 16, 17, 32, 33, 70}) {
          const bool nested = (batch + gs) % 2 == 0;
          INFO("out " << out << " in " << in << " gs " << gs << " batch " << batch << (nested ? " double-quantized" : ""));
          const Nf4Weight w = l.view(nested);
          const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), static_cast<uint32_t>(batch + in));
          const auto xb = spec_pack(x, batch, in);
          const float* bp = batch % 2 == 1 ? bias.data() : nullptr;
          std::vector<float> y, split, y_spec;
          ForwardArgs p = args_for(w, xb, batch, bp, y);
          t->gemm_nf4_bf16.fn(p, 0, out);
          ForwardArgs ps = args_for(w, xb, batch, bp, split);
          for (int64_t c = 0, step = 32; c < out; c += step, step += 32) t->gemm_nf4_bf16.fn(ps, c, std::min(out, c + step));
          REQUIRE(split == y);
          ForwardArgs pspec = args_for(w, xb, batch, bp, y_spec);
          scalar.gemm_nf4_bf16.fn(pspec, 0, out);
          check_against_spec(y, y_spec, w, xb, bp, batch);
        }
      }
    }
  }
  REQUIRE(tile_emu::dot_products > before);  // the tiles did the work, not a fallback
  REQUIRE_FALSE(tile_emu::configured);       // tilerelease after every call
}

#endif

#if defined(__x86_64__)
TEST_CASE("the AMX int8 kernel, with emulated tiles, equals the int8 specification bit for bit") {
  // Per 32-column block an exact int32 dot product, then the specification's own float32
  // scaling in block order: the same operations, so the same bits.
  if (!available("avx512_vnni")) {
    WARN("SKIPPED: the emulated AMX int8 kernel still decodes with AVX-512, which this CPU lacks");
    return;
  }
  const KernelTable* t = kernels::amx_emu::table();
  const KernelTable& scalar = own_kernels_by_name("scalar");
  const long before = tile_emu::dot_products;
  for (int64_t out : {1, 33, 70}) {
    for (int64_t in : {32, 96, 100, 192, 1056}) {
      for (int64_t gs : {32, 64, 96, 128}) {
        const Layer l = make_layer(out, in, gs);
        if (!q8_layout_ok(l.view(false))) continue;
        const auto bias = qlora_test::normal_vector(static_cast<size_t>(out), 16);
        for (int64_t batch : {1, 16, 17, 32, 33, 70}) {
          const bool nested = (batch + gs) % 2 == 0;
          INFO("out " << out << " in " << in << " gs " << gs << " batch " << batch << (nested ? " double-quantized" : ""));
          const Nf4Weight w = l.view(nested);
          const int64_t cols = padded_cols(in), blocks = cols / kQ8Block;
          const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), static_cast<uint32_t>(batch + 2 * in));
          std::vector<int8_t> q(static_cast<size_t>(batch * cols));
          std::vector<float> d(static_cast<size_t>(batch * blocks));
          std::vector<int32_t> sums(d.size());
          scalar.quantize_q8(x.data(), in, 0, batch, q.data(), d.data(), sums.data());
          ForwardArgs p;
          p.w = w;
          p.batch = batch;
          p.x_q8 = q.data();
          p.x_q8_scale = d.data();
          p.x_q8_sum = sums.data();
          p.bias = batch % 2 == 1 ? bias.data() : nullptr;
          std::vector<float> y(static_cast<size_t>(batch * out), -7.0f), split(y.size(), -8.0f), spec(y.size(), -9.0f);
          p.y = y.data();
          t->gemm_nf4_q8.fn(p, 0, out);
          p.y = split.data();
          for (int64_t c = 0, step = 32; c < out; c += step, step += 32) t->gemm_nf4_q8.fn(p, c, std::min(out, c + step));
          p.y = spec.data();
          scalar.gemm_nf4_q8.fn(p, 0, out);
          REQUIRE(y == spec);
          REQUIRE(split == spec);
        }
      }
    }
  }
  REQUIRE(tile_emu::dot_products > before);
  REQUIRE_FALSE(tile_emu::configured);
}

TEST_CASE("the AMX int8 kernel equals the int8 specification on AMX hardware") {
  if (!available("amx")) {
    WARN("SKIPPED: this CPU (or OS) does not offer amx; its int8 kernel was not run on hardware");
    return;
  }
  const KernelTable& t = own_kernels_by_name("amx");
  const KernelTable& scalar = own_kernels_by_name("scalar");
  for (int64_t batch : {1, 17, 32, 70, 256}) {
    const Layer l = make_layer(70, 1056, 64);
    const Nf4Weight w = l.view(batch % 2 == 0);
    const int64_t cols = padded_cols(1056), blocks = cols / kQ8Block;
    const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * 1056), 17);
    std::vector<int8_t> q(static_cast<size_t>(batch * cols));
    std::vector<float> d(static_cast<size_t>(batch * blocks));
    std::vector<int32_t> sums(d.size());
    scalar.quantize_q8(x.data(), 1056, 0, batch, q.data(), d.data(), sums.data());
    ForwardArgs p;
    p.w = w;
    p.batch = batch;
    p.x_q8 = q.data();
    p.x_q8_scale = d.data();
    p.x_q8_sum = sums.data();
    std::vector<float> y(static_cast<size_t>(batch * 70)), spec(y.size());
    p.y = y.data();
    t.gemm_nf4_q8.fn(p, 0, 70);
    p.y = spec.data();
    scalar.gemm_nf4_q8.fn(p, 0, 70);
    INFO("batch " << batch);
    REQUIRE(y == spec);
  }
}
#endif
