// The operations of the core over caller-owned buffers: quantize, dequantize, fused forward and
// the bitsandbytes layout converters. Each validates its sizes (throwing std::invalid_argument
// with a message naming the argument), picks the active kernel table once, and splits the work
// over the thread pool. No Python in here; the pybind11 module and C++ users call these.
#pragma once

#include <cstdint>

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

// y (batch, out_features) = x @ deq(W)^T + scaling * (x @ A^T) @ B^T + bias, with
// x (batch, in_features), a (rank, in_features), b (out_features, rank); rank 0 skips the LoRA
// term, bias may be null. The fp32 weight is never materialized.
void forward(const Nf4Weight& w, const float* x, int64_t batch, const float* a, const float* b,
             int64_t rank, float scaling, const float* bias, float* y);

// bitsandbytes flat packing ((n + 1) / 2 bytes, first element of a pair in the high nibble,
// odd tail padded with code 7) <-> qlora's packed rows. Both directions are exact.
void codes_from_bnb(const uint8_t* flat, int64_t out_features, int64_t in_features, uint8_t* codes);
void codes_to_bnb(const uint8_t* codes, int64_t out_features, int64_t in_features, uint8_t* flat);

// Forward work is split into batch chunks of this many rows regardless of the thread count, so
// a kernel's choice of path (which may depend on its batch) never depends on the thread count.
inline constexpr int64_t kBatchChunk = 256;

}  // namespace qlora
