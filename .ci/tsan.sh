#!/usr/bin/env bash
# The C++ tests under ThreadSanitizer: builds them with -DQLORA_SANITIZE=thread and runs, with
# halt_on_error=1 so any data race fails the run, first the tests tagged [thread_pool]
# (parallel_for, exceptions from tasks, thread-count changes, concurrent forwards on one weight,
# thread-start failures), then the whole suite, whose operations all go through the pool (about
# 15 s under TSan on 2 cores).
#   bash .ci/tsan.sh [BUILD_DIR]   (default: build/tsan)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build/tsan}
cmake -S . -B "$BUILD" -G Ninja -DQLORA_BUILD_TESTS=ON -DQLORA_SANITIZE=thread \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD" -j "${JOBS:-2}" --target qlora_cpp_tests
# second_deadlock_stack: a lock-order report then shows both acquisitions.
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
"$BUILD/tests/cpp/qlora_cpp_tests" "[thread_pool]"
"$BUILD/tests/cpp/qlora_cpp_tests"
