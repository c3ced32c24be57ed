#!/usr/bin/env bash
# Regenerates the type stubs of qlora._core with pybind11-stubgen (from the installed qlora)
# into a temporary directory and fails if they differ from the committed
# python/qlora/_core.pyi, so the stubs can never drift from the module.
#
#   PYTHON=/path/to/venv/bin/python .ci/check_stubs.sh
#
# The committed file was generated with pybind11-stubgen 3.0.0 from a module built with
# pybind11 3.1: use those versions (other versions format signatures differently).
# To update the committed file after changing the bindings:
#   (cd /tmp && $PYTHON -m pybind11_stubgen qlora._core -o "$REPO/python")
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Run outside the checkout so `import qlora` is the installed package (with its _core).
(cd "$tmp" && "$python" -m pybind11_stubgen qlora._core -o "$tmp/out" --exit-code)

if ! diff -u "$root/python/qlora/_core.pyi" "$tmp/out/qlora/_core.pyi"; then
  echo "check_stubs: python/qlora/_core.pyi is out of date; regenerate it with" >&2
  echo "  (cd /tmp && $python -m pybind11_stubgen qlora._core -o $root/python)" >&2
  exit 1
fi
echo "check_stubs: python/qlora/_core.pyi is up to date"
