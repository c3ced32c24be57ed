#!/usr/bin/env bash
# Portability check: run the pytest smoke subset (tests/test_portability.py) under qemu-user
# emulating old and newer x86-64 CPUs, with the package already installed for PYTHON.
#
#   .ci/qemu_x86.sh PYTHON          e.g. .ci/qemu_x86.sh /work/venv/bench/bin/python
#
# - Westmere (SSE4.2, no AVX): dispatch must choose "scalar", and nothing may die of SIGILL
#   (an AVX instruction outside the ISA target regions would).
# - Haswell (AVX2 + FMA, no AVX-512): dispatch must choose "avx2" when the avx2 table is
#   compiled in, else "scalar". The expectation is computed natively from _core.compiled_isas().
# Needs qemu-x86_64 >= 7.2 (TCG emulates AVX2/FMA from 7.2 on); installs nothing. CPython under
# qemu-user is slow (~30 s per CPU here), so the subset is small and tests/conftest.py (hypothesis
# profiles, per-ISA fixtures the smoke test does not use) is not loaded.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 PYTHON   (a Python with qlora and pytest installed)" >&2
  exit 2
fi
PYTHON=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ "$(uname -m)" != "x86_64" ]]; then
  echo "error: $0 emulates x86-64 CPUs for an x86-64 Python; this host is $(uname -m)" >&2
  exit 2
fi
if ! command -v qemu-x86_64 >/dev/null 2>&1; then
  echo "error: qemu-x86_64 not found (Debian/Ubuntu: apt-get install qemu-user)" >&2
  exit 2
fi
if ! "$PYTHON" -c "import qlora, pytest" >/dev/null 2>&1; then
  echo "error: $PYTHON cannot import qlora and pytest" >&2
  exit 2
fi
qemu_version=$(qemu-x86_64 --version | head -n1 | sed -E 's/.*version ([0-9]+)\.([0-9]+).*/\1 \2/')
read -r qmaj qmin <<<"$qemu_version"
if (( qmaj < 7 || (qmaj == 7 && qmin < 2) )); then
  echo "error: qemu-x86_64 $qmaj.$qmin cannot emulate AVX2 (needs >= 7.2)" >&2
  exit 2
fi

compiled=$(env -u QLORA_FORCE_ISA "$PYTHON" -c \
  "from qlora import _core; print(' '.join(_core.compiled_isas()))")
echo "compiled ISAs (native): $compiled"
if [[ " $compiled " == *" avx2 "* ]]; then
  expect_haswell=avx2
else
  expect_haswell=scalar
  echo "note: the avx2 table is not compiled in yet, so Haswell is expected to pick scalar"
fi

status=0
run_cpu() {
  local cpu=$1 expect=$2 rc=0
  echo "== qemu-x86_64 -cpu $cpu: expecting active_isa=$expect"
  # TCG prints one warning per CPUID feature it cannot emulate (pcid, hle, ...): not ours.
  env -u QLORA_FORCE_ISA QLORA_EXPECT_ISA="$expect" \
    qemu-x86_64 -cpu "$cpu" "$PYTHON" -m pytest -p no:cacheprovider --noconftest -q -s \
    "$ROOT/tests/test_portability.py" 2> >(grep -v "TCG doesn't support requested feature" >&2) \
    || rc=$?
  if (( rc == 0 )); then
    echo "== $cpu: ok (active_isa=$expect)"
  elif (( rc == 132 )); then
    echo "== $cpu: FAILED: died of SIGILL (illegal instruction)" >&2
    status=1
  else
    echo "== $cpu: FAILED: pytest exit status $rc" >&2
    status=1
  fi
}

run_cpu Westmere scalar
run_cpu Haswell "$expect_haswell"
exit $status
