// The x86 kernel bodies, written once over a 16-float vector type `F32x16` and included by
// x86_avx2.cpp and x86_avx512.cpp inside their target regions and anonymous namespaces, so each
// instruction set compiles its own internal-linkage copy (as Highway re-includes its -inl.h per
// target) and no inline function is ever shared with a baseline translation unit. No include
// guard on purpose: every ISA file includes it once. The including file provides F32x16 and its
// operations (f_zero, f_set1, f_load, f_loadn, f_store, f_storen, f_fma, f_add, f_mul, f_div,
// f_max, f_min, f_abs, f_reduce_add, f_reduce_max), Nf4Table with make_table(), decode_block(),
// decode_half(), decode_block_gemv() with gemv_x(), lookup_bits<S>(), transpose16(),
// encode_block(), the tile constants
// kPanelUnits, kMaxMr, kGemvRows, kSmallBatch, kSmallBatchTile and kSmallRows, and the baseline
// helpers scratch(), imin(), imax() and fmaxf_().
//
// Shapes of the work: dequantization, quantization and the batch-1 forward stream the packed
// rows once, decoding in registers; so do batches up to kSmallBatch when groups align with
// 32-column blocks. Larger batches decode a panel of kPanelRows rows by kKc columns into a
// transposed fp32 scratch once and reuse it for every batch row through a kMaxMr x kPanelRows
// register tile, at fp32 FMA throughput. Every output element is one FMA chain over the
// columns in ascending order (then the LoRA term and bias), whatever range or tile it is in.

// Columns of one GEMM K-chunk. The decoded panel (kPanelRows x kKc floats, 64 KiB on AVX-512)
// and the packed x of the chunk (up to 256 x kKc floats) live in L2; the register tile reads two
// panel lines per 12-24 FMAs, little enough to stream from there. Measured on this machine,
// 128 and 256 were slower (more partial-sum round trips through y), 1024 no faster.
constexpr int64_t kKc = 512;
constexpr int kPanelRows = 16 * kPanelUnits;

// Groups that never straddle a row or a 32-column block: the layout of every real model, and
// the one where a scale can be applied once per group instead of once per element.
bool aligned_groups(const Nf4Weight& w) {
  return w.group_size % kBlockCols == 0 && w.in_features % w.group_size == 0;
}

// Scales of columns [c0, c0 + n) of row r, n <= 16; lanes past n are 0.
F32x16 lane_scales(const Nf4Weight& w, int64_t r, int64_t c0, int n) {
  const int64_t flat = r * w.in_features + c0;
  const int64_t g0 = flat / w.group_size;
  const int64_t g1 = (flat + n - 1) / w.group_size;
  if (g0 == g1) return f_set1(group_scale(w, g0));
  alignas(64) float s[16] = {};
  for (int i = 0; i < n; ++i) s[i] = group_scale(w, (flat + i) / w.group_size);
  return f_load(s);
}

float dot(const float* a, const float* b, int64_t n) {
  F32x16 acc[4] = {f_zero(), f_zero(), f_zero(), f_zero()};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    for (int j = 0; j < 4; ++j) acc[j] = f_fma(f_load(a + i + 16 * j), f_load(b + i + 16 * j), acc[j]);
  }
  for (; i < n; i += 16) {
    const int m = static_cast<int>(imin(16, n - i));
    acc[0] = f_fma(f_loadn(a + i, m), f_loadn(b + i, m), acc[0]);
  }
  return f_reduce_add(f_add(f_add(acc[0], acc[1]), f_add(acc[2], acc[3])));
}

void group_absmax(const float* w, int64_t n_total, int64_t group_size, int64_t g_begin,
                  int64_t g_end, float* absmax) {
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t lo = g * group_size;
    const int64_t hi = imin(lo + group_size, n_total);
    F32x16 m = f_zero();
    // abs(x) first: a NaN element then leaves m unchanged, as std::max(m, fabs(x)) does.
    for (int64_t i = lo; i < hi; i += 16) m = f_max(f_abs(f_loadn(w + i, static_cast<int>(imin(16, hi - i)))), m);
    absmax[g - g_begin] = f_reduce_max(m);
  }
}

void quantize_rows(const float* w, int64_t in_features, int64_t n_total, int64_t group_size,
                   const float* absmax, int64_t row_begin, int64_t row_end, uint8_t* codes) {
  const int64_t row_bytes = packed_row_bytes(in_features);
  const int64_t last_group = (n_total - 1) / group_size;
  const bool last_partial = (n_total % group_size) != 0;
  const F32x16 lo = f_set1(-1.0f), hi = f_set1(1.0f);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* src = w + r * in_features;
    uint8_t* dst = codes + r * row_bytes;
    for (int64_t blk = 0; blk * kBlockCols < in_features; ++blk) {
      F32x16 v[2];
      for (int h = 0; h < 2; ++h) {
        const int64_t c0 = blk * kBlockCols + 16 * h;
        const int n = static_cast<int>(imax(0, imin(16, in_features - c0)));
        if (n == 0) {
          v[h] = f_zero();  // padding: 0.0 is nearest to code 7
          continue;
        }
        const int64_t flat = r * in_features + c0;
        const int64_t g0 = flat / group_size;
        const F32x16 x = f_loadn(src + c0, n);
        if (g0 == (flat + n - 1) / group_size) {
          const float m = fmaxf_(absmax[g0], kMinAbsmax);
          v[h] = (g0 == last_group && last_partial) ? f_div(x, f_set1(m)) : f_mul(x, f_set1(1.0f / m));
        } else {
          alignas(64) float t[16] = {};
          for (int i = 0; i < n; ++i) {
            const int64_t g = (flat + i) / group_size;
            const float m = fmaxf_(absmax[g], kMinAbsmax);
            t[i] = (g == last_group && last_partial) ? src[c0 + i] / m : src[c0 + i] * (1.0f / m);
          }
          v[h] = f_load(t);
        }
        v[h] = f_min(f_max(v[h], lo), hi);
      }
      encode_block(v[0], v[1], dst + blk * kBlockBytes);
    }
  }
}

void dequantize_rows(const Nf4Weight& w, int64_t row_begin, int64_t row_end, float* out) {
  const Nf4Table tab = make_table();
  const int64_t in = w.in_features;
  const int64_t row_bytes = packed_row_bytes(in);
  const bool aligned = aligned_groups(w);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* src = w.codes + r * row_bytes;
    float* dst = out + (r - row_begin) * in;
    if (aligned) {
      const int64_t bpg = w.group_size / kBlockCols, gpr = in / w.group_size;
      for (int64_t g = 0; g < gpr; ++g) {
        const F32x16 s = f_set1(group_scale(w, r * gpr + g));
        for (int64_t blk = g * bpg; blk < (g + 1) * bpg; ++blk) {
          F32x16 d0, d1;
          decode_block(tab, src + blk * kBlockBytes, d0, d1);
          f_store(dst + blk * kBlockCols, f_mul(d0, s));
          f_store(dst + blk * kBlockCols + 16, f_mul(d1, s));
        }
      }
      continue;
    }
    for (int64_t c0 = 0; c0 < in; c0 += 16) {
      const int n = static_cast<int>(imin(16, in - c0));
      const F32x16 d = decode_half(tab, src + (c0 / kBlockCols) * kBlockBytes, (c0 / 16) & 1);
      f_storen(dst + c0, f_mul(d, lane_scales(w, r, c0, n)), n);
    }
  }
}

// acc + scaling * (xa[b] . B[o]) + bias[o], in the scalar specification's order.
float finish(const ForwardArgs& p, int64_t b, int64_t o, float acc) {
  if (p.rank > 0) acc += p.scaling * dot(p.xa + b * p.rank, p.lora_b + o * p.rank, p.rank);
  if (p.bias != nullptr) acc += p.bias[o];
  return acc;
}

// Batch 1, aligned groups, R rows sharing each load of x. Each row keeps one per-group
// accumulator and folds it into its total with one multiply by the group's scale, so a row's
// arithmetic is the same for any R. BPG is the number of 32-column blocks per group when it is
// small enough to unroll (1, 2, 4), else 0 (read from the weight). Rows 4R ahead are prefetched
// one cache line per block step: a row is only 2-8 KiB, too short for the hardware prefetcher to
// ramp up on its own, and one tile ahead was measured a little too close.
template <int R, int BPG>
void gemv_aligned(const ForwardArgs& p, const float* xg, const Nf4Table& tab, int64_t o) {
  const Nf4Weight& w = p.w;
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in);
  const int64_t bpg = BPG > 0 ? BPG : w.group_size / kBlockCols, gpr = in / w.group_size;
  const uint8_t* rows[R];
  F32x16 acc[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = w.codes + (o + r) * row_bytes;
    acc[r] = f_zero();
  }
  const char* next = reinterpret_cast<const char*>(w.codes + (o + 4 * R) * row_bytes);
  const float* x = xg;
  for (int64_t g = 0; g < gpr; ++g) {
    F32x16 sum[R];
    for (int r = 0; r < R; ++r) sum[r] = f_zero();
    for (int64_t j = 0; j < bpg; ++j) {
      for (int l = 0; l < R * kBlockBytes; l += 64) _mm_prefetch(next + l, _MM_HINT_T0);
      next += R * kBlockBytes;
      const F32x16 x0 = f_load(x), x1 = f_load(x + 16);
      x += kBlockCols;
      for (int r = 0; r < R; ++r) {
        F32x16 d0, d1;
        decode_block_gemv(tab, rows[r], d0, d1);
        rows[r] += kBlockBytes;
        sum[r] = f_fma(x1, d1, f_fma(x0, d0, sum[r]));
      }
    }
    if (w.scales != nullptr) {
      for (int r = 0; r < R; ++r) acc[r] = f_fma(sum[r], f_set1(w.scales[(o + r) * gpr + g]), acc[r]);
    } else {
      for (int r = 0; r < R; ++r) acc[r] = f_fma(sum[r], f_set1(group_scale(w, (o + r) * gpr + g)), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) p.y[o + r] = finish(p, 0, o + r, f_reduce_add(acc[r]));
}

template <int BPG>
void gemv_rows(const ForwardArgs& p, const Nf4Table& tab, int64_t row_begin, int64_t row_end) {
  const float* x = gemv_x(p.x, p.w.in_features, scratch(1, static_cast<size_t>(p.w.in_features)));
  int64_t o = row_begin;
  for (; o + kGemvRows <= row_end; o += kGemvRows) gemv_aligned<kGemvRows, BPG>(p, x, tab, o);
  for (; o < row_end; ++o) gemv_aligned<1, BPG>(p, x, tab, o);
}

// Small batches (2 to kSmallBatch rows), aligned groups: a panel would cost as much to decode
// as its FMAs, so R rows are decoded in registers once per block (dequantized exactly: code
// times scale) and used by NB batch rows at a time, each (row, batch row) pair one FMA chain
// over the columns, whatever R and NB are.
template <int R, int NB>
void gemv_small(const ForwardArgs& p, const Nf4Table& tab, int64_t o, int64_t b0) {
  const Nf4Weight& w = p.w;
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in);
  const int64_t bpg = w.group_size / kBlockCols, gpr = in / w.group_size;
  const uint8_t* rows[R];
  F32x16 acc[R][NB];
  for (int r = 0; r < R; ++r) {
    rows[r] = w.codes + (o + r) * row_bytes;
    for (int b = 0; b < NB; ++b) acc[r][b] = f_zero();
  }
  const char* next = reinterpret_cast<const char*>(w.codes + (o + R) * row_bytes);
  const float* x = p.x + b0 * in;
  for (int64_t g = 0; g < gpr; ++g) {
    F32x16 s[R];
    for (int r = 0; r < R; ++r) s[r] = f_set1(group_scale(w, (o + r) * gpr + g));
    for (int64_t blk = g * bpg; blk < (g + 1) * bpg; ++blk) {
      for (int l = 0; l < R * kBlockBytes; l += 64) _mm_prefetch(next + blk * (R * kBlockBytes) + l, _MM_HINT_T0);
      if constexpr (R == 1) {
        // One row: each x vector is used once, so it stays a memory operand of its FMA rather
        // than a register (AVX2's 16 YMM hold the 8 accumulators and the decoded block).
        F32x16 d0, d1;
        decode_block(tab, rows[0] + blk * kBlockBytes, d0, d1);
        d0 = f_mul(d0, s[0]);
        d1 = f_mul(d1, s[0]);
        const float* xb = x + blk * kBlockCols;
        for (int b = 0; b < NB; ++b) acc[0][b] = f_fma(f_load(xb + b * in + 16), d1, f_fma(f_load(xb + b * in), d0, acc[0][b]));
      } else {
        F32x16 x0[NB], x1[NB];
        for (int b = 0; b < NB; ++b) {
          x0[b] = f_load(x + b * in + blk * kBlockCols);
          x1[b] = f_load(x + b * in + blk * kBlockCols + 16);
        }
        for (int r = 0; r < R; ++r) {
          F32x16 d0, d1;
          decode_block(tab, rows[r] + blk * kBlockBytes, d0, d1);
          d0 = f_mul(d0, s[r]);
          d1 = f_mul(d1, s[r]);
          for (int b = 0; b < NB; ++b) acc[r][b] = f_fma(x1[b], d1, f_fma(x0[b], d0, acc[r][b]));
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < NB; ++b) p.y[(b0 + b) * w.out_features + o + r] = finish(p, b0 + b, o + r, f_reduce_add(acc[r][b]));
  }
}

template <int NB>
void gemv_small_rows(const ForwardArgs& p, const Nf4Table& tab, int64_t row_begin, int64_t row_end, int64_t b0) {
  int64_t o = row_begin;
  for (; o + kSmallRows <= row_end; o += kSmallRows) gemv_small<kSmallRows, NB>(p, tab, o, b0);
  for (; o < row_end; ++o) gemv_small<1, NB>(p, tab, o, b0);
}

void gemv_small_batch(const ForwardArgs& p, const Nf4Table& tab, int64_t row_begin, int64_t row_end) {
  for (int64_t b0 = 0; b0 < p.batch; b0 += kSmallBatchTile) {
    switch (imin(kSmallBatchTile, p.batch - b0)) {
      case 1: gemv_small_rows<1>(p, tab, row_begin, row_end, b0); break;
      case 2: gemv_small_rows<2>(p, tab, row_begin, row_end, b0); break;
      case 3: gemv_small_rows<3>(p, tab, row_begin, row_end, b0); break;
      default: gemv_small_rows<4>(p, tab, row_begin, row_end, b0); break;
    }
  }
}

// Batch 1, any group layout: the row is dequantized exactly into scratch, then dotted with x.
void gemv_general(const ForwardArgs& p, int64_t o, float* row) {
  dequantize_rows(p.w, o, o + 1, row);
  p.y[o] = finish(p, 0, o, dot(p.x, row, p.w.in_features));
}

// Rows [o0, o0 + nrows) x columns [k0, k1) of deq(W), transposed into
// panel[(k - k0) * kPanelRows + row]; rows past nrows are zero. k0 is a multiple of 32.
void decode_panel(const Nf4Weight& w, const Nf4Table& tab, int64_t o0, int nrows, int64_t k0,
                  int64_t k1, float* panel) {
  const int64_t row_bytes = packed_row_bytes(w.in_features);
  const bool aligned = aligned_groups(w);
  const int64_t gpr = aligned ? w.in_features / w.group_size : 0;
  for (int64_t kb = k0; kb < k1; kb += 16) {
    const int n = static_cast<int>(imin(16, k1 - kb));
    const int64_t byte = (kb / kBlockCols) * kBlockBytes;
    const int half = static_cast<int>((kb / 16) & 1);
    const int64_t gk = aligned ? kb / w.group_size : 0;
    for (int u = 0; u < kPanelUnits; ++u) {
      F32x16 t[16];
      for (int i = 0; i < 16; ++i) {
        const int row = u * 16 + i;
        if (row >= nrows) {
          t[i] = f_zero();
          continue;
        }
        const int64_t r = o0 + row;
        const F32x16 s = aligned ? f_set1(group_scale(w, r * gpr + gk)) : lane_scales(w, r, kb, n);
        t[i] = f_mul(decode_half(tab, w.codes + r * row_bytes + byte, half), s);
      }
      transpose16(t);
      for (int j = 0; j < n; ++j) f_store(panel + (kb - k0 + j) * kPanelRows + u * 16, t[j]);
    }
  }
}

// decode_panel() for aligned groups, transposing codes instead of floats: the packed bytes of
// 16 rows x 4 blocks are loaded as 16 x 16 32-bit lanes and transposed once, after which lane i
// of vector 4 * blk + d holds bytes 4d..4d+3 of row i's block blk, so every column of the panel
// is one shift and one table lookup away, and each row's scale is one lane of a vector.
void decode_panel_aligned(const Nf4Weight& w, const Nf4Table& tab, int64_t o0, int nrows, int64_t k0,
                          int64_t k1, float* panel) {
  const int64_t row_bytes = packed_row_bytes(w.in_features);
  const int64_t gpr = w.in_features / w.group_size;
  const int64_t g_first = k0 / w.group_size, g_last = (k1 - 1) / w.group_size;
  // Groups of the chunk x 16 rows; gathered first so the vector loads below never wait on the
  // scalar stores that wrote them. Groups are at least 32 columns, so at most kKc / 32 of them.
  alignas(64) float st[kKc / kBlockCols * 16];
  for (int u = 0; u < kPanelUnits; ++u) {
    const int vr = static_cast<int>(imax(0, imin(16, nrows - 16 * u)));
    const int64_t r0 = o0 + 16 * u;
    for (int64_t g = g_first; g <= g_last; ++g) {
      float* sg = st + (g - g_first) * 16;
      for (int i = 0; i < 16; ++i) sg[i] = i < vr ? group_scale(w, (r0 + i) * gpr + g) : 0.0f;
    }
    int64_t gi = -1, group_end = g_first * w.group_size;  // group of the current block, and its end
    for (int64_t kb = k0; kb < k1; kb += 4 * kBlockCols) {
      const int nb = static_cast<int>(imin(4, (k1 - kb) / kBlockCols));
      const uint8_t* src = w.codes + r0 * row_bytes + (kb / kBlockCols) * kBlockBytes;
      // Rows past nrows are not read; their lanes decode code 0 times scale 0.
      F32x16 t[16];
      if (nb == 4) {
        for (int i = 0; i < vr; ++i) t[i] = f_load(reinterpret_cast<const float*>(src + i * row_bytes));
      } else {
        for (int i = 0; i < vr; ++i) t[i] = f_loadn(reinterpret_cast<const float*>(src + i * row_bytes), 4 * nb);
      }
      for (int i = vr; i < 16; ++i) t[i] = f_set1(0.0f);
      transpose16(t);
      for (int blk = 0; blk < nb; ++blk) {
        const int64_t c = kb + blk * kBlockCols;
        if (c >= group_end) {
          ++gi;
          group_end += w.group_size;
        }
        const F32x16 scale = f_load(st + gi * 16);
        float* dst = panel + (c - k0) * kPanelRows + u * 16;
        for (int d = 0; d < 4; ++d) {
          const F32x16 v = t[4 * blk + d];
          float* col = dst + 4 * d * kPanelRows;
          f_store(col + 0 * kPanelRows, f_mul(lookup_bits<0>(tab, v), scale));
          f_store(col + 1 * kPanelRows, f_mul(lookup_bits<8>(tab, v), scale));
          f_store(col + 2 * kPanelRows, f_mul(lookup_bits<16>(tab, v), scale));
          f_store(col + 3 * kPanelRows, f_mul(lookup_bits<24>(tab, v), scale));
          f_store(col + 16 * kPanelRows, f_mul(lookup_bits<4>(tab, v), scale));
          f_store(col + 17 * kPanelRows, f_mul(lookup_bits<12>(tab, v), scale));
          f_store(col + 18 * kPanelRows, f_mul(lookup_bits<20>(tab, v), scale));
          f_store(col + 19 * kPanelRows, f_mul(lookup_bits<28>(tab, v), scale));
        }
      }
    }
  }
}

// The register tile: MR batch rows x kPanelRows output rows, accumulating over one K-chunk into
// y (the partial sums of earlier chunks are read back from y, exactly). xp holds the tile's x
// columns packed k-major (xp[k * kMaxMr + i]), so each step broadcasts from one cache line.
template <int MR>
void micro_tile(const ForwardArgs& p, const float* panel, const float* xp, int64_t kc, int64_t b0,
                int64_t o0, int nrows, bool first, bool last, const float* bt) {
  const int64_t out = p.w.out_features;
  int nu[kPanelUnits];
  for (int u = 0; u < kPanelUnits; ++u) nu[u] = static_cast<int>(imax(0, imin(16, nrows - 16 * u)));
  F32x16 acc[MR][kPanelUnits];
  for (int i = 0; i < MR; ++i) {
    for (int u = 0; u < kPanelUnits; ++u) {
      acc[i][u] = (first || nu[u] == 0) ? f_zero() : f_loadn(p.y + (b0 + i) * out + o0 + 16 * u, nu[u]);
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    F32x16 wv[kPanelUnits];
    for (int u = 0; u < kPanelUnits; ++u) wv[u] = f_load(panel + k * kPanelRows + 16 * u);
    for (int i = 0; i < MR; ++i) {
      const F32x16 xb = f_set1(xp[k * kMaxMr + i]);
      for (int u = 0; u < kPanelUnits; ++u) acc[i][u] = f_fma(wv[u], xb, acc[i][u]);
    }
  }
  if (last) {
    for (int i = 0; i < MR; ++i) {
      if (p.rank > 0) {
        F32x16 l[kPanelUnits];
        for (int u = 0; u < kPanelUnits; ++u) l[u] = f_zero();
        for (int64_t j = 0; j < p.rank; ++j) {
          const F32x16 xa = f_set1(p.xa[(b0 + i) * p.rank + j]);
          for (int u = 0; u < kPanelUnits; ++u) l[u] = f_fma(f_load(bt + j * kPanelRows + 16 * u), xa, l[u]);
        }
        const F32x16 sc = f_set1(p.scaling);
        for (int u = 0; u < kPanelUnits; ++u) acc[i][u] = f_add(acc[i][u], f_mul(sc, l[u]));
      }
      if (p.bias != nullptr) {
        for (int u = 0; u < kPanelUnits; ++u) {
          if (nu[u] > 0) acc[i][u] = f_add(acc[i][u], f_loadn(p.bias + o0 + 16 * u, nu[u]));
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int u = 0; u < kPanelUnits; ++u) {
      if (nu[u] > 0) f_storen(p.y + (b0 + i) * out + o0 + 16 * u, acc[i][u], nu[u]);
    }
  }
}

template <int MR>
void micro_tile_n(int mr, const ForwardArgs& p, const float* panel, const float* xp, int64_t kc, int64_t b0,
                  int64_t o0, int nrows, bool first, bool last, const float* bt) {
  if constexpr (MR > 0) {
    if (mr == MR) return micro_tile<MR>(p, panel, xp, kc, b0, o0, nrows, first, last, bt);
    micro_tile_n<MR - 1>(mr, p, panel, xp, kc, b0, o0, nrows, first, last, bt);
  }
}

// Columns [k0, k0 + kc) of x, k-major per tile of kMaxMr batch rows: xpack[t][k][i]. Each
// thread does this once per K-chunk of every row range it is handed, so it is a transpose of
// 16 x 16 blocks rather than a strided scalar copy.
void pack_x(const ForwardArgs& p, int64_t k0, int64_t kc, int64_t tiles, float* xpack) {
  const int64_t in = p.w.in_features;
  for (int64_t t = 0; t < tiles; ++t) {
    const int mr = static_cast<int>(imin(kMaxMr, p.batch - t * kMaxMr));
    const float* src = p.x + t * kMaxMr * in + k0;
    float* dst = xpack + t * kMaxMr * kc;
    for (int64_t k = 0; k < kc; k += 16) {
      const int n = static_cast<int>(imin(16, kc - k));
      F32x16 r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = i >= mr ? f_zero() : n == 16 ? f_load(src + i * in + k) : f_loadn(src + i * in + k, n);
      }
      transpose16(r);
      for (int j = 0; j < n; ++j) f_storen(dst + (k + j) * kMaxMr, r[j], kMaxMr);
    }
  }
}

// Codes (and plain scales) of columns [k0, k1) of `count` rows from `first`: the next GEMM panel,
// one short piece of each of its rows, a pattern no hardware prefetcher follows and otherwise a
// cache miss per row while decoding. The caller spreads them over the register tiles of the
// current panel, as a burst of 64 prefetches stalls on the fill buffers.
void prefetch_rows(const Nf4Weight& w, int64_t first, int64_t count, int64_t k0, int64_t k1) {
  const int64_t row_bytes = packed_row_bytes(w.in_features);
  const int64_t b0 = (k0 / kBlockCols) * kBlockBytes, b1 = ((k1 + kBlockCols - 1) / kBlockCols) * kBlockBytes;
  const bool scales = aligned_groups(w) && w.scales != nullptr;
  const int64_t gpr = w.in_features / w.group_size;
  for (int64_t r = first; r < first + count; ++r) {
    const char* row = reinterpret_cast<const char*>(w.codes + r * row_bytes);
    for (int64_t b = b0; b < b1; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
    if (scales) {
      _mm_prefetch(reinterpret_cast<const char*>(w.scales + r * gpr + k0 / w.group_size), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w.scales + r * gpr + (k1 - 1) / w.group_size), _MM_HINT_T0);
    }
  }
}

// K-chunks outermost: the packed x columns of a chunk are made once and stay in L2 while every
// panel of the row range is decoded and multiplied; y carries the partial sums between chunks.
void gemm(const ForwardArgs& p, const Nf4Table& tab, int64_t row_begin, int64_t row_end) {
  const int64_t in = p.w.in_features;
  const int64_t tiles = (p.batch + kMaxMr - 1) / kMaxMr;
  const bool aligned = aligned_groups(p.w);
  float* panel = scratch(0, static_cast<size_t>(kKc * kPanelRows));
  float* bt = scratch(1, static_cast<size_t>(imax(p.rank, 1) * kPanelRows));
  float* xpack = scratch(2, static_cast<size_t>(tiles * kMaxMr * kKc));
  for (int64_t k0 = 0; k0 < in; k0 += kKc) {
    const int64_t k1 = imin(in, k0 + kKc), kc = k1 - k0;
    const bool first = k0 == 0, last = k1 == in;
    pack_x(p, k0, kc, tiles, xpack);
    for (int64_t o0 = row_begin; o0 < row_end; o0 += kPanelRows) {
      const int nrows = static_cast<int>(imin(kPanelRows, row_end - o0));
      const int64_t next_rows = imax(0, imin(kPanelRows, row_end - o0 - kPanelRows));
      const int64_t rows_per_tile = (next_rows + tiles - 1) / tiles;
      if (aligned) {
        decode_panel_aligned(p.w, tab, o0, nrows, k0, k1, panel);
      } else {
        decode_panel(p.w, tab, o0, nrows, k0, k1, panel);
      }
      if (last && p.rank > 0) {
        for (int64_t j = 0; j < p.rank; ++j) {
          for (int i = 0; i < kPanelRows; ++i) bt[j * kPanelRows + i] = i < nrows ? p.lora_b[(o0 + i) * p.rank + j] : 0.0f;
        }
      }
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t i0 = imin(next_rows, t * rows_per_tile);
        prefetch_rows(p.w, o0 + kPanelRows + i0, imin(next_rows, i0 + rows_per_tile) - i0, k0, k1);
        const int mr = static_cast<int>(imin(kMaxMr, p.batch - t * kMaxMr));
        micro_tile_n<kMaxMr>(mr, p, panel, xpack + t * kMaxMr * kc, kc, t * kMaxMr, o0, nrows, first, last, bt);
      }
    }
  }
}

void forward_rows(const ForwardArgs& p, int64_t row_begin, int64_t row_end) {
  const Nf4Table tab = make_table();
  if (p.batch > 1 && p.batch <= kSmallBatch && aligned_groups(p.w)) return gemv_small_batch(p, tab, row_begin, row_end);
  if (p.batch != 1) return gemm(p, tab, row_begin, row_end);
  if (aligned_groups(p.w)) {
    switch (p.w.group_size) {
      case 32: return gemv_rows<1>(p, tab, row_begin, row_end);
      case 64: return gemv_rows<2>(p, tab, row_begin, row_end);
      case 128: return gemv_rows<4>(p, tab, row_begin, row_end);
      default: return gemv_rows<0>(p, tab, row_begin, row_end);
    }
  }
  float* row = scratch(0, static_cast<size_t>(p.w.in_features));
  for (int64_t o = row_begin; o < row_end; ++o) gemv_general(p, o, row);
}
