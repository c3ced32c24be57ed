#!/usr/bin/env bash
# The C++ package as a C++ user gets it: configures and builds qlora (core only), installs it
# with `cmake --install` into a temporary prefix, builds tests/cmake_consumer against it with
# find_package(qlora) and -DCMAKE_PREFIX_PATH, and runs the consumer, which exits non-zero if
# its forward disagrees with a plain reference. Also checks that the package leaks none of the
# core's private flags (warnings, -ffp-contract) to its users.
#   bash .ci/cmake_consumer.sh [WORK_DIR]   (default: a fresh temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d)}
rm -rf "$WORK/build" "$WORK/prefix" "$WORK/consumer"
cmake -S . -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$WORK/prefix" >/dev/null
cmake --build "$WORK/build" -j "${JOBS:-2}"
cmake --install "$WORK/build" >/dev/null
for f in include/qlora/qlora_linear.h lib/libqlora_core.a lib/cmake/qlora/qloraConfig.cmake \
         lib/cmake/qlora/qloraConfigVersion.cmake lib/cmake/qlora/qloraTargets.cmake; do
  [[ -f "$WORK/prefix/$f" ]] || { echo "cmake_consumer: $f was not installed" >&2; exit 1; }
done
if grep -nE -- '-Wall|-Wextra|-ffp-contract' "$WORK"/prefix/lib/cmake/qlora/qloraTargets*.cmake; then
  echo "cmake_consumer: the installed qlora::core passes private flags to its users" >&2
  exit 1
fi
cmake -S tests/cmake_consumer -B "$WORK/consumer" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$WORK/prefix" >/dev/null
cmake --build "$WORK/consumer"
"$WORK/consumer/qlora_consumer"
echo "cmake_consumer: find_package(qlora) -> qlora::core built, linked and ran correctly"
