// Baseline (non-SIMD) helpers of the x86 kernel files, included by x86_avx2.cpp and
// x86_avx512.cpp inside their own ISA namespace and anonymous namespace, before their target
// region opens. They stay outside the target region because a library template instantiated
// inside it could be merged by the linker with the baseline instantiation of another file, and
// each ISA gets its own copy so no symbol is shared between the two. No include guard: each
// file includes it once, into a different namespace.

// Scratch rows are 64-byte aligned: a full-width access that straddles two cache lines costs
// two, and the GEMM panel is stored and loaded a full line at a time.
float* scratch(int slot, size_t n) {
  thread_local std::vector<float> buffers[3];
  std::vector<float>& b = buffers[slot];
  if (b.size() < n + 16) b.resize(n + 16);
  const uintptr_t p = reinterpret_cast<uintptr_t>(b.data());
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t{63});
}
constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr int64_t imax(int64_t a, int64_t b) { return a < b ? b : a; }
// std::max(a, b) for floats, with its NaN behaviour.
constexpr float fmaxf_(float a, float b) { return a < b ? b : a; }
constexpr float midpoint(int i) { return (kNf4Codebook[i] + kNf4Codebook[i + 1]) * 0.5f; }
