// Baseline (non-SIMD) helpers of the x86 int8 kernels (x86_q8_inl.h): the superblock geometry,
// the plan saying where each row's weight scales come from, and the per-thread scratch. Included
// by each int8 ISA unit into its own namespace *before* its target region opens, so the
// std::vector code instantiated here is compiled with baseline flags and never shared with a
// wide-instruction copy (see x86_baseline_inl.h). The includer defines kLanes (128-bit lanes
// per integer vector). No include guard: each ISA includes it once, into its own namespace.

constexpr int kSbBlocks = 4 * kLanes;                  // blocks per superblock
constexpr int64_t kSbBytes = kSbBlocks * kBlockBytes;  // code bytes of a superblock
constexpr int64_t kSbCols = kSbBlocks * kBlockCols;    // activation bytes of a superblock
constexpr int kVf = 4 * kLanes;                        // floats (and positions) per float vector
// Batch rows whose rearranged activations (kBatchGroup x in_features bytes) are reused by every
// output row of the range before the next group is read.
constexpr int64_t kBatchGroup = 16;

constexpr int64_t q8_min(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr int64_t q8_max(int64_t a, int64_t b) { return a < b ? b : a; }

// Block of position pos in superblock s: position 4 * L + j holds block kLanes * j + L, as the
// transpose-add of the four accumulators of a superblock leaves it.
constexpr int64_t block_at(int64_t s, int pos) { return s * kSbBlocks + kLanes * (pos % 4) + pos / 4; }

// Where a row's weight scales come from. Plain scales of a layer whose rows hold whole groups
// are read in place (unit = group of the row); double-quantized scales of such a layer are
// decoded per row into scratch (same units); any other q8_layout_ok layer gets one scale per
// block in scratch (unit = block). For superblock s the units of its blocks are
// [first[s], first[s] + count[s]) and position pos uses unit first[s] + idx[s * kSbBlocks + pos].
struct ScalePlan {
  bool in_place = false;
  bool per_block = false;
  int64_t units = 0;  // units per row
  std::vector<int32_t> first, count, idx;
};

void make_plan(const Nf4Weight& w, int64_t blocks, int64_t nsb, ScalePlan& plan) {
  const bool whole = w.in_features % w.group_size == 0;
  plan.in_place = whole && w.scales != nullptr;
  plan.per_block = !whole;
  const int64_t bpg = plan.per_block ? 1 : w.group_size / kBlockCols;
  plan.units = plan.per_block ? blocks : w.in_features / w.group_size;
  plan.first.assign(static_cast<size_t>(nsb), 0);
  plan.count.assign(static_cast<size_t>(nsb), 0);
  plan.idx.assign(static_cast<size_t>(nsb * kSbBlocks), 0);
  for (int64_t s = 0; s < nsb; ++s) {
    const int64_t k0 = s * kSbBlocks, k1 = q8_min(blocks, k0 + kSbBlocks);
    const int64_t u0 = k0 / bpg;
    plan.first[static_cast<size_t>(s)] = static_cast<int32_t>(u0);
    plan.count[static_cast<size_t>(s)] = static_cast<int32_t>((k1 - 1) / bpg - u0 + 1);
    for (int pos = 0; pos < kSbBlocks; ++pos) {
      const int64_t k = block_at(s, pos);
      plan.idx[static_cast<size_t>(s * kSbBlocks + pos)] = k < blocks ? static_cast<int32_t>(k / bpg - u0) : 0;
    }
  }
}

// The unit scales of row o: in place, or decoded into buf (plan.units floats).
const float* row_scales(const Nf4Weight& w, const ScalePlan& plan, int64_t o, float* buf) {
  if (plan.in_place) return w.scales + o * plan.units;
  if (plan.per_block) {
    for (int64_t k = 0; k < plan.units; ++k) buf[k] = group_scale(w, (o * w.in_features + k * kBlockCols) / w.group_size);
  } else {
    // group_scale()'s arithmetic (a multiply, then an add), with the nested scale looked up
    // once per run of groups sharing it: per group the general call cost about as much as
    // decoding the group's codes, which made double-quantized layers a third slower at batch 1.
    const int64_t g0 = o * plan.units;
    for (int64_t g = 0; g < plan.units;) {
      const int64_t nested = (g0 + g) / kNestedBlock;
      const int64_t end = q8_min(plan.units, (nested + 1) * kNestedBlock - g0);
      const float ns = w.nested_scales[nested];
      for (; g < end; ++g) {
        const float m = w.nested_map[w.qscales[g0 + g]] * ns;
        buf[g] = m + w.nested_offset;
      }
    }
  }
  return buf;
}

ScalePlan& thread_plan() {
  thread_local ScalePlan plan;
  return plan;
}

// 64-byte aligned per-thread scratch: slot 0 the rearranged activations, 1 the activation
// scales, 2 the corrections, 3 the decoded weight scales, 4 the decoded weight panel, 5 its
// scales.
void* q8_scratch(int slot, size_t bytes) {
  thread_local std::vector<unsigned char> buffers[6];
  std::vector<unsigned char>& b = buffers[slot];
  if (b.size() < bytes + 64) b.resize(bytes + 64);
  const uintptr_t p = reinterpret_cast<uintptr_t>(b.data());
  return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
}
