#!/usr/bin/env bash
# Developer build: compiles qlora._core with CMake into build/dev and copies it next to the
# Python sources, so `PYTHONPATH=python python -m pytest tests` runs against this work tree
# without a pip install (several work trees can share one virtual environment that way).
# Usage: tools/dev_build.sh [PYTHON]   (default: python3; extra CMake flags in QLORA_CMAKE_ARGS)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
BUILD=${QLORA_DEV_BUILD:-build/dev}
cmake -S . -B "$BUILD" -G Ninja -DQLORA_BUILD_PYTHON=ON -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" ${QLORA_CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD" -j "$(nproc)"
rm -f python/qlora/_core*.so
cp "$BUILD"/_core*.so python/qlora/
