// The one list of instruction sets, in priority order (the first one the CPU supports is the
// default; QLORA_FORCE_ISA names one). Each entry is a namespace qlora::kernels::NAME with a
// `const KernelTable* table()` (nullptr on other architectures) in its own source file, and the
// class of wide instructions its file may contain (read by .ci/static_isa_check.py: avx512
// allows AVX-512 and everything below it, amx adds tile instructions, avx2 allows AVX/AVX2/FMA
// and VEX-encoded extensions, none allows nothing beyond the baseline). Adding an ISA is one new
// file plus one line here.
//
// A kernel an ISA does not provide (a null entry) is taken from the next supported ISA below it
// in this list, so each table only holds what its instructions make faster.
#pragma once

// X(name, instruction class)
#define QLORA_ISA_LIST(X)   \
  X(amx, amx)               \
  X(avx512_bf16, avx512)    \
  X(avx512_vnni, avx512)    \
  X(avx512, avx512)         \
  X(avx_vnni, avx2)         \
  X(avx2, avx2)             \
  X(neon_dot, none)         \
  X(neon, none)             \
  X(scalar, none)
