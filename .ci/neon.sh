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

# The binary must really be aarch64, or the run below would prove nothing about NEON.
test_bin="$build_dir/tests/cpp/qlora_cpp_tests"
if ! file -L "$test_bin" 2>/dev/null | grep -q 'aarch64'; then
  if command -v file >/dev/null; then
    echo "neon.sh: $test_bin is not an aarch64 binary: $(file -L "$test_bin")" >&2
    exit 1
  fi
fi

# The dispatch check ("active kernels are neon") is a Catch2 test inside qlora_cpp_tests, so a
# build that silently fell back to scalar fails here.
(cd "$build_dir" && ctest --output-on-failure)
