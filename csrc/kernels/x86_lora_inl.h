// The x86 LoRA kernels (lora_down, lora_up), written once over the 16-float vector F32x16 and
// included by x86_avx2.cpp and x86_avx512.cpp right after x86_kernels_inl.h, inside their
// target regions and anonymous namespaces, so each instruction set compiles its own copy. It
// uses what the including file and x86_kernels_inl.h provide (F32x16 and its operations,
// transpose16(), scratch(), imin()). No include guard on purpose: every ISA file includes it once.
//
// lora_up is bit-identical to the scalar specification: each output o of each listed row is one
// sum over k in increasing order of the rounded products u[j, k] * B[o, k] (separate multiply
// and add: the build forbids FMA contraction), then one multiply by the row's scale and one add
// into y. The vectors run over 16 outputs at once, so every lane does exactly the scalar
// arithmetic of its own output, whatever block, row group or o-range it is in. B is
// (out_features, rank) row-major, so the 16 outputs of a block are one contiguous run of
// 16 * rank floats; each block is transposed once into scratch (k-major) and then shared by
// every listed row.

// Four rows of A per pass share each load of x: a lone dot product is bound by its two loads
// per FMA. Each output is one fixed-order sum (two accumulators over alternating 16-column
// halves, the tail into the first), whatever the batch range or the rows beside it.
void dot4(const float* x, const float* a, int64_t n, float* out) {
  F32x16 acc[4][2];
  for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = f_zero();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const F32x16 x0 = f_load(x + i), x1 = f_load(x + i + 16);
    for (int j = 0; j < 4; ++j) {
      acc[j][0] = f_fma(x0, f_load(a + j * n + i), acc[j][0]);
      acc[j][1] = f_fma(x1, f_load(a + j * n + i + 16), acc[j][1]);
    }
  }
  for (; i < n; i += 16) {
    const int m = static_cast<int>(imin(16, n - i));
    const F32x16 xt = f_loadn(x + i, m);
    for (int j = 0; j < 4; ++j) acc[j][0] = f_fma(xt, f_loadn(a + j * n + i, m), acc[j][0]);
  }
  for (int j = 0; j < 4; ++j) out[j] = f_reduce_add(f_add(acc[j][0], acc[j][1]));
}

void lora_down(const float* x, int64_t in_features, const float* a, int64_t rank, int64_t b_begin,
               int64_t b_end, float* xa) {
  for (int64_t b = b_begin; b < b_end; ++b) {
    const float* xb = x + b * in_features;
    int64_t k = 0;
    for (; k + 4 <= rank; k += 4) dot4(xb, a + k * in_features, in_features, xa + b * rank + k);
    for (; k < rank; ++k) xa[b * rank + k] = dot(xb, a + k * in_features, in_features);
  }
}

// Listed rows sharing each load of a transposed block: 4 rows keep 4 (AVX-512) or 8 (AVX2)
// independent add chains in flight, enough to hide the add latency at rank 8-64.
constexpr int kLoraRows = 4;
// Outputs per tile: B's tile is transposed once into scratch (kLoraTile x rank floats, 16 KiB at
// rank 16) and each listed row then runs along a contiguous kLoraTile-float piece of its y row.
// Walking all rows for every 16 outputs instead strides y by a whole row per access, which
// neither the prefetchers nor the TLB follow: the LoRA term of a batch-256 4096x4096 forward
// on one thread took 3.3 ms that way and 0.6 ms tiled, as much as the old fused epilogue.
constexpr int64_t kLoraTile = 256;

// B rows [o0, o0 + n) (n <= 16), transposed into bt[k * 16 + lane]; lanes past n are zero.
void transpose_b_block(const float* b, int64_t rank, int64_t o0, int n, float* bt) {
  for (int64_t k0 = 0; k0 < rank; k0 += 16) {
    const int kk = static_cast<int>(imin(16, rank - k0));
    F32x16 t[16];
    for (int i = 0; i < 16; ++i) {
      const float* src = b + (o0 + i) * rank + k0;
      t[i] = i >= n ? f_zero() : kk == 16 ? f_load(src) : f_loadn(src, kk);
    }
    transpose16(t);
    for (int j = 0; j < kk; ++j) f_store(bt + (k0 + j) * 16, t[j]);
  }
}

// NR listed rows (u rows consecutive from u) over the outputs [t0, t1) of a tile, whose blocks
// of B are transposed one after another in bt (rank x 16 floats each); yrow[i] points at
// output t0 of row i.
template <int NR>
void lora_up_rows(const float* u, int64_t rank, const float* bt, const float* scale, float* const* yrow, int64_t len) {
  F32x16 sc[NR];
  for (int i = 0; i < NR; ++i) sc[i] = f_set1(scale[i]);
  for (int64_t c = 0; c < len; c += 16) {
    const int n = static_cast<int>(imin(16, len - c));
    const float* btc = bt + c * rank;
    F32x16 acc[NR];
    for (int i = 0; i < NR; ++i) acc[i] = f_zero();
    for (int64_t k = 0; k < rank; ++k) {
      const F32x16 bk = f_load(btc + k * 16);
      for (int i = 0; i < NR; ++i) acc[i] = f_add(acc[i], f_mul(f_set1(u[i * rank + k]), bk));
    }
    for (int i = 0; i < NR; ++i) {
      const F32x16 t = f_mul(sc[i], acc[i]);
      float* yc = yrow[i] + c;
      if (n == 16) {
        f_store(yc, f_add(f_load(yc), t));
      } else {
        f_storen(yc, f_add(f_loadn(yc, n), t), n);
      }
    }
  }
}

void lora_up(const float* u, int64_t rank, const float* b, float scaling, const float* row_scale,
             const int64_t* rows, int64_t n_rows, int64_t out_features, int64_t o_begin, int64_t o_end,
             float* y) {
  if (n_rows <= 0 || o_end <= o_begin) return;
  float* bt = scratch(1, static_cast<size_t>(imax(rank, 1) * kLoraTile));
  for (int64_t t0 = o_begin; t0 < o_end; t0 += kLoraTile) {
    const int64_t len = imin(kLoraTile, o_end - t0);
    for (int64_t c = 0; c < len; c += 16) transpose_b_block(b, rank, t0 + c, static_cast<int>(imin(16, len - c)), bt + c * rank);
    for (int64_t j = 0; j < n_rows; j += kLoraRows) {
      const int nr = static_cast<int>(imin(kLoraRows, n_rows - j));
      float* yrow[kLoraRows];
      float scale[kLoraRows];
      for (int i = 0; i < nr; ++i) {
        const int64_t r = rows != nullptr ? rows[j + i] : j + i;
        yrow[i] = y + r * out_features + t0;
        scale[i] = row_scale != nullptr ? row_scale[j + i] : scaling;
      }
      const float* uj = u + j * rank;
      switch (nr) {
        case 1: lora_up_rows<1>(uj, rank, bt, scale, yrow, len); break;
        case 2: lora_up_rows<2>(uj, rank, bt, scale, yrow, len); break;
        case 3: lora_up_rows<3>(uj, rank, bt, scale, yrow, len); break;
        default: lora_up_rows<kLoraRows>(uj, rank, bt, scale, yrow, len); break;
      }
    }
  }
}
