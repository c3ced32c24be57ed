#!/usr/bin/env bash
# Cross-compiles the core and the Catch2 C++ tests for aarch64 and runs them under qemu-aarch64
# through ctest (CMAKE_CROSSCOMPILING_EMULATOR), so the NEON kernels are tested on an x86 host.
# Installs nothing: the main CI script provides g++-aarch64-linux-gnu, qemu-user and catch2.
# Usage: .ci/neon.sh [build-dir]   (default build-neon)
set -euo pipefail

build_dir="${1:-build-neon}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=("aarch64-linux-gnu-g++ (apt: g++-aarch64-linux-gnu)")
command -v qemu-aarch64 >/dev/null || missing+=("qemu-aarch64 (apt: qemu-user)")
[ -d /usr/aarch64-linux-gnu/lib ] || missing+=("/usr/aarch64-linux-gnu sysroot (apt: g++-aarch64-linux-gnu)")
[ -f /usr/include/catch2/catch.hpp ] || missing+=("Catch2 v2 headers (apt: catch2)")
command -v cmake >/dev/null || missing+=("cmake")
if [ "${#missing[@]}" -gt 0 ]; then
  echo "neon.sh: missing prerequisites:" >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

cmake -S "$root" -B "$build_dir" "${generator[@]}" \
  -DCMAKE_TOOLCHAIN_FILE="$root/cmake/aarch64-linux-gnu.cmake" \
  -DCMAKE_BUILD_TYPE=Release \
  -DQLORA_BUILD_TESTS=ON
cmake --build "$build_dir" --parallel "$(nproc)"

# The binary must really be aarch64 (ELF e_machine 0xb7 at byte 18), or the run below would
# prove nothing about NEON.
test_bin="$build_dir/tests/cpp/qlora_cpp_tests"
machine="$(od -An -t x1 -j 18 -N 2 "$test_bin" | tr -d ' ')"
if [ "$machine" != "b700" ]; then
  echo "neon.sh: $test_bin is not an aarch64 executable (ELF e_machine bytes: $machine)" >&2
  exit 1
fi

# ctest runs every test under qemu-aarch64, including qlora_cpp_dispatch_neon (the Catch2 case
# asserting the dispatcher picks neon by itself), so a build that fell back to scalar fails here.
(cd "$build_dir" && ctest --output-on-failure)
