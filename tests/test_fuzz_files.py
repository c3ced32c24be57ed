"""Fuzzing at scale: every public loader survives 10,000+ generated corruptions per run.

Cases come from ``tests/fuzz_corpus.py`` (deterministic: ``(family, seed)`` is the whole
case). Each family runs in a child process, for three reasons:

- a **crash** (segfault, abort) kills only the child: the parent sees the signal, reports the
  case's seed and restarts the child after it, so one crash does not hide the rest;
- a **hang** is bounded: each case runs under a real-time alarm (``CASE_TIMEOUT_S``) whose
  default action kills the child even inside C code; the parent reports the seed;
- a **huge allocation** shows up: the child runs under ``RLIMIT_AS`` of 1 GiB (it needs about
  150 MiB; every input is under 64 KiB), so asking for gigabytes raises MemoryError, which is
  reported as a failure, not as a rejection.

Every case must end ``rejected`` (ValueError or OSError) or ``loaded`` with self-consistent
layers (see ``fuzz_corpus.check_layer``). Bugs found and not yet fixed are listed in
``KNOWN_BUGS``: a case matching one of them is counted under its name instead of failing the
run, and each has a minimal reproducer below marked ``xfail(strict=True)``, so the fix makes it
XPASS (fail) and the entry is removed with it. A summary line per run goes to the terminal:

    fuzz: 11000 cases (...; 10174 reached qlora): 8239 ValueError/OSError, 1935 loaded and
    self-consistent, ..., 0 crashes, 0 hangs, 0 memory, 0 other failures

Reproduce one case: ``PYTHONPATH=python python tests/fuzz_corpus.py run FAMILY SEED 1 -v``.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "fuzz_corpus.py")
sys.path.insert(0, HERE)

import fuzz_corpus  # noqa: E402
import qlora  # noqa: E402

# Cases per family: 11,000 in all (10,174 reach qlora; safetensors.numpy refuses the rest of
# the bnb_file cases itself), 40-70 s on 2 shared cores.
CASES = {"qlora_mmap": 3000, "qlora_read": 3000, "bnb_dict": 2000, "bnb_file": 1000,
         "peft": 2000}
MIN_TOTAL = 10_000
FAMILY_TIMEOUT_S = 120  # a whole family, restarts included (it takes ~10 s)
MAX_RESTARTS = 20       # after crashes or hangs; more means something is badly broken

GOOD = {"rejected", "loaded", "rejected_by_safetensors"}

# Bugs found by this fuzzer and not yet fixed: (id, families, outcome, detail regex). Each id
# has a strict-xfail reproducer test below; remove the entry with the fix. Every bug found so
# far is fixed; their reproducers below are regression tests.
KNOWN_BUGS: list = []


def known_bug(family: str, outcome: str, detail: str) -> str | None:
    for bug, families, out, pattern in KNOWN_BUGS:
        if family in families and outcome == out and re.search(pattern, detail):
            return bug
    return None


_SCRATCH: list = []  # a pytest temporary directory for the children's files


def _child_env(**extra: str) -> dict:
    env = dict(os.environ, **extra)
    if _SCRATCH:
        env["TMPDIR"] = str(_SCRATCH[0])  # children's tempfile.mkdtemp() land in it
    # Children import the qlora this process imported (a source tree with a dev build, or an
    # installed wheel), never another copy that happens to sit next to the tests.
    python_dir = os.path.dirname(os.path.dirname(os.path.abspath(qlora.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_dir, env.get("PYTHONPATH")) if p)
    # One thread each: the child is small, and the machine is shared.
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", QLORA_NUM_THREADS="1",
               PYTHONHASHSEED="0")
    if fuzz_corpus.asan_loaded():
        # No RLIMIT_AS under ASan (see fuzz_corpus.child_main): allocations over the child's
        # budget fail instead, as MemoryError.
        # handle_segv=0: a crash stays a signal the harness reports with its seed (its
        # self-test plants one on purpose); ASan still reports every memory error it detects.
        env["ASAN_OPTIONS"] = (env.get("ASAN_OPTIONS", "") +
                               f":allocator_may_return_null=1:max_allocation_size_mb="
                               f"{fuzz_corpus.ADDRESS_SPACE_LIMIT >> 20}:handle_segv=0").lstrip(":")
    return env


def run_family(family: str, count: int, **env: str) -> dict:
    """Run seeds 0..count-1 of a family in child processes; returns counts and failures."""
    outcomes: collections.Counter = collections.Counter()
    by_kind: dict = collections.defaultdict(collections.Counter)
    bugs: collections.Counter = collections.Counter()
    bug_seeds: dict = {}
    failures: list = []
    max_ms, vm_hwm = 0.0, []
    start, restarts = 0, 0
    deadline = time.monotonic() + FAMILY_TIMEOUT_S
    while start < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{family}: out of time at seed {start}"
        cmd = [sys.executable, CORPUS, "run", family, str(start), str(count - start)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env=_child_env(**env), timeout=remaining)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{family}: the child ran past {FAMILY_TIMEOUT_S} s (seed >= {start})")
        last = start - 1
        for line in proc.stdout.splitlines():
            rec = json.loads(line)
            if rec.get("done"):
                vm_hwm.append(rec["VmHWM"])
                continue
            last = rec["seed"]
            outcome, kind, detail = rec["outcome"], rec["kind"], rec["detail"]
            max_ms = max(max_ms, rec["ms"])
            by_kind[kind][outcome] += 1
            if outcome in GOOD:
                outcomes[outcome] += 1
                continue
            bug = known_bug(family, outcome, detail)
            if bug:
                bugs[bug] += 1
                bug_seeds.setdefault(bug, last)
                outcomes["known_bug"] += 1
            else:
                outcomes[outcome] += 1
                failures.append(f"{family} seed {last} ({kind}): {outcome}: {detail}")
        if proc.returncode == 0:
            break
        # The child died in case last + 1: a crash (signal) or a hang (our alarm).
        seed = last + 1
        kind = _kind(family, seed)
        if proc.returncode == -signal.SIGALRM:
            what = "hang"
        elif proc.returncode < 0:
            what = f"crash (signal {-proc.returncode})"
        else:
            what = f"child exit status {proc.returncode}"
        outcomes["hang" if what == "hang" else "crash"] += 1
        by_kind[kind][what] += 1
        failures.append(f"{family} seed {seed} ({kind}): {what}; stderr: "
                        f"{proc.stderr.strip()[-1500:]}")
        start = seed + 1
        restarts += 1
        assert restarts <= MAX_RESTARTS, "\n".join(failures)
    return {"family": family, "outcomes": outcomes, "by_kind": by_kind, "bugs": bugs,
            "bug_seeds": bug_seeds, "failures": failures, "max_ms": max_ms,
            "vm_hwm": vm_hwm, "total": sum(sum(c.values()) for c in by_kind.values())}


_KINDS: dict = {}


def _kind(family: str, seed: int) -> str:
    if family not in _KINDS:
        cls = {"qlora_mmap": fuzz_corpus.QloraFiles, "qlora_read": fuzz_corpus.QloraFiles,
               "bnb_dict": fuzz_corpus.BnbDicts, "bnb_file": fuzz_corpus.BnbFiles,
               "peft": fuzz_corpus.PeftFolders, "selftest": fuzz_corpus.SelfTest}[family]
        _KINDS[family] = cls.kinds
    kinds = _KINDS[family]
    return kinds[seed % len(kinds)]


@pytest.fixture(scope="module", autouse=True)
def _scratch_dir(tmp_path_factory):
    _SCRATCH.append(tmp_path_factory.mktemp("fuzz"))
    yield
    _SCRATCH.clear()


@pytest.fixture(scope="module")
def fuzz_results(request):
    """Family results, computed once per module; a summary line is printed at the end."""
    results: dict = {}
    yield results
    if not results:
        return
    total = sum(r["total"] for r in results.values())
    out = collections.Counter()
    bugs = collections.Counter()
    for r in results.values():
        out.update(r["outcomes"])
        bugs.update(r["bugs"])
    per_family = ", ".join(f"{f} {r['total']}" for f, r in results.items())
    other = sum(v for k, v in out.items()
                if k not in GOOD | {"known_bug", "crash", "hang", "memory"})
    line = (f"fuzz: {total} cases ({per_family}; {total - out['rejected_by_safetensors']} "
            f"reached qlora): {out['rejected']} ValueError/OSError, "
            f"{out['loaded']} loaded and self-consistent, {out['rejected_by_safetensors']} "
            f"refused by safetensors.numpy, {out['known_bug']} known bugs "
            f"({dict(bugs) if bugs else 'none'}), {out['crash']} crashes, {out['hang']} hangs, "
            f"{out['memory']} memory, {other} other failures; slowest case "
            f"{max(r['max_ms'] for r in results.values()):.0f} ms")
    # Straight to the terminal, past pytest's output capture (shown without -s too).
    capman = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capman is None or reporter is None:
        print("\n" + line)
        return
    with capman.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(line)


def _family(fuzz_results: dict, family: str) -> dict:
    if family not in fuzz_results:
        fuzz_results[family] = run_family(family, CASES[family])
    return fuzz_results[family]


@pytest.mark.parametrize("family", list(CASES))
def test_fuzz_family(fuzz_results, family):
    r = _family(fuzz_results, family)
    kinds = "\n".join(f"  {k:24s} {dict(c)}" for k, c in sorted(r["by_kind"].items()))
    print(f"\n{family}: {r['total']} cases, {dict(r['outcomes'])}, known bugs "
          f"{dict(r['bugs'])} (first seeds {r['bug_seeds']}), child peak RSS {r['vm_hwm']}, "
          f"slowest case {r['max_ms']:.0f} ms\n{kinds}")
    assert not r["failures"], "\n".join(r["failures"][:30])
    assert r["total"] == CASES[family]
    # Every kind of damage ran, and the generators are not degenerate: most cases are
    # rejected, some still load (and were checked), none hit a generator error.
    _kind(family, 0)
    assert set(r["by_kind"]) == set(_KINDS[family])
    assert r["outcomes"]["rejected"] + r["outcomes"]["rejected_by_safetensors"] > r["total"] // 2
    assert r["outcomes"]["loaded"] > 0


def test_fuzz_total_cases(fuzz_results):
    for family in CASES:
        _family(fuzz_results, family)
    # Counted: cases that reached qlora (not those safetensors.numpy refused on its own).
    total = sum(r["total"] - r["outcomes"]["rejected_by_safetensors"]
                for r in fuzz_results.values())
    assert total >= MIN_TOTAL, total


def test_harness_sees_crashes_hangs_and_huge_allocations():
    """The runner itself: a segfault, a hang, a huge allocation and a wrong exception type are
    each reported with their seed, and the cases after them still run."""
    r = run_family("selftest", 12, QLORA_FUZZ_CASE_TIMEOUT="1")
    assert r["total"] == 12
    assert r["outcomes"] == {"loaded": 2, "rejected": 2, "crash": 2, "hang": 2, "memory": 2,
                             "exception:TypeError": 2}, r["outcomes"]
    failed = sorted(int(f.split()[2]) for f in r["failures"])
    assert failed == [2, 3, 4, 5, 8, 9, 10, 11], r["failures"]


# ------------------------------------------------------------------- bugs the fuzzer found
# Each reproducer runs in a child (so a crash or hang fails the test instead of pytest) and
# exits 0 exactly when qlora behaves as documented; the message must name the problem. A new
# bug gets a KNOWN_BUGS entry and a reproducer marked xfail(strict=True) until it is fixed.

_PRELUDE = textwrap.dedent("""
    import json, os, signal, sys, tempfile
    import numpy as np
    import qlora
    from qlora import QLoraLinear
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(int(os.environ.get("REPRO_ALARM_S", "10")))  # a hang ends the child
    d = tempfile.mkdtemp()

    def limit_memory(extra_mib):
        import resource
        if "libasan" in open("/proc/self/maps").read():
            return  # ASan's shadow needs the address space; the parent caps allocations
        status = open("/proc/self/status").read().split("VmSize:")[1]
        limit = int(status.split()[0]) * 1024 + (extra_mib << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def expect_value_error(fn):
        try:
            result = fn()
        except ValueError as exc:
            print("ValueError:", exc)
            sys.exit(0)
        except Exception as exc:
            print("WRONG", type(exc).__name__, exc)
            sys.exit(1)
        print("ACCEPTED", result)
        sys.exit(2)

    def expect_value_or_os_error(fn):
        try:
            result = fn()
        except (ValueError, OSError) as exc:
            print(type(exc).__name__, exc)
            sys.exit(0)
        except BaseException as exc:
            print("WRONG", type(exc).__name__, exc)
            sys.exit(1)
        print("ACCEPTED", result)
        sys.exit(2)

    def peft_folder(config, tensors):
        import struct
        header, body = {}, b""
        for name, arr in tensors.items():
            raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
            header[name] = {"dtype": "F32", "shape": list(arr.shape),
                            "data_offsets": [len(body), len(body) + len(raw)]}
            body += raw
        blob = json.dumps(header).encode()
        with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob + body)
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            f.write(config if isinstance(config, str) else json.dumps(config))
        return d

    def lora(module, r, in_f, out_f):
        return {f"base_model.model.{module}.lora_A.weight": np.ones((r, in_f)),
                f"base_model.model.{module}.lora_B.weight": np.ones((out_f, r))}

    def bnb_state(double_quant=False, bias=False):
        w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
        layer = QLoraLinear.from_weight(w, rank=1, group_size=32, double_quant=double_quant,
                                        bias=np.ones(8) if bias else None)
        return layer.to_bnb("p.")

    def set_quant_state(sd, **fields):
        key = "p.weight.quant_state.bitsandbytes__nf4"
        qs = json.loads(bytes(sd[key]))
        qs.update(fields)
        sd[key] = np.frombuffer(json.dumps(qs).encode(), np.uint8).copy()
        return sd
""")


def _reproduce(body: str, alarm_s: int = 10) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=60,
                          env=_child_env(REPRO_ALARM_S=str(alarm_s)))
    print(proc.stdout, proc.stderr[-2000:])
    return proc


def _rejected(body: str, *needles: str, alarm_s: int = 10) -> None:
    """The reproducer exits 0 (a clean ValueError/OSError) and its message holds `needles`."""
    proc = _reproduce(body, alarm_s)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stdout, (needle, proc.stdout)


def test_peft_config_recursion():
    """Found as peft_config_recursion: a deeply nested adapter_config.json escaped as
    RecursionError."""
    _rejected("""
        folder = peft_folder('{"peft_type": "LORA", "r": 1, "lora_alpha": 1, "x": '
                             + '[' * 100000 + ']' * 100000 + '}', lora("q", 1, 4, 4))
        expect_value_error(lambda: qlora.load_peft_adapter(folder))
    """, "adapter_config.json: not valid UTF-8 JSON", "recursion")


@pytest.mark.parametrize("key, needle", [
    ("a{4294967296}", "is not a valid regular expression (the repetition number is too large)"),
    ("(" * 5000 + ")" * 5000, "is 10000 characters long; at most 256"),
], ids=["repeat_overflow", "deep_nesting"])
def test_peft_pattern_compile(key, needle):
    """Found as peft_pattern_compile: re.compile's OverflowError and RecursionError escaped."""
    _rejected(f"""
        folder = peft_folder({{"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                               "rank_pattern": {{{key!r}: 1}}}}, lora("q", 1, 4, 4))
        expect_value_error(lambda: qlora.load_peft_adapter(folder))
    """, "rank_pattern: key", needle)


def test_peft_rank_zero():
    """Found as peft_rank_zero: lora_A with zero rows and a rank_pattern value 0 reached
    alpha / 0 (ZeroDivisionError)."""
    _rejected("""
        folder = peft_folder({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                              "rank_pattern": {"q": 0}}, lora("q", 0, 4, 4))
        expect_value_error(lambda: qlora.load_peft_adapter(folder))
    """, "lora_A.weight' shape: must have at least one row (rank >= 1), got (0, 4)")


@pytest.mark.parametrize("key", ["(a+)+", "(a|a)*", "(a*)*b"])
def test_peft_pattern_redos(key):
    """Found as peft_pattern_redos: a rank_pattern key such as '(a+)+' matched against a long
    module name backtracked for minutes. Now refused before any matching (3 s alarm)."""
    _rejected(f"""
        name = "a" * 40 + "!"
        folder = peft_folder({{"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                               "rank_pattern": {{{key!r}: 1}}}}, lora(name, 1, 4, 4))
        expect_value_error(lambda: qlora.load_peft_adapter(folder))
    """, f"rank_pattern: key {key!r} is refused", "nested quantifiers", alarm_s=3)


def test_peft_scaling_not_float32():
    """Found as scaling_not_float32 (issue 7 defect 3): lora_alpha 1e300 gave scaling 2.5e299,
    inf in the core."""
    _rejected("""
        folder = peft_folder({"peft_type": "LORA", "r": 4, "lora_alpha": 1e300},
                             lora("q", 4, 8, 8))
        expect_value_error(lambda: qlora.load_peft_adapter(folder))
    """, "lora_alpha", "overflows float32")


def test_file_scaling_subnormal():
    """Found as scaling_not_float32: a file's scaling 1e-40 loaded as a float32 subnormal (and
    1e-45 and below as 0: the adapter vanished)."""
    _rejected("""
        import struct
        layer = QLoraLinear.from_weight(np.ones((4, 8)), rank=1)
        path = os.path.join(d, "l.safetensors")
        layer.save(path)
        data = open(path, "rb").read()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        layers = json.loads(header["__metadata__"]["layers"])
        layers["layer"]["scaling"] = 1e-40
        header["__metadata__"]["layers"] = json.dumps(layers)
        blob = json.dumps(header).encode()
        open(path, "wb").write(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
        expect_value_error(lambda: QLoraLinear.load(path))
    """, "layers['layer'].scaling", "underflows float32")


def test_bnb_nested_offset_overflow():
    """Found as dq_scales_overflow: a bitsandbytes nested_offset of 1e300 became inf in
    float32 (every weight +-inf)."""
    _rejected("""
        sd = set_quant_state(bnb_state(double_quant=True), nested_offset=1e300)
        expect_value_error(lambda: QLoraLinear.from_bnb(sd, "p.", rank=1))
    """, "nested_offset", "overflows float32")


def _set_nested_map(path, value: float) -> None:
    data = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    begin, end = header["layer.nested_map"]["data_offsets"]
    data[8 + n + begin:8 + n + end] = np.full(256, value, "<f4").tobytes()
    open(path, "wb").write(bytes(data))


def test_file_nested_map_huge_but_unused(tmp_path):
    """Listed as dq_scales_overflow (file_nested_map_overflow), but not a bug: for an all-ones
    weight every group's absmax equals the offset, so nested_scales is 0 and the decoded scale
    is ``nested_map[q] * 0 + offset``, whatever the map holds. The layer loads, and its weight
    is exactly the ones it was made from."""
    import qlora
    path = tmp_path / "l.safetensors"
    qlora.QLoraLinear.from_weight(np.ones((4, 64)), rank=1, double_quant=True).save(path)
    from qlora.formats.safetensors import SafetensorsFile
    assert (SafetensorsFile(path).array("layer.nested_scales") == 0).all()
    _set_nested_map(path, 3e38)
    loaded = qlora.QLoraLinear.load(path)
    np.testing.assert_array_equal(loaded.dequantize_weight(), np.ones((4, 64), np.float32))


def test_file_nested_map_overflow(tmp_path):
    """The case the reproducer aimed at: a nonzero nested scale times a huge map entry
    overflows the decoded scales, and the file is refused naming nested_map."""
    import qlora
    path = tmp_path / "l.safetensors"
    w = 10 * np.random.default_rng(0).standard_normal((4, 64))
    qlora.QLoraLinear.from_weight(w, rank=1, group_size=16, double_quant=True).save(path)
    from qlora.formats.safetensors import SafetensorsFile
    assert SafetensorsFile(path).array("layer.nested_scales")[0] > 1  # 3e38 times it: inf
    _set_nested_map(path, 3e38)
    with pytest.raises(ValueError, match=r"tensor 'layer.nested_map'.*overflows float32"):
        qlora.QLoraLinear.load(path)


_HUGE_INT_CASES = {
    "qlora_file_scaling": """
        import struct
        layer = QLoraLinear.from_weight(np.ones((4, 8)), rank=1)
        path = os.path.join(d, "l.safetensors")
        layer.save(path)
        data = open(path, "rb").read()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        layers = json.loads(header["__metadata__"]["layers"])
        layers["layer"]["scaling"] = 10 ** 400
        header["__metadata__"]["layers"] = json.dumps(layers)
        blob = json.dumps(header).encode()
        open(path, "wb").write(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
        expect_value_error(lambda: QLoraLinear.load(path))
    """,
    "bnb_nested_offset": """
        sd = set_quant_state(bnb_state(double_quant=True), nested_offset=10 ** 400)
        expect_value_error(lambda: QLoraLinear.from_bnb(sd, "p.", rank=1))
    """,
    "peft_lora_alpha": """
        folder = peft_folder({"peft_type": "LORA", "r": 1, "lora_alpha": 10 ** 400},
                             lora("q", 1, 4, 4))
        expect_value_error(lambda: qlora.load_peft_adapter(folder))
    """,
    "peft_alpha_pattern": """
        folder = peft_folder({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                              "alpha_pattern": {"q": 10 ** 400}}, lora("q", 1, 4, 4))
        expect_value_error(lambda: qlora.load_peft_adapter(folder))
    """,
}


@pytest.mark.parametrize("where, field", [
    ("qlora_file_scaling", "layers['layer'].scaling"),
    ("bnb_nested_offset", "p.quant_state['nested_offset']"),
    ("peft_lora_alpha", "lora_alpha: must be a finite number"),
    ("peft_alpha_pattern", "alpha_pattern: module 'q' gets lora_alpha"),
])
def test_int_too_large_for_float(where, field):
    """Found as int_too_large_for_float: a JSON integer beyond the float range (10**400) where
    a float belongs raised OverflowError from math.isfinite()."""
    _rejected(_HUGE_INT_CASES[where], field)


def test_header_memory_amplification():
    """Found as header_memory_amplification: headers up to 100 MB were parsed into dicts and
    lists (~20 bytes of memory per header byte; a 99.6 MB header took > 1 GiB). Now the
    reader stops at 131072 tensors, inside the parse, under a 100 MiB budget."""
    _rejected("""
        import gc, struct
        one = b'"t%08d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}'
        blob = b"{" + b",".join(one % i for i in range(175_000)) + b"}"
        path = os.path.join(d, "big.safetensors")
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
        del blob
        gc.collect()
        limit_memory(100)
        expect_value_error(lambda: qlora.load_layers(path))
    """, "header: holds more than 131072 tensors", "at most 16 MiB and 131072 tensors")


def test_header_entries_are_compact():
    """Just under the tensor cap (130,000 entries, 7.4 MB of header), the whole header is
    parsed and checked within 100 MiB: ~7 bytes per header byte at most, where dicts and
    lists took ~20. (The file then fails as not being a qlora file.)"""
    _rejected("""
        import gc, struct
        one = b'"t%08d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}'
        blob = b"{" + b",".join(one % i for i in range(130_000)) + b"}"
        path = os.path.join(d, "big.safetensors")
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
        del blob
        gc.collect()
        limit_memory(100)
        expect_value_error(lambda: qlora.load_layers(path))
    """, "__metadata__.format: must be 'qlora'")


def test_header_above_the_cap_is_refused_before_reading(tmp_path):
    from qlora.formats.safetensors import MAX_HEADER_BYTES, SafetensorsFile
    path = tmp_path / "h.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(8 + MAX_HEADER_BYTES + 1)  # sparse: the header is never read
    with pytest.raises(ValueError, match=r"header length: 16777217 bytes is above qlora's "
                       r"limit of 16777216 \(qlora reads safetensors headers of at most 16 MiB"):
        SafetensorsFile(path)


def test_writer_refuses_a_file_the_reader_would_refuse(tmp_path, monkeypatch):
    from qlora.formats import safetensors as st
    monkeypatch.setattr(st, "MAX_TENSORS", 2)
    tensors = [(f"t{i}", np.zeros(2, np.float32), None) for i in range(3)]
    with pytest.raises(ValueError, match=r"3 tensors in a header of \d+ bytes: qlora reads "):
        st.write_safetensors(tmp_path / "w.safetensors", tensors)
    assert os.listdir(tmp_path) == []
    st.write_safetensors(tmp_path / "w.safetensors", tensors[:2])
    assert set(st.SafetensorsFile(tmp_path / "w.safetensors").tensors) == {"t0", "t1"}


def _llama70b_qlora_header() -> tuple[bytes, int]:
    """The header ``qlora quantize --double-quant`` writes for a whole Llama-3-70B-shaped model
    (80 layers x 7 matrices, rank 8, group 64, two norms per layer carried over): 3,520 tensors
    with real names, shapes and offsets, and the layers metadata."""
    from qlora.formats.files import CODES_LAYOUT
    header, layers, pos = {}, {}, 0

    def add(name, dtype, shape, nbytes):
        nonlocal pos
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    for i in range(80):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            add(f"{p}{norm}.weight", "BF16", [8192], 2 * 8192)
        for name, out_f, in_f in (("self_attn.q_proj", 8192, 8192),
                                  ("self_attn.k_proj", 1024, 8192),
                                  ("self_attn.v_proj", 1024, 8192),
                                  ("self_attn.o_proj", 8192, 8192),
                                  ("mlp.gate_proj", 28672, 8192), ("mlp.up_proj", 28672, 8192),
                                  ("mlp.down_proj", 8192, 28672)):
            n, groups = p + name, out_f * in_f // 64
            add(f"{n}.codes", "U8", [out_f, in_f // 2], out_f * in_f // 2)
            add(f"{n}.qscales", "U8", [groups], groups)
            add(f"{n}.nested_scales", "F32", [-(-groups // 256)], 4 * -(-groups // 256))
            add(f"{n}.nested_map", "F32", [256], 1024)
            add(f"{n}.lora_a", "F32", [8, in_f], 32 * in_f)
            add(f"{n}.lora_b", "F32", [out_f, 8], 32 * out_f)
            layers[n] = {"out_features": out_f, "in_features": in_f, "group_size": 64,
                         "rank": 8, "alpha": 16.0, "scaling": 2.0, "double_quant": True,
                         "nested_offset": 0.0123456789, "bias": False}
    header["__metadata__"] = {"format": "qlora", "format_version": "1",
                              "codes_layout": CODES_LAYOUT,
                              "layers": json.dumps(layers)}
    return json.dumps(header, separators=(",", ":")).encode(), pos


def test_a_70b_model_header_loads(tmp_path):
    """Real headers stay far below the caps: a whole 70B-shaped model quantized into one file
    (~0.5 MB of header) is read in well under a second (a sparse file stands for its 37 GB of
    data), and ``qlora inspect`` lists it."""
    from qlora.formats.safetensors import MAX_HEADER_BYTES, MAX_TENSORS, SafetensorsFile
    blob, data = _llama70b_qlora_header()
    assert len(blob) * 16 < MAX_HEADER_BYTES and 3520 * 16 < MAX_TENSORS  # the headroom
    path = tmp_path / "llama70b.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + data)
    t0 = time.perf_counter()
    st = SafetensorsFile(path, header_only=True)
    assert time.perf_counter() - t0 < 2.0
    assert len(st.tensors) == 3520
    info = st.tensors["model.layers.79.mlp.down_proj.codes"]
    assert (info.dtype, info.shape) == ("U8", (8192, 14336))
    proc = subprocess.run([sys.executable, "-m", "qlora", "inspect", str(path)],
                          capture_output=True, text=True, env=_child_env(), timeout=120)
    assert "model.layers.79.mlp.down_proj" in proc.stdout + proc.stderr, proc.stderr[-2000:]


_SPECIAL_FILES = {
    # A PEFT folder unpacked from an untrusted archive may hold symlinks and FIFOs.
    "peft_config_dev_zero": ("""
        folder = peft_folder({"peft_type": "LORA", "r": 1, "lora_alpha": 1}, lora("q", 1, 4, 4))
        os.unlink(os.path.join(folder, "adapter_config.json"))
        os.symlink("/dev/zero", os.path.join(folder, "adapter_config.json"))
        limit_memory(256)
        expect_value_error(lambda: qlora.load_peft_adapter(folder))
    """, "json.load reads a symlink to /dev/zero until memory runs out (MemoryError here, "
         "the host's memory without a limit)"),
    "peft_config_fifo": ("""
        folder = peft_folder({"peft_type": "LORA", "r": 1, "lora_alpha": 1}, lora("q", 1, 4, 4))
        os.unlink(os.path.join(folder, "adapter_config.json"))
        os.mkfifo(os.path.join(folder, "adapter_config.json"))
        expect_value_error(lambda: qlora.load_peft_adapter(folder))
    """, "open() of a FIFO named adapter_config.json blocks forever (killed at 3 s)"),
    "peft_weights_fifo": ("""
        folder = peft_folder({"peft_type": "LORA", "r": 1, "lora_alpha": 1}, lora("q", 1, 4, 4))
        os.unlink(os.path.join(folder, "adapter_model.safetensors"))
        os.mkfifo(os.path.join(folder, "adapter_model.safetensors"))
        expect_value_error(lambda: qlora.load_peft_adapter(folder))
    """, "open() of a FIFO named adapter_model.safetensors blocks forever (killed at 3 s)"),
    "layers_fifo": ("""
        path = os.path.join(d, "model.safetensors")
        os.mkfifo(path)
        expect_value_error(lambda: qlora.load_layers(path))
    """, "load_layers/QLoraLinear.load open() a FIFO and block forever (killed at 3 s)"),
}


@pytest.mark.parametrize("case", list(_SPECIAL_FILES))
def test_special_files(case):
    """Not regular files where the loaders expect files: a clean ValueError or OSError, no
    hang, no endless read. (Kept out of the bulk run: each hang costs its full timeout.) Found
    as special_files; the second field of each case says what happened before the fix."""
    body = _SPECIAL_FILES[case][0]
    body = body.replace("expect_value_error(", "expect_value_or_os_error(")
    _rejected(body, "not a regular file (a FIFO, device or socket)", alarm_s=3)


def test_bnb_object_dtype():
    """Found as bnb_object_dtype: an object 'weight' raised NumPy's TypeError from .view()."""
    _rejected("""
        sd = bnb_state()
        sd["p.weight"] = np.array([1, 2], dtype=object)
        expect_value_error(lambda: QLoraLinear.from_bnb(sd, "p.", rank=1))
    """, "p.weight: must be packed 4-bit codes (uint8), got dtype object")


def test_bnb_bias_dtype():
    """Found as bnb_bias_dtype: a bool 'bias' (a BOOL tensor in a file) raised TypeError."""
    _rejected("""
        sd = bnb_state(bias=True)
        sd["p.bias"] = np.ones(8, dtype=bool)
        expect_value_error(lambda: QLoraLinear.from_bnb(sd, "p.", rank=1))
    """, "p.bias: bias must have a real numeric dtype", "got bool")


def test_bnb_blocksize_int64():
    """Found as bnb_blocksize_int64: a blocksize >= 2**63 passed the Python check and
    pybind11 refused it for int64_t with TypeError."""
    _rejected("""
        sd = set_quant_state(bnb_state(), blocksize=2 ** 63)
        sd["p.weight.absmax"] = sd["p.weight.absmax"][:1]
        expect_value_error(lambda: QLoraLinear.from_bnb(sd, "p.", rank=1))
    """, "p.quant_state['blocksize']: must be a positive integer below 2**62",
        "9223372036854775808")
