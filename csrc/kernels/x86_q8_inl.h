// The x86 int8 kernels (quantize_q8 and gemm_nf4_q8), written once over an integer vector `VI`
// of kLanes 128-bit lanes and a float vector `VF` of 4 * kLanes floats, and included inside the
// target region and a namespace of each ISA file that provides the primitives (as
// x86_kernels_inl.h is for fp32): x86_avx512_vnni.cpp (ZMM, vpdpbusd), x86_q8_ymm_inl.h for
// x86_avx_vnni.cpp (YMM, VEX vpdpbusd) and x86_avx2.cpp (YMM, vpmaddubsw + vpmaddwd). No include
// guard on purpose: every ISA includes it once, into its own namespace.
//
// The primitives the includer provides: kLanes; kOffsetWeights (true: weights are looked up as
// kNf4Int8 + 128 so the unsigned operand of vpdpbusd is the weight, and 128 * sum(q) is taken
// off each block; false: weights stay signed and dot4() needs no correction); vi_zero, vi_load,
// vi_loadn (a multiple of 16 bytes), vi_set1, vi_store, vi_sub, vi_add, make_wtable, decode,
// dot4, reduce4, rearrange_quad, transpose_dwords; vf_store, vf_storen, vf_zero, vf_set1, vf_load, vf_loadn, vf_mul, vf_add, vf_abs, vf_max,
// vf_has_nan, vf_reduce_max, vf_reduce_add, vf_permute, vf_from_i32, vf_to_i32 (nearest even),
// vi_clamp127, store_i8, vi_reduce_add; the tile shapes kQ8Rows1 (output rows per tile at
// batch 1), kQ8Nb (batch rows per tile otherwise), kQ8RowsNb (output rows per such tile) and
// kQ8MaxRows (the larger of the two), and of the batched panel path kQ8PanelUnits, kQ8PanelMr
// and kQ8PanelMinBatch; and x86_q8_baseline_inl.h before its target region.
//
// Layout of the product. decode() turns kLanes packed blocks (16 bytes each, one per 128-bit
// lane) into two byte vectors: columns 0-15 of each block (low nibbles) and columns 16-31 (high
// nibbles). vpdpbusd sums 4 adjacent byte products per int32, so each 128-bit lane of the
// accumulator holds 4 partial sums of one block, and the activations must be in the same column
// order: rearrange_quad() writes them that way once per call (x_q8 itself keeps the scalar
// layout, which every table shares). A "superblock" is 4 such vectors (4 * kLanes blocks); its 4
// accumulators are reduced by one transpose-add to a vector whose int32 at 4 * L + j is the
// exact block sum of block kLanes * j + L. From there the float work is vectorized per block:
// term = float(isum) * (d * (scale / 127)), exactly the scalar specification's term, added to a
// per-position float accumulator; only the order in which the terms of a row are summed (per
// position over superblocks, then across positions) differs from the scalar loop. That order
// depends on neither the row range, the row tile nor the batch tile, so results are the same
// for any thread count. Chunks of kQ8PanelMinBatch rows or more take the panel path at the end
// of this file, which adds the same terms in the scalar order (so a row's last bits may differ
// between a small and a large batch, as for fp32).

// ---------------------------------------------------------------- quantize_q8
// quantize_q8_block() of precision.h, vectorized: the same amax (max of |x| ignoring NaN), the
// same float32 reciprocal 127 / amax and product x * inv, converted with the default rounding
// (nearest even, as nearbyint), the same special cases computed by the same scalar expressions.
float quantize_block(const float* x, int n, int8_t* q, int32_t* sum) {
  constexpr int kParts = kBlockCols / kVf;
  VF v[kParts];
  VF m = vf_zero();
  bool nan = false;
  for (int i = 0; i < kParts; ++i) {
    const int cnt = n - i * kVf;
    v[i] = cnt >= kVf ? vf_load(x + i * kVf) : cnt > 0 ? vf_loadn(x + i * kVf, cnt) : vf_zero();
    nan = nan || vf_has_nan(v[i]);
    m = vf_max(vf_abs(v[i]), m);  // a NaN lane leaves m as it was, as std::fmax does
  }
  const float amax = vf_reduce_max(m);
  const float inv = 127.0f / amax;
  const bool usable = std::isfinite(amax) && !nan && amax > 0.0f && std::isfinite(inv);
  VI s = vi_zero();
  for (int i = 0; i < kParts; ++i) {
    const VI qi = usable ? vi_clamp127(vf_to_i32(vf_mul(v[i], vf_set1(inv)))) : vi_zero();
    store_i8(q + i * kVf, qi);
    s = vi_add(s, qi);
  }
  *sum = vi_reduce_add(s);
  if (nan) return std::nanf("");
  if (!std::isfinite(amax)) return amax;
  return usable ? amax / 127.0f : 0.0f;
}

void quantize_q8(const float* x, int64_t in_features, int64_t b_begin, int64_t b_end, int8_t* q,
                 float* scale, int32_t* sum) {
  const int64_t cols = padded_cols(in_features);
  const int64_t blocks = cols / kQ8Block;
  for (int64_t b = b_begin; b < b_end; ++b) {
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t c0 = k * kQ8Block;
      const int n = static_cast<int>(in_features - c0 < kQ8Block ? in_features - c0 : kQ8Block);
      scale[b * blocks + k] =
          quantize_block(x + b * in_features + c0, n, q + b * cols + c0, sum + b * blocks + k);
    }
  }
}

// ---------------------------------------------------------------- gemm_nf4_q8
// Per-call, per-thread data: the activations rearranged and permuted to superblock positions.
struct Q8Prep {
  int64_t blocks = 0, nsb = 0;
  const int8_t* xr = nullptr;     // batch x nsb x kSbCols bytes, in rearrange_quad() order
  const float* d = nullptr;       // batch x nsb x kSbBlocks activation scales, by position
  const int32_t* corr = nullptr;  // the same positions, 128 * sum(q) (kOffsetWeights only)
};

void prepare(const ForwardArgs& p, int64_t blocks, int64_t nsb, Q8Prep& pp) {
  const int64_t cols = blocks * kBlockCols;
  const size_t n = static_cast<size_t>(p.batch * nsb * kSbBlocks);
  int8_t* xr = static_cast<int8_t*>(q8_scratch(0, n * kBlockCols));
  float* d = static_cast<float*>(q8_scratch(1, n * sizeof(float)));
  int32_t* corr = static_cast<int32_t*>(q8_scratch(2, n * sizeof(int32_t)));
  alignas(64) int8_t quad[kLanes * kBlockCols];
  for (int64_t b = 0; b < p.batch; ++b) {
    const int8_t* src = p.x_q8 + b * cols;
    int8_t* dst = xr + b * nsb * kSbCols;
    for (int64_t k = 0; k < nsb * kSbBlocks; k += kLanes) {
      if (k + kLanes <= blocks) {
        rearrange_quad(src + k * kBlockCols, dst + k * kBlockCols);
      } else {
        // The tail of the row: whatever blocks remain, then zeros (weight times 0 adds 0).
        const int64_t valid = k < blocks ? (blocks - k) * kBlockCols : 0;
        for (int64_t i = 0; i < kLanes * kBlockCols; ++i) quad[i] = i < valid ? src[k * kBlockCols + i] : int8_t{0};
        rearrange_quad(quad, dst + k * kBlockCols);
      }
    }
    for (int64_t s = 0; s < nsb; ++s) {
      for (int pos = 0; pos < kSbBlocks; ++pos) {
        const int64_t k = block_at(s, pos);
        const size_t at = static_cast<size_t>((b * nsb + s) * kSbBlocks + pos);
        d[at] = k < blocks ? p.x_q8_scale[b * blocks + k] : 0.0f;
        corr[at] = k < blocks ? 128 * p.x_q8_sum[b * blocks + k] : 0;
      }
    }
  }
  pp.blocks = blocks;
  pp.nsb = nsb;
  pp.xr = xr;
  pp.d = d;
  pp.corr = corr;
}

// One superblock s of R output rows (codes at c[r]) by NB batch rows from b0, added to acc.
// TAIL: the superblock is the partial last one; its code loads are masked, so the last row of W
// is never read past its end, and its missing blocks decode as some weight times a zero
// activation, scale and correction, which adds exactly 0.
// wide: a whole vector of scales may be read at every srow[r] + unit (the permute picks only the
// superblock's own units). A masked load is kept for the rest: when it misses the cache it held
// the whole batch-1 product to about 11 GB/s from DRAM on Zen 4, against about 20 with a plain
// load and a prefetch of the next rows' scales.
template <int R, int NB, bool TAIL>
QLORA_VEC_INLINE void q8_superblock(const Q8Prep& pp, const ScalePlan& plan, const uint8_t* const* c,
                                    const float* const* srow, bool wide, int64_t s, int64_t b0, VI table,
                                    VF (&acc)[R][NB]) {
  const int64_t valid_bytes = (pp.blocks - s * kSbBlocks) * kBlockBytes;
  const int n_units = plan.count[static_cast<size_t>(s)];
  const VI idx = vi_load(plan.idx.data() + s * kSbBlocks);
  const int64_t u0 = plan.first[static_cast<size_t>(s)];
  const VF inv127 = vf_set1(1.0f / 127.0f);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const uint8_t* cs = c[r] + s * kSbBytes;
    VI wl[4], wh[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      VI raw;
      if constexpr (TAIL) {
        const int64_t left = valid_bytes - j * kLanes * kBlockBytes;
        raw = left >= kLanes * kBlockBytes ? vi_load(cs + j * kLanes * kBlockBytes)
              : left > 0                  ? vi_loadn(cs + j * kLanes * kBlockBytes, static_cast<int>(left))
                                          : vi_zero();
      } else {
        raw = vi_load(cs + j * kLanes * kBlockBytes);
      }
      decode(table, raw, wl[j], wh[j]);
    }
    const float* su = srow[r] + u0;
    const VF sv = n_units >= kVf || wide ? vf_load(su) : vf_loadn(su, n_units);
    const VF ws = vf_mul(vf_permute(sv, idx), inv127);
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      const int8_t* xb = pp.xr + ((b0 + b) * pp.nsb + s) * kSbCols;
      VI a[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int8_t* xq = xb + j * 2 * kLanes * 16;
        a[j] = dot4(dot4(vi_zero(), wl[j], vi_load(xq)), wh[j], vi_load(xq + kLanes * 16));
      }
      VI isum = reduce4(a[0], a[1], a[2], a[3]);
      const int64_t at = ((b0 + b) * pp.nsb + s) * kSbBlocks;
      if constexpr (kOffsetWeights) isum = vi_sub(isum, vi_load(pp.corr + at));
      const VF scale = vf_mul(vf_load(pp.d + at), ws);
      acc[r][b] = vf_add(acc[r][b], vf_mul(vf_from_i32(isum), scale));
    }
  }
}

// R output rows from o by NB batch rows from b0, over the whole row. The next rows' codes, and
// their scales when read in place, are prefetched a superblock at a time: rows are only a few
// KiB, short for the hardware prefetcher to ramp up on its own, and the scale lines of R rows
// read a few floats at a time at a stride of a row's scales defeat it (measured on Zen 4 at
// batch 1 from DRAM: the scale misses, not the codes, held the product to about half the
// bandwidth the same loop reaches with the scales in cache).
template <int R, int NB>
void q8_tile(const ForwardArgs& p, const Q8Prep& pp, const ScalePlan& plan, const float* const* srow,
             int64_t o, int64_t b0, int64_t row_end) {
  const int64_t row_bytes = packed_row_bytes(p.w.in_features);
  const bool wide = !plan.in_place || (o + R) * plan.units + kVf - 1 <= p.w.num_groups;
  const VI table = make_wtable();
  const uint8_t* c[R];
  VF acc[R][NB];
  for (int r = 0; r < R; ++r) {
    c[r] = p.w.codes + (o + r) * row_bytes;
    for (int b = 0; b < NB; ++b) acc[r][b] = vf_zero();
  }
  // Rows R ahead, clamped to the range (the last tile prefetches its own rows again).
  const int64_t ahead = o + 2 * R <= row_end ? R : 0;
  const char* next = reinterpret_cast<const char*>(c[0] + ahead * row_bytes);
  const int64_t full = pp.blocks / kSbBlocks;
  // The next rows' scales are one contiguous span, covered in equal steps over the superblocks.
  const char* next_scales = plan.in_place ? reinterpret_cast<const char*>(srow[0] + ahead * plan.units) : nullptr;
  const int64_t scale_step = (R * plan.units * 4 + 64 * q8_max(full, 1) - 1) / (64 * q8_max(full, 1)) * 64;
  for (int64_t s = 0; s < full; ++s) {
    for (int r = 0; r < R; ++r) {
      for (int64_t l = 0; l < kSbBytes; l += 64) _mm_prefetch(next + r * row_bytes + s * kSbBytes + l, _MM_HINT_T0);
    }
    if (next_scales != nullptr) {
      for (int64_t l = 0; l < scale_step; l += 64) _mm_prefetch(next_scales + s * scale_step + l, _MM_HINT_T0);
    }
    q8_superblock<R, NB, false>(pp, plan, c, srow, wide, s, b0, table, acc);
  }
  if (full < pp.nsb) q8_superblock<R, NB, true>(pp, plan, c, srow, wide, full, b0, table, acc);
  const int64_t out = p.w.out_features;
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < NB; ++b) {
      float y = vf_reduce_add(acc[r][b]);
      if (p.bias != nullptr) y += p.bias[o + r];
      p.y[(b0 + b) * out + o + r] = y;
    }
  }
}

template <int R, int NB>
void q8_rows(const ForwardArgs& p, const Q8Prep& pp, const ScalePlan& plan, float* sbuf, int64_t row_begin,
             int64_t row_end, int64_t b0) {
  const float* srow[R];
  int64_t o = row_begin;
  for (; o + R <= row_end; o += R) {
    for (int r = 0; r < R; ++r) srow[r] = row_scales(p.w, plan, o + r, sbuf + r * plan.units);
    q8_tile<R, NB>(p, pp, plan, srow, o, b0, row_end);
  }
  for (; o < row_end; ++o) {
    srow[0] = row_scales(p.w, plan, o, sbuf);
    q8_tile<1, NB>(p, pp, plan, srow, o, b0, row_end);
  }
}

// ---------------------------------------------------------------- batched panel path
// From kQ8PanelMinBatch batch rows, the decode is shared by enough batch rows to pay for a
// transposed panel: kPanelRows = kQ8PanelUnits * kVf output rows decoded once into int8 in the
// layout vpdpbusd wants with broadcast activations (int32 lane i = 4 consecutive columns of row
// i), for the whole row length (16 KiB per 512 columns on AVX-512, so an L2-resident panel for
// any real in_features), then MR batch rows x kPanelRows output rows per register tile. Each
// block's int32 sums are exact; the float term and the per-element accumulation run in
// increasing block order, as the scalar specification adds them.
constexpr int kPanelRows = kQ8PanelUnits * kVf;

// Rows [o0, o0 + nrows) of W into panel[((k * 8 + t) * kQ8PanelUnits + u) * kVf + i] (4 bytes
// each: columns 4t..4t+3 of block k of row o0 + u * kVf + i) and their block scales times 1/127
// into wsp[(k * kQ8PanelUnits + u) * kVf + i]. Rows past nrows decode code 0 and scale 0.
void decode_panel(const ForwardArgs& p, const ScalePlan& plan, float* sbuf, int64_t o0, int nrows,
                  int32_t* panel, float* wsp) {
  const int64_t row_bytes = packed_row_bytes(p.w.in_features);
  const int64_t blocks = blocks_per_row(p.w.in_features);
  const VI table = make_wtable();
  for (int u = 0; u < kQ8PanelUnits; ++u) {
    const int vr = static_cast<int>(q8_min(kVf, q8_min(nrows - u * kVf, kVf)));
    for (int i = 0; i < kVf; ++i) {
      const int64_t r = o0 + u * kVf + i;
      const float* su = i < vr ? row_scales(p.w, plan, r, sbuf) : nullptr;
      for (int64_t k = 0; k < blocks; ++k) {
        const int64_t unit = plan.per_block ? k : k / (p.w.group_size / kBlockCols);
        wsp[(k * kQ8PanelUnits + u) * kVf + i] = i < vr ? su[unit] * (1.0f / 127.0f) : 0.0f;
      }
    }
    // kLanes blocks at a time: kVf rows x kVf dwords of raw codes, transposed so that vector q
    // holds dword q % 4 of block q / 4 of every row; its low nibbles are columns 4 (q % 4) + 0..3
    // and its high nibbles columns 16 + 4 (q % 4) + 0..3 of that block.
    for (int64_t k0 = 0; k0 < blocks; k0 += kLanes) {
      const int bytes = static_cast<int>(q8_min(kLanes, blocks - k0) * kBlockBytes);
      VI t[kVf];
      for (int i = 0; i < kVf; ++i) {
        const uint8_t* src = p.w.codes + (o0 + u * kVf + i) * row_bytes + k0 * kBlockBytes;
        t[i] = i >= vr ? vi_zero() : bytes == kLanes * kBlockBytes ? vi_load(src) : vi_loadn(src, bytes);
      }
      transpose_dwords(t);
      for (int q = 0; q < kVf; ++q) {
        const int64_t k = k0 + q / 4;
        if (k >= blocks) break;
        VI lo, hi;
        decode(table, t[q], lo, hi);
        vi_store(panel + ((k * 8 + q % 4) * kQ8PanelUnits + u) * kVf, lo);
        vi_store(panel + ((k * 8 + q % 4 + 4) * kQ8PanelUnits + u) * kVf, hi);
      }
    }
  }
}

template <int MR>
void panel_tile(const ForwardArgs& p, const int32_t* panel, const float* wsp, int64_t o0, int nrows, int64_t b0) {
  constexpr int U = kQ8PanelUnits;
  const int64_t cols = padded_cols(p.w.in_features), blocks = cols / kQ8Block;
  const int8_t* xq[MR];
  for (int b = 0; b < MR; ++b) xq[b] = p.x_q8 + (b0 + b) * cols;
  VF acc[MR][U];
  for (int b = 0; b < MR; ++b)
    for (int u = 0; u < U; ++u) acc[b][u] = vf_zero();
  for (int64_t k = 0; k < blocks; ++k) {
    VI a[MR][U];
    for (int b = 0; b < MR; ++b) {
      // With offset weights each block sum carries 128 * sum(q): start from its negation.
      const VI init = kOffsetWeights ? vi_set1(-128 * p.x_q8_sum[(b0 + b) * blocks + k]) : vi_zero();
      for (int u = 0; u < U; ++u) a[b][u] = init;
    }
    const int32_t* pk = panel + k * 8 * U * kVf;
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      VI w[U];
      for (int u = 0; u < U; ++u) w[u] = vi_load(pk + (t * U + u) * kVf);
#pragma GCC unroll 12
      for (int b = 0; b < MR; ++b) {
        int32_t x4;
        std::memcpy(&x4, xq[b] + k * kQ8Block + 4 * t, sizeof x4);
        const VI xb = vi_set1(x4);
        for (int u = 0; u < U; ++u) a[b][u] = dot4(a[b][u], w[u], xb);
      }
    }
    VF ws[U];
    for (int u = 0; u < U; ++u) ws[u] = vf_load(wsp + (k * U + u) * kVf);
    for (int b = 0; b < MR; ++b) {
      const VF d = vf_set1(p.x_q8_scale[(b0 + b) * blocks + k]);
      for (int u = 0; u < U; ++u) acc[b][u] = vf_add(acc[b][u], vf_mul(vf_from_i32(a[b][u]), vf_mul(d, ws[u])));
    }
  }
  const int64_t out = p.w.out_features;
  for (int u = 0; u < U; ++u) {
    const int n = static_cast<int>(q8_min(kVf, nrows - u * kVf));
    if (n <= 0) continue;
    const int64_t o = o0 + u * kVf;
    const VF bias = p.bias == nullptr ? vf_zero() : n == kVf ? vf_load(p.bias + o) : vf_loadn(p.bias + o, n);
    for (int b = 0; b < MR; ++b) {
      const VF y = p.bias == nullptr ? acc[b][u] : vf_add(acc[b][u], bias);
      float* dst = p.y + (b0 + b) * out + o;
      if (n == kVf) {
        vf_store(dst, y);
      } else {
        vf_storen(dst, y, n);
      }
    }
  }
}

template <int MR>
void panel_tile_n(int mr, const ForwardArgs& p, const int32_t* panel, const float* wsp, int64_t o0, int nrows,
                  int64_t b0) {
  if constexpr (MR > 0) {
    if (mr == MR) return panel_tile<MR>(p, panel, wsp, o0, nrows, b0);
    panel_tile_n<MR - 1>(mr, p, panel, wsp, o0, nrows, b0);
  }
}

void gemm_panel(const ForwardArgs& p, const ScalePlan& plan, float* sbuf, int64_t row_begin, int64_t row_end) {
  const int64_t blocks = blocks_per_row(p.w.in_features);
  int32_t* panel = static_cast<int32_t*>(q8_scratch(4, static_cast<size_t>(blocks * 8 * kPanelRows) * sizeof(int32_t)));
  float* wsp = static_cast<float*>(q8_scratch(5, static_cast<size_t>(blocks * kPanelRows) * sizeof(float)));
  for (int64_t o0 = row_begin; o0 < row_end; o0 += kPanelRows) {
    const int nrows = static_cast<int>(q8_min(kPanelRows, row_end - o0));
    decode_panel(p, plan, sbuf, o0, nrows, panel, wsp);
    for (int64_t b0 = 0; b0 < p.batch; b0 += kQ8PanelMr) {
      panel_tile_n<kQ8PanelMr>(static_cast<int>(q8_min(kQ8PanelMr, p.batch - b0)), p, panel, wsp, o0, nrows, b0);
    }
  }
}

void gemm_nf4_q8(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  const int64_t blocks = blocks_per_row(p.w.in_features);
  const int64_t nsb = (blocks + kSbBlocks - 1) / kSbBlocks;
  ScalePlan& plan = thread_plan();
  make_plan(p.w, blocks, nsb, plan);
  // Scale rows are read a whole vector at a time: pad the scratch so the last one stays inside.
  float* sbuf = static_cast<float*>(q8_scratch(3, sizeof(float) * static_cast<size_t>(kQ8MaxRows * (plan.units + kVf))));
  if (p.batch >= kQ8PanelMinBatch) return gemm_panel(p, plan, sbuf, row_begin, row_end);
  Q8Prep pp;
  prepare(p, blocks, nsb, pp);
  if (p.batch == 1) return q8_rows<kQ8Rows1, 1>(p, pp, plan, sbuf, row_begin, row_end, 0);
  for (int64_t g0 = 0; g0 < p.batch; g0 += kBatchGroup) {
    const int64_t g1 = q8_min(p.batch, g0 + kBatchGroup);
    int64_t b0 = g0;
    for (; b0 + kQ8Nb <= g1; b0 += kQ8Nb) q8_rows<kQ8RowsNb, kQ8Nb>(p, pp, plan, sbuf, row_begin, row_end, b0);
    for (; b0 < g1; ++b0) q8_rows<kQ8RowsNb, 1>(p, pp, plan, sbuf, row_begin, row_end, b0);
  }
}
