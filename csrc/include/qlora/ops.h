// The operations of the core over caller-owned buffers: quantize, dequantize, fused forward and
// the bitsandbytes layout converters. Each validates its sizes (throwing std::invalid_argument
// with a message naming the argument), picks the active kernel table once, and splits the work
// over the thread pool. No Python in here; the pybind11 module and C++ users call these.
#pragma once

#include <cstdint>

#include "qlora/dispatch.h"
#include "qlora/kernels.h"
#include "qlora/nf4.h"

namespace qlora {

// a * b, or std::invalid_argument naming `what` when it overflows int64 or either is negative.
int64_t checked_mul(int64_t a, int64_t b, const char* what);
// ceil(n / group_size) for n >= 1, group_size >= 1.
int64_t group_count(int64_t n_total, int64_t group_size);
// Bytes of the packed codes of an (out_features, in_features) weight, overflow-checked.
int64_t packed_bytes(int64_t out_features, int64_t in_features);

// Checks that a view is self-consistent (sizes positive, counts agree, pointers set).
void validate_weight(const Nf4Weight& w);

// Quantizes a row-major float32 (out_features, in_features) weight: codes receives
// packed_bytes(out, in) bytes, absmax group_count(out * in, group_size) floats.
void quantize_nf4(const float* w, int64_t out_features, int64_t in_features, int64_t group_size,
                  uint8_t* codes, float* absmax);

// out: row-major (out_features, in_features) float32.
void dequantize_nf4(const Nf4Weight& w, float* out);

// One LoRA adapter applied to some rows of a batch: y[r] += s_r * (x[r] @ A^T) @ B^T.
struct LoraSegment {
  const float* a = nullptr;          // rank x in_features
  const float* b = nullptr;          // out_features x rank
  int64_t rank = 0;
  float scaling = 0.0f;              // s_r for every row unless row_scale is given
  const int64_t* rows = nullptr;     // strictly ascending batch rows, or nullptr: every row
  int64_t n_rows = 0;                // entries of rows (ignored when rows is null)
  const float* row_scale = nullptr;  // s_r per listed row (per batch row when rows is null)
};

struct ForwardOptions {
  Precision precision = Precision::kFp32;
  // Tests: run this ISA's own product kernel for the precision (it must have one) instead of
  // dispatching. Everything else (activation packing, LoRA) still comes from the active ISA.
  const KernelTable* table = nullptr;
};

// y (batch, out_features) = x @ deq(W)^T (in opts.precision) + the LoRA term of each segment
// (fp32) + bias, with x (batch, in_features). Segments may cover any subsets of the rows (a row
// in several segments gets each term; a row in none gets only the base). bias may be null. The
// fp32 weight is never materialized. Returns the choice made for the first batch chunk.
GemmChoice forward(const Nf4Weight& w, const float* x, int64_t batch, const LoraSegment* loras,
                   int64_t n_loras, const float* bias, float* y, const ForwardOptions& opts = {});

// The single-adapter forward: rank 0 skips the LoRA term; a (rank, in), b (out, rank).
void forward(const Nf4Weight& w, const float* x, int64_t batch, const float* a, const float* b,
             int64_t rank, float scaling, const float* bias, float* y);

// dx (batch, in_features) = g (batch, out_features) @ deq(W): the input gradient of the base
// product, decoded as the forward decodes (never materializing the weight); fp32, bit-identical
// for any thread count.
void gemm_nf4t(const Nf4Weight& w, const float* g, int64_t batch, float* dx);

// bitsandbytes flat packing ((n + 1) / 2 bytes, first element of a pair in the high nibble,
// odd tail padded with code 7) <-> qlora's packed rows. Both directions are exact.
void codes_from_bnb(const uint8_t* flat, int64_t out_features, int64_t in_features, uint8_t* codes);
void codes_to_bnb(const uint8_t* codes, int64_t out_features, int64_t in_features, uint8_t* flat);


}  // namespace qlora
