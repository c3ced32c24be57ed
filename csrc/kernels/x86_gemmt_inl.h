// The backward's transposed product dx = g @ deq(W) (KernelTable::gemm_nf4t_f32) over a row
// range of W and a column range, written once over F32x16 and included by x86_avx2.cpp and
// x86_avx512.cpp inside their target regions and anonymous namespaces, after x86_kernels_inl.h
// (whose decode helpers, lane_scales(), aligned_groups(), transpose16() and tile constants it
// uses). No include guard: each ISA file includes it once, into its own namespace.
//
// Every dx element is one fused multiply-add chain over the rows o of the range in increasing
// order, starting from zero, whatever column range, tile or row group it is computed in (partial
// sums go through dx exactly), so results do not depend on the thread count. Batch 1 (a chunk of
// one row) adds c * (g[o] * scale) per row, the scale folded into the broadcast of g; larger
// chunks add deq(W)[o, i] * g[b, o] with deq = c * scale exactly as dequantize_rows gives it.
// Both are within (rows + 2) roundings of the exact sum.

// Columns handed to the kernel start on a multiple of this (a whole batch-1 tile of the general
// layout), so the drivers' column split never cuts a tile (results do not depend on it anyway).
constexpr int kTGemvUnits = kPanelUnits == 2 ? 16 : 4;
constexpr int64_t kTGemvCols = 16 * kTGemvUnits;
constexpr int64_t kGemmTColBlock = kTGemvCols;
// Batch 1, aligned groups: rows of W read together, as the forward's batch 1 reads them, one
// load and store of the partial sums per block for all of them (AVX-512 has the registers for
// 8 rows' scaled g; AVX2, whose F32x16 is two of its 16 registers, for 2).
constexpr int kTStreamRows = kPanelUnits == 2 ? 8 : 2;
// Batch 1, other layouts: the rows of a slab go through each column tile in turn, the tile's
// accumulators loaded from and stored to dx once per slab. 64 rows measured faster than 16 and
// 32 (per-tile setup) and than 128 and 256 on 14336 x 4096 (the slab and its prefetch no longer
// fit in L2 beside each other).
constexpr int64_t kTSlab = 64;
// Batches: the decoded panel holds kKc rows of W by kTPanelCols columns (64 KiB on AVX-512, like
// the forward's), row-major as the codes already are, and a kMaxMr x kTPanelCols register tile
// of dx walks down it.
constexpr int kTPanelCols = 16 * kPanelUnits;
// Rows ahead that the loops prefetch. The panel reads 16-64 bytes per row, rows row_bytes apart
// (a page or more in wide layers, where hardware prefetchers stop); 8, 16 and 32 rows measured
// the same on this machine's Zen 4. The batch-1 row groups prefetch their rows this far ahead,
// as the forward's batch 1 does (16 rows).
constexpr int64_t kTAhead = 16;

// Batch 1, aligned groups: rows [o, o + R) across the whole column range, R contiguous streams
// with the rows kTAhead ahead prefetched at the same pace, the partial sums in dx (in L1 up to
// 8192 columns) loaded and stored once per block. The sums stay in the lane order of
// decode_block_gemv() (lane 4l + p holds column 4p + l of a 16-column half) until
// gemvt_aligned() restores column order; aligned rows have whole 16-column units.
template <int R>
void gemvt_rows(const TransposedArgs& p, const Nf4Table& tab, int64_t o, int64_t col_begin, int64_t col_end) {
  const Nf4Weight& w = p.w;
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in), gpr = in / w.group_size;
  const int64_t bpg = w.group_size / kBlockCols;
  const bool first = o == p.row_begin;
  const uint8_t* rows[R];
  float go[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = w.codes + (o + r) * row_bytes + (col_begin / kBlockCols) * kBlockBytes;
    go[r] = p.g[o + r];
  }
  const bool ahead = o + R + kTAhead <= p.row_end;
  const char* next = reinterpret_cast<const char*>(rows[0] + kTAhead * row_bytes);
  constexpr int kStepBytes = R * kBlockBytes >= 64 ? R * kBlockBytes : 64;
  float* dx = p.dx + col_begin;
  int64_t j = col_begin / kBlockCols;
  const int64_t jend = (col_end + kBlockCols - 1) / kBlockCols;
  while (j < jend) {
    const int64_t grp = j / bpg, jg = imin(jend, (grp + 1) * bpg);
    F32x16 gs[R];
    for (int r = 0; r < R; ++r) gs[r] = f_set1(go[r] * group_scale(w, (o + r) * gpr + grp));
    for (; j < jg; ++j, dx += kBlockCols, next += kStepBytes) {
      if (ahead) {
        for (int l = 0; l < R * kBlockBytes; l += 64) _mm_prefetch(next + l, _MM_HINT_T0);
      }
      F32x16 a0 = first ? f_zero() : f_load(dx), a1 = first ? f_zero() : f_load(dx + 16);
      for (int r = 0; r < R; ++r) {
        F32x16 d0, d1;
        decode_block_gemv(tab, rows[r], d0, d1);
        rows[r] += kBlockBytes;
        a0 = f_fma(d0, gs[r], a0);
        a1 = f_fma(d1, gs[r], a1);
      }
      f_store(dx, a0);
      f_store(dx + 16, a1);
    }
  }
}

void gemvt_aligned(const TransposedArgs& p, const Nf4Table& tab, int64_t col_begin, int64_t col_end) {
  int64_t o = p.row_begin;
  for (; o + kTStreamRows <= p.row_end; o += kTStreamRows) gemvt_rows<kTStreamRows>(p, tab, o, col_begin, col_end);
  for (; o + kGemvRows <= p.row_end; o += kGemvRows) gemvt_rows<kGemvRows>(p, tab, o, col_begin, col_end);
  for (; o < p.row_end; ++o) gemvt_rows<1>(p, tab, o, col_begin, col_end);
  alignas(64) float natural[16];
  for (int64_t c = col_begin; c < col_end; c += 16) {
    const float* v = gemv_x(p.dx + c, 16, natural);
    if (v != p.dx + c) f_store(p.dx + c, f_load(v));
  }
}

// Batch 1, any group layout: rows [o0, o1) of one slab through NB blocks (NB * 32 columns from
// c0, a multiple of 32), decoded in column order and scaled lane by lane; the same columns
// kTAhead rows ahead are prefetched.
template <int NB>
void gemvt_tile(const TransposedArgs& p, const Nf4Table& tab, int64_t c0, int64_t c1, int64_t o0, int64_t o1) {
  const Nf4Weight& w = p.w;
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in);
  const bool first = o0 == p.row_begin;
  F32x16 acc[2 * NB];
  for (int u = 0; u < 2 * NB; ++u) {
    const int n = static_cast<int>(imax(0, imin(16, c1 - c0 - 16 * u)));
    acc[u] = first || n == 0 ? f_zero() : f_loadn(p.dx + c0 + 16 * u, n);
  }
  const uint8_t* src = w.codes + o0 * row_bytes + (c0 / kBlockCols) * kBlockBytes;
  for (int64_t o = o0; o < o1; ++o, src += row_bytes) {
    if (o + kTAhead < p.row_end) {
      const char* next = reinterpret_cast<const char*>(src + kTAhead * row_bytes);
      for (int l = 0; l < NB * kBlockBytes; l += 64) _mm_prefetch(next + l, _MM_HINT_T0);
    }
    const F32x16 gv = f_set1(p.g[o]);
    for (int j = 0; j < NB; ++j) {
      F32x16 d0, d1;
      decode_block(tab, src + j * kBlockBytes, d0, d1);
      const int64_t c = c0 + j * kBlockCols;
      const int n0 = static_cast<int>(imax(0, imin(16, in - c)));
      const int n1 = static_cast<int>(imax(0, imin(16, in - c - 16)));
      const F32x16 s0 = n0 > 0 ? f_mul(gv, lane_scales(w, o, c, n0)) : f_zero();
      const F32x16 s1 = n1 > 0 ? f_mul(gv, lane_scales(w, o, c + 16, n1)) : f_zero();
      acc[2 * j] = f_fma(d0, s0, acc[2 * j]);
      acc[2 * j + 1] = f_fma(d1, s1, acc[2 * j + 1]);
    }
  }
  for (int u = 0; u < 2 * NB; ++u) {
    const int n = static_cast<int>(imax(0, imin(16, c1 - c0 - 16 * u)));
    if (n == 0) break;
    f_storen(p.dx + c0 + 16 * u, acc[u], n);
  }
}

template <int NB>
void gemvt_tile_n(int nb, const TransposedArgs& p, const Nf4Table& tab, int64_t c0, int64_t c1, int64_t o0,
                  int64_t o1) {
  if constexpr (NB > 0) {
    if (nb == NB) return gemvt_tile<NB>(p, tab, c0, c1, o0, o1);
    gemvt_tile_n<NB - 1>(nb, p, tab, c0, c1, o0, o1);
  }
}

void gemvt_general(const TransposedArgs& p, const Nf4Table& tab, int64_t col_begin, int64_t col_end) {
  for (int64_t o0 = p.row_begin; o0 < p.row_end; o0 += kTSlab) {
    const int64_t o1 = imin(p.row_end, o0 + kTSlab);
    for (int64_t c0 = col_begin; c0 < col_end; c0 += kTGemvCols) {
      const int64_t c1 = imin(col_end, c0 + kTGemvCols);
      const int nb = static_cast<int>((c1 - c0 + kBlockCols - 1) / kBlockCols);
      gemvt_tile_n<kTGemvUnits / 2>(nb, p, tab, c0, c1, o0, o1);
    }
  }
}

// Rows [o0, o0 + kc) of deq(W), columns [cb, cb + kTPanelCols) (cb a multiple of 16, inside the
// padded row), into panel[k * kTPanelCols + j]: dequantized exactly as dequantize_rows does
// (code times scale, one rounding). Columns past in_features decode padding, 0.
void decode_panel_t(const Nf4Weight& w, const Nf4Table& tab, int64_t o0, int64_t kc, int64_t cb,
                    float* panel) {
  const int64_t in = w.in_features, row_bytes = packed_row_bytes(in);
  const bool aligned = aligned_groups(w);
  const int64_t gpr = aligned ? in / w.group_size : 0, gk = aligned ? cb / w.group_size : 0;
  const uint8_t* src = w.codes + o0 * row_bytes + (cb / kBlockCols) * kBlockBytes;
  const int half = static_cast<int>((cb / 16) & 1);
  for (int64_t k = 0; k < kc; ++k, src += row_bytes) {
    if (k + kTAhead < kc) _mm_prefetch(reinterpret_cast<const char*>(src + kTAhead * row_bytes), _MM_HINT_T0);
    const int64_t r = o0 + k;
    F32x16 d[kPanelUnits];
    if constexpr (kPanelUnits == 2) {
      decode_block(tab, src, d[0], d[1]);
    } else {
      d[0] = decode_half(tab, src, half);
    }
    for (int u = 0; u < kPanelUnits; ++u) {
      F32x16 s;
      if (aligned) {
        s = f_set1(group_scale(w, r * gpr + gk));
      } else {
        const int n = static_cast<int>(imax(0, imin(16, in - cb - 16 * u)));
        s = n > 0 ? lane_scales(w, r, cb + 16 * u, n) : f_zero();
      }
      f_store(panel + k * kTPanelCols + 16 * u, f_mul(d[u], s));
    }
  }
}

// dx[b0 + i, cb + j] for MR batch rows and the panel's columns (n of them valid), over the kc
// panel rows; gp holds g of the tile's rows k-major (gp[k * kMaxMr + i]). The partial sums of
// earlier row chunks are read back from dx, exactly.
template <int MR>
void micro_tile_t(const float* panel, const float* gp, int64_t kc, float* dx, int64_t ldx, int n, bool first) {
  int nu[kPanelUnits];
  for (int u = 0; u < kPanelUnits; ++u) nu[u] = static_cast<int>(imax(0, imin(16, n - 16 * u)));
  F32x16 acc[MR][kPanelUnits];
  for (int i = 0; i < MR; ++i) {
    for (int u = 0; u < kPanelUnits; ++u) {
      acc[i][u] = (first || nu[u] == 0) ? f_zero() : f_loadn(dx + i * ldx + 16 * u, nu[u]);
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    F32x16 wv[kPanelUnits];
    for (int u = 0; u < kPanelUnits; ++u) wv[u] = f_load(panel + k * kTPanelCols + 16 * u);
    for (int i = 0; i < MR; ++i) {
      const F32x16 gb = f_set1(gp[k * kMaxMr + i]);
      for (int u = 0; u < kPanelUnits; ++u) acc[i][u] = f_fma(wv[u], gb, acc[i][u]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int u = 0; u < kPanelUnits; ++u) {
      if (nu[u] > 0) f_storen(dx + i * ldx + 16 * u, acc[i][u], nu[u]);
    }
  }
}

template <int MR>
void micro_tile_t_n(int mr, const float* panel, const float* gp, int64_t kc, float* dx, int64_t ldx, int n,
                    bool first) {
  if constexpr (MR > 0) {
    if (mr == MR) return micro_tile_t<MR>(panel, gp, kc, dx, ldx, n, first);
    micro_tile_t_n<MR - 1>(mr, panel, gp, kc, dx, ldx, n, first);
  }
}

// Columns [k0, k0 + kc) of the batch x ld matrix g, k-major per tile of kMaxMr rows:
// gpack[t][k][i], by 16 x 16 transposes.
void pack_g(const float* g, int64_t ld, int64_t batch, int64_t k0, int64_t kc, float* gpack) {
  const int64_t tiles = (batch + kMaxMr - 1) / kMaxMr;
  for (int64_t t = 0; t < tiles; ++t) {
    const int mr = static_cast<int>(imin(kMaxMr, batch - t * kMaxMr));
    const float* src = g + t * kMaxMr * ld + k0;
    float* dst = gpack + t * kMaxMr * kc;
    for (int64_t k = 0; k < kc; k += 16) {
      const int n = static_cast<int>(imin(16, kc - k));
      F32x16 r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = i >= mr ? f_zero() : n == 16 ? f_load(src + i * ld + k) : f_loadn(src + i * ld + k, n);
      }
      transpose16(r);
      for (int j = 0; j < n; ++j) f_storen(dst + (k + j) * kMaxMr, r[j], kMaxMr);
    }
  }
}

// Row chunks of W outermost: the packed g of a chunk is made once and stays in L2 while every
// panel of the column range is decoded and multiplied; dx carries the partial sums.
void gemmt(const TransposedArgs& p, const Nf4Table& tab, int64_t col_begin, int64_t col_end) {
  const int64_t in = p.w.in_features, out = p.w.out_features;
  const int64_t tiles = (p.batch + kMaxMr - 1) / kMaxMr;
  float* panel = scratch(0, static_cast<size_t>(kKc * kTPanelCols));
  float* gpack = scratch(2, static_cast<size_t>(tiles * kMaxMr * kKc));
  for (int64_t o0 = p.row_begin; o0 < p.row_end; o0 += kKc) {
    const int64_t kc = imin(kKc, p.row_end - o0);
    pack_g(p.g, out, p.batch, o0, kc, gpack);
    for (int64_t cb = col_begin; cb < col_end; cb += kTPanelCols) {
      const int n = static_cast<int>(imin(kTPanelCols, col_end - cb));
      decode_panel_t(p.w, tab, o0, kc, cb, panel);
      for (int64_t t = 0; t < tiles; ++t) {
        const int mr = static_cast<int>(imin(kMaxMr, p.batch - t * kMaxMr));
        micro_tile_t_n<kMaxMr>(mr, panel, gpack + t * kMaxMr * kc, kc, p.dx + t * kMaxMr * in + cb, in, n,
                               o0 == p.row_begin);
      }
    }
  }
}

void gemm_nf4t_f32(const TransposedArgs& p, int64_t col_begin, int64_t col_end) {
  if (col_end <= col_begin || p.batch <= 0) return;
  if (p.row_end <= p.row_begin) {
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t c = col_begin; c < col_end; ++c) p.dx[b * p.w.in_features + c] = 0.0f;
    }
    return;
  }
  const Nf4Table tab = make_table();
  if (p.batch > 1) return gemmt(p, tab, col_begin, col_end);
  if (!aligned_groups(p.w)) return gemvt_general(p, tab, col_begin, col_end);
  gemvt_aligned(p, tab, col_begin, col_end);
}
