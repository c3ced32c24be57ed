// Tests of the NF4 format helpers and the bitsandbytes layout converters, against values
// written out independently of the implementation.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <vector>

#include "qlora/nf4.h"
#include "qlora/ops.h"
#include "test_util.h"

using namespace qlora;

TEST_CASE("codebook matches the published float32 bit patterns") {
  const uint32_t bits[16] = {0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f,
                             0xbdba7871, 0x00000000, 0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a,
                             0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000};
  for (int i = 0; i < 16; ++i) {
    uint32_t got;
    std::memcpy(&got, &kNf4Codebook[i], 4);
    CHECK(got == bits[i]);
  }
}

TEST_CASE("nearest_nf4 picks the closest code and breaks ties downwards") {
  for (int i = 0; i < 16; ++i) CHECK(nearest_nf4(kNf4Codebook[i]) == i);
  for (int i = 0; i < 15; ++i) {
    const float mid = (kNf4Codebook[i] + kNf4Codebook[i + 1]) * 0.5f;
    CHECK(nearest_nf4(mid) == i);
    CHECK(nearest_nf4(std::nextafter(mid, 2.0f)) == i + 1);
  }
}

TEST_CASE("bitsandbytes packing round-trips through qlora's packed rows") {
  for (int64_t out : {1, 2, 3, 7}) {
    for (int64_t in : qlora_test::kOddSizes) {
      const int64_t n = out * in;
      std::vector<uint8_t> flat(static_cast<size_t>((n + 1) / 2));
      for (size_t i = 0; i < flat.size(); ++i) flat[i] = static_cast<uint8_t>((i * 37 + 11) & 0xff);
      if (n % 2) flat.back() = static_cast<uint8_t>((flat.back() & 0xf0) | kNf4ZeroCode);
      std::vector<uint8_t> codes(static_cast<size_t>(packed_bytes(out, in)));
      codes_from_bnb(flat.data(), out, in, codes.data());
      for (int64_t r = 0; r < out; ++r) {
        for (int64_t c = 0; c < in; ++c) {
          const int64_t i = r * in + c;
          const uint8_t expect = (i % 2 == 0) ? flat[i / 2] >> 4 : flat[i / 2] & 0x0f;
          REQUIRE(get_code(codes.data() + r * packed_row_bytes(in), c) == expect);
        }
      }
      std::vector<uint8_t> back(flat.size());
      codes_to_bnb(codes.data(), out, in, back.data());
      CHECK(back == flat);
    }
  }
}

TEST_CASE("size checks refuse overflowing shapes") {
  CHECK_THROWS_AS(checked_mul(INT64_MAX / 2, 3, "x"), std::invalid_argument);
  CHECK_THROWS_AS(packed_bytes(INT64_MAX / 4, INT64_MAX / 4), std::invalid_argument);
  CHECK_THROWS_AS(group_count(10, 0), std::invalid_argument);
  CHECK(group_count(10, 3) == 4);
  CHECK(group_count(9, 3) == 3);
}
