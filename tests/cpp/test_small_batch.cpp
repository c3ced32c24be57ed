// The register path of small batches (2 to 8 rows, groups aligned to 32-column blocks) of each
// x86 ISA's own fp32 product kernel, AVX2 included: over odd output counts, several aligned
// group layouts, plain and double-quantized scales, bias on and off and batches 1 to 9 (both
// sides of the path's limits), the kernel called directly over uneven row splits must give the
// bits of one call over all rows, and be within the float32 rounding bound of a float64
// reference, as the scalar specification is.
#include <catch2/catch.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "qlora/dispatch.h"
#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "test_util.h"

using namespace qlora;

TEST_CASE("small-batch register path of every x86 ISA: same bits for any row split, within the bound") {
  std::vector<const KernelTable*> tables;
  const auto avail = available_isas();
  for (const char* name : {"avx2", "avx512"}) {
    const auto compiled = compiled_isas();
    if (std::find(compiled.begin(), compiled.end(), name) == compiled.end()) continue;
    if (std::find(avail.begin(), avail.end(), name) == avail.end()) {
      WARN("skipped: this CPU cannot run the " << name << " kernels");
      continue;
    }
    tables.push_back(&own_kernels_by_name(name));
  }
  tables.push_back(&kernels_by_name("scalar"));
  const KernelTable& scalar = kernels_by_name("scalar");
  struct Cols {
    int64_t in, gs;
  };
  for (int64_t out : {1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 67, 127, 129, 255}) {
    for (Cols cols : {Cols{32, 32}, Cols{64, 64}, Cols{96, 32}, Cols{256, 128}, Cols{384, 128}}) {
      const int64_t in = cols.in, gs = cols.gs, n = out * in, groups = (n + gs - 1) / gs;
      const auto w = qlora_test::normal_vector(static_cast<size_t>(n), static_cast<uint32_t>(out * 7 + in));
      std::vector<uint8_t> codes(static_cast<size_t>(packed_bytes(out, in)));
      std::vector<float> absmax(static_cast<size_t>(groups));
      scalar.group_absmax(w.data(), n, gs, 0, groups, absmax.data());
      scalar.quantize_rows(w.data(), in, n, gs, absmax.data(), 0, out, codes.data());
      std::vector<uint8_t> qscales(static_cast<size_t>(groups));
      for (int64_t g = 0; g < groups; ++g) qscales[static_cast<size_t>(g)] = static_cast<uint8_t>((g * 29 + 5) % 256);
      std::vector<float> nested_map(256), nested_scales(static_cast<size_t>((groups + kNestedBlock - 1) / kNestedBlock), 0.7f);
      for (int i = 0; i < 256; ++i) nested_map[static_cast<size_t>(i)] = (static_cast<float>(i) - 120.0f) / 128.0f;
      const Nf4Weight plain = qlora_test::plain_view(codes, absmax, out, in, gs);
      Nf4Weight nested = plain;
      nested.scales = nullptr;
      nested.qscales = qscales.data();
      nested.nested_scales = nested_scales.data();
      nested.nested_map = nested_map.data();
      nested.nested_offset = 0.125f;
      for (bool dq : {false, true}) {
        const Nf4Weight& v = dq ? nested : plain;
        std::vector<float> deq(static_cast<size_t>(n));
        scalar.dequantize_rows(v, 0, out, deq.data());
        for (int64_t batch : {1, 2, 3, 4, 5, 6, 7, 8, 9}) {
          const bool with_bias = (batch + out) % 2 == 0;
          const auto x = qlora_test::normal_vector(static_cast<size_t>(batch * in), static_cast<uint32_t>(batch));
          const auto bias = qlora_test::normal_vector(static_cast<size_t>(out), 3);
          for (const KernelTable* t : tables) {
            INFO("isa " << t->name << " out " << out << " in " << in << " gs " << gs << " nested " << dq
                        << " batch " << batch << " bias " << with_bias);
            ForwardArgs p;
            p.w = v;
            p.x = x.data();
            p.batch = batch;
            p.bias = with_bias ? bias.data() : nullptr;
            std::vector<float> whole(static_cast<size_t>(batch * out), -1.0f), split(whole.size(), -2.0f);
            p.y = whole.data();
            t->gemm_nf4_f32.fn(p, 0, out);
            const int64_t rb = std::max<int64_t>(t->gemm_nf4_f32.row_block, 1);
            p.y = split.data();
            for (int64_t r0 = 0, step = 1; r0 < out; r0 += step * rb, ++step) {
              t->gemm_nf4_f32.fn(p, r0, std::min(out, r0 + step * rb));
            }
            REQUIRE(split == whole);
            qlora_test::check_forward_within_bound(whole, x, deq, {}, {}, p.bias, 0.0, batch, out, in, 0);
          }
        }
      }
    }
  }
}
