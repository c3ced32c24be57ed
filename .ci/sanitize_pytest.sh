#!/usr/bin/env bash
# The whole pytest suite against a qlora._core built with AddressSanitizer + UndefinedBehavior-
# Sanitizer (QLORA_SANITIZE=ON: alignment checks included, -fno-sanitize-recover, so any report
# ends the process). The extension is built as tools/dev_build.sh does, into its own build
# directory, and staged with a copy of python/qlora in that directory, so the work tree's own
# dev build is left alone. Python itself is not instrumented: the matching libasan/libubsan are
# LD_PRELOADed.
#
# A sanitizer report kills pytest mid-run. So that one report does not hide the rest, a small
# plugin logs every test's start and outcome to a file; the test that was running is recorded
# as killed and the suite resumes, skipping every test already started (at most MAX_CRASHES
# times). The exit status is non-zero if any test failed, erred or
# was killed, or if any process (subprocesses included) wrote a sanitizer report.
#
#   bash .ci/sanitize_pytest.sh PYTHON [BUILD_DIR]   (default BUILD_DIR: build/asan-py)
#   SANITIZE_TESTS="tests/test_forward.py" narrows the run (default: tests, the whole suite).
#
# PYTHON is a virtual environment with pytest, numpy, hypothesis and safetensors. Torch-based
# tests run too when torch is installed; set QLORA_SANITIZE_NO_TORCH=1 to make torch unimportable
# (those tests then skip) if torch misbehaves under ASan on some machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${1:?usage: sanitize_pytest.sh PYTHON [BUILD_DIR]}
BUILD=${2:-build/asan-py}
MAX_CRASHES=${MAX_CRASHES:-10}
mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)

cmake -S . -B "$BUILD" -G Ninja -DQLORA_BUILD_PYTHON=ON -DQLORA_SANITIZE=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$BUILD" -j "${JOBS:-2}" --target _core

STAGE="$BUILD/stage"
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -r python/qlora "$STAGE/qlora"
rm -f "$STAGE"/qlora/_core*.so
cp "$BUILD"/_core*.so "$STAGE/qlora/"
if [[ -n "${QLORA_SANITIZE_NO_TORCH:-}" ]]; then
  mkdir -p "$STAGE/torch"
  echo 'raise ImportError("torch disabled by QLORA_SANITIZE_NO_TORCH")' >"$STAGE/torch/__init__.py"
fi

# The runtimes of the compiler that built the extension; ASan must be first in the process.
CXX=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
ASAN_LIB=$(realpath "$("$CXX" -print-file-name=libasan.so)")
UBSAN_LIB=$(realpath "$("$CXX" -print-file-name=libubsan.so)")
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
  [[ -f "$lib" ]] || { echo "sanitize_pytest: $lib not found" >&2; exit 2; }
done

export LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB${LD_PRELOAD:+:$LD_PRELOAD}"
# pytest runs with --capture=sys: it captures Python's sys.stderr but leaves file descriptor 2
# alone, so a report that ends the process still reaches the round's log (an fd capture is lost
# with the process). ASan also writes its reports to files (REPORTS/report.PID), which catches
# them in subprocesses; GCC 12's UBSan ignores log_path and writes to stderr.
REPORTS="$BUILD/sanitizer-reports"
rm -rf "$REPORTS"
mkdir -p "$REPORTS"
# No leak check: CPython and NumPy keep interned objects and caches alive at exit by design.
# allocator_may_return_null: some tests ask for deliberately huge arrays and expect MemoryError.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:log_path=$REPORTS/report${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$REPORTS/report${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# A small pytest plugin logs each test's start and outcome to RESULTS as it happens (flushed
# to disk, so the log survives the process): "START<tab>id", then "PASSED|FAILED|SKIPPED|ERROR<tab>id".
RESULTS="$BUILD/results.tsv"
: >"$RESULTS"
rm -f "$BUILD"/pytest.round*.log
cat >"$STAGE/qlora_sanitize_log.py" <<'PY'
import os

_PATH = os.environ["QLORA_SANITIZE_RESULTS"]


def _log(tag, nodeid):
    with open(_PATH, "a", encoding="utf-8") as f:
        f.write(f"{tag}\t{nodeid}\n")


def pytest_runtest_logstart(nodeid, location):
    _log("START", nodeid)


def pytest_runtest_logreport(report):
    if report.skipped:
        _log("SKIPPED", report.nodeid)
    elif report.failed:
        _log("FAILED" if report.when == "call" else "ERROR", report.nodeid)
    elif report.when == "call":
        _log("PASSED", report.nodeid)
PY
export QLORA_SANITIZE_RESULTS="$RESULTS"
ids_with() { awk -F'\t' -v s="$1" '$1 == s {print $2}' "$RESULTS" | sort -u; }
crashed=()
rc=0
collected=0
for ((round = 0; round <= MAX_CRASHES; ++round)); do
  out="$BUILD/pytest.round$round.log"
  before=$(wc -l <"$RESULTS")
  # Resume after a crash: every test that already started (finished or killed) is skipped.
  args=()
  while IFS= read -r id; do args+=(--deselect "$id"); done < <(ids_with START)
  set +e
  "$PY" -m pytest -v -p no:cacheprovider -p qlora_sanitize_log --capture=sys "${args[@]}" \
    ${SANITIZE_TESTS:-tests} >"$out" 2>&1
  rc=$?
  set -e
  [[ $round -gt 0 ]] || collected=$(grep -oE 'collected [0-9]+ items' "$out" | grep -oE '[0-9]+' || echo 0)
  # A finished run prints pytest's summary line; a sanitizer exit does not.
  if grep -qE '^=+ .* in [0-9.]+s' "$out"; then break; fi
  # The test that was running when the process died: the last one this round started.
  victim=$(tail -n +"$((before + 1))" "$RESULTS" | awk -F'\t' '$1 == "START" {id = $2} END {print id}')
  if [[ -z "$victim" ]]; then
    echo "sanitize_pytest: pytest died (status $rc) outside a test; see $out" >&2
    crashed+=("(outside a test, round $round)")
    break
  fi
  echo "sanitize_pytest: $victim died (status $rc); resuming after it" >&2
  crashed+=("$victim")
done

count() { ids_with "$1" | grep -c . || true; }
passed=$(count PASSED); failed=$(count FAILED); skipped=$(count SKIPPED); errors=$(count ERROR)
REPORT_RE='runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer'
all_reports() { cat "$BUILD"/pytest.round*.log "$REPORTS"/report.* 2>/dev/null | grep -E "$REPORT_RE" || true; }
reports=$(all_reports | grep -c . || true)
echo
echo "sanitize_pytest: $passed passed, $failed failed, $errors errors, $skipped skipped," \
  "${#crashed[@]} killed, of $collected collected; sanitizer reports: $reports (logs in $BUILD)"
awk -F'\t' '$1 == "FAILED" || $1 == "ERROR" {print "  " $2 " " $1}' "$RESULTS" | sort -u
for t in "${crashed[@]}"; do echo "  $t KILLED"; done
# One line per distinct report (its first line), then the first ASan report file in full.
all_reports | sed 's/0x[0-9a-f]*/0x.../g' | sort | uniq -c
first=$(grep -lE "$REPORT_RE" "$REPORTS"/report.* 2>/dev/null | head -n 1 || true)
if [[ -n "$first" ]]; then echo "--- $first"; head -n 40 "$first"; fi
if [[ $failed -gt 0 || $errors -gt 0 || $reports -gt 0 || ${#crashed[@]} -gt 0 || $rc -ne 0 && $rc -ne 5 ]]; then
  exit 1
fi
exit 0
