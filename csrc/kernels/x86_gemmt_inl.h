// The backward's transposed product dx = g @ deq(W) (KernelTable::gemm_nf4t_f32) over a column
// range, written once over F32x16 and included by x86_avx2.cpp and x86_avx512.cpp inside their
// target regions and anonymous namespaces, after x86_kernels_inl.h (whose decode helpers,
// lane_scales(), aligned_groups(), transpose16() and tile constants it uses). No include guard:
// each ISA file includes it once, into its own namespace.
//
// Every dx element is one fused multiply-add chain over the rows o of W in increasing order,
// whatever column range or tile it is computed in, so results do not depend on the thread count.
// Batch 1 (a chunk of one row) adds c * (g[o] * scale) per row, the scale folded into the
// broadcast of g; larger chunks add deq(W)[o, i] * g[b, o] with deq = c * scale exactly as
// dequantize_rows gives it. Both are within (out_features + 2) roundings of the exact sum.

// Batch 1: a tile of columns whose accumulators stay in registers while every row of W streams
// through (the AVX-512 file has 32 vector registers, kPanelUnits 2; AVX2 has 16).
constexpr int kTGemvUnits = kPanelUnits == 2 ? 16 : 4;
constexpr int64_t kTGemvCols = 16 * kTGemvUnits;
// Columns handed to the kernel start on a multiple of this: a whole batch-1 tile, so the drivers'
// column split never cuts one (results do not depend on it either way).
constexpr int64_t kGemmTColBlock = kTGemvCols;
// Batches: the decoded panel holds kKc rows of W by kTPanelCols columns (64 KiB on AVX-512, like
// the forward's), row-major as the codes already are, and a kMaxMr x kTPanelCols register tile
// of dx walks down it.
constexpr int kTPanelCols = 16 * kPanelUnits;
// Rows ahead that the batch-1 and panel loops prefetch: a column tile reads 16-128 bytes per
// row, rows row_bytes apart (a page or more in wide layers, where hardware prefetchers stop).
// 8, 16 and 32 rows measured the same on this machine's Zen 4.
constexpr int64_t kTAhead = 16;

// Batch 1, NB blocks (NB * 32 columns from c0, a multiple of 32). Aligned groups take the
// permuted decode of the forward's batch 1 (lane 4l + p holds column 4p + l of a 16-column
// half, a 4x4 transpose that gemv_x() undoes on the way out); other layouts decode in column
// order and scale lane by lane. BPG (aligned groups of 64 or 128 columns: 2 or 4) blocks share
// one broadcast of g times their scale; 1 otherwise.
template <int NB, bool kAligned, int BPG>
void gemvt_tile(const TransposedArgs& p, const Nf4Table& tab, int64_t c0, int64_t c1) {
  const Nf4Weight& w = p.w;
  const int64_t in = w.in_features, out = w.out_features, row_bytes = packed_row_bytes(in);
  const int64_t gpr = kAligned ? in / w.group_size : 0;
  int64_t gk[NB];  // group of block j within its row (aligned groups)
  for (int j = 0; j < NB; ++j) gk[j] = kAligned ? (c0 + j * kBlockCols) / w.group_size : 0;
  F32x16 acc[2 * NB];
  for (int j = 0; j < 2 * NB; ++j) acc[j] = f_zero();
  const uint8_t* src = w.codes + (c0 / kBlockCols) * kBlockBytes;
  for (int64_t o = 0; o < out; ++o, src += row_bytes) {
    if (o + kTAhead < out) {
      const char* next = reinterpret_cast<const char*>(src + kTAhead * row_bytes);
      for (int l = 0; l < NB * kBlockBytes; l += 64) _mm_prefetch(next + l, _MM_HINT_T0);
    }
    const float go = p.g[o];
    if constexpr (kAligned) {
      for (int j0 = 0; j0 < NB; j0 += BPG) {
        const F32x16 gs = f_set1(go * group_scale(w, o * gpr + gk[j0]));
        for (int j = j0; j < j0 + BPG; ++j) {
          F32x16 d0, d1;
          decode_block_gemv(tab, src + j * kBlockBytes, d0, d1);
          acc[2 * j] = f_fma(d0, gs, acc[2 * j]);
          acc[2 * j + 1] = f_fma(d1, gs, acc[2 * j + 1]);
        }
      }
      continue;
    }
    const F32x16 gv = f_set1(go);
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
  alignas(64) float lanes[16], natural[16];
  for (int u = 0; u < 2 * NB; ++u) {
    const int64_t c = c0 + 16 * u;
    const int n = static_cast<int>(imax(0, imin(16, c1 - c)));
    if (n == 0) break;
    F32x16 v = acc[u];
    if constexpr (kAligned) {
      f_store(lanes, v);
      v = f_load(gemv_x(lanes, 16, natural));
    }
    f_storen(p.dx + c, v, n);
  }
}

// Tiles of nb blocks, nb a multiple of BPG (tiles start on a multiple of kGemmTColBlock, and
// with aligned groups every row ends on a group boundary).
template <int NB, bool kAligned, int BPG>
void gemvt_tile_n(int nb, const TransposedArgs& p, const Nf4Table& tab, int64_t c0, int64_t c1) {
  if constexpr (NB > 0) {
    if constexpr (NB % BPG == 0) {
      if (nb == NB) return gemvt_tile<NB, kAligned, BPG>(p, tab, c0, c1);
    }
    gemvt_tile_n<NB - 1, kAligned, BPG>(nb, p, tab, c0, c1);
  }
}

template <bool kAligned, int BPG>
void gemvt(const TransposedArgs& p, const Nf4Table& tab, int64_t col_begin, int64_t col_end) {
  for (int64_t c0 = col_begin; c0 < col_end; c0 += kTGemvCols) {
    const int64_t c1 = imin(col_end, c0 + kTGemvCols);
    const int nb = static_cast<int>((c1 - c0 + kBlockCols - 1) / kBlockCols);
    gemvt_tile_n<kTGemvUnits / 2, kAligned, BPG>(nb, p, tab, c0, c1);
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
  for (int64_t o0 = 0; o0 < out; o0 += kKc) {
    const int64_t kc = imin(kKc, out - o0);
    pack_g(p.g, out, p.batch, o0, kc, gpack);
    for (int64_t cb = col_begin; cb < col_end; cb += kTPanelCols) {
      const int n = static_cast<int>(imin(kTPanelCols, col_end - cb));
      decode_panel_t(p.w, tab, o0, kc, cb, panel);
      for (int64_t t = 0; t < tiles; ++t) {
        const int mr = static_cast<int>(imin(kMaxMr, p.batch - t * kMaxMr));
        micro_tile_t_n<kMaxMr>(mr, panel, gpack + t * kMaxMr * kc, kc, p.dx + t * kMaxMr * in + cb, in, n,
                               o0 == 0);
      }
    }
  }
}

void gemm_nf4t_f32(const TransposedArgs& p, int64_t col_begin, int64_t col_end) {
  if (col_end <= col_begin || p.batch <= 0) return;
  const Nf4Table tab = make_table();
  if (p.batch > 1) return gemmt(p, tab, col_begin, col_end);
  if (!aligned_groups(p.w)) return gemvt<false, 1>(p, tab, col_begin, col_end);
  // A group wider than the tile covers all of it (tiles start on multiples of their width).
  constexpr int kTileBlocks = kTGemvUnits / 2;
  switch (p.w.group_size) {
    case 64: return gemvt<true, kTileBlocks < 2 ? kTileBlocks : 2>(p, tab, col_begin, col_end);
    case 128: return gemvt<true, kTileBlocks < 4 ? kTileBlocks : 4>(p, tab, col_begin, col_end);
    default: return gemvt<true, 1>(p, tab, col_begin, col_end);
  }
}
