#!/usr/bin/env python3
"""Static ISA check of the built extension: AVX/AVX2/AVX-512 instructions may appear only in
functions of the ISA namespaces.

    python .ci/static_isa_check.py build/cp311-cp311-linux_x86_64/_core.cpython-311-x86_64-linux-gnu.so

Disassembles the shared object (``objdump -d --no-show-raw-insn -C``) and classifies every
instruction:

- ``amx``: a tile instruction (ldtilecfg, tileloadd, tdpbf16ps, ...).
- ``avx512``: uses a zmm register, an opmask register (%k0-%k7), xmm/ymm 16-31, a mask
  instruction (kmovw, kortestw, ...) or an EVEX-only mnemonic (vpternlogd, vpermt2ps, ...).
- ``avx2``: any other VEX instruction (every ``v...`` mnemonic but the VMX ones, ymm registers,
  FMA, F16C), or BMI1/BMI2 (andn, shlx, pdep, ...).

Which namespaces may use which level comes from csrc/include/qlora/isa_list.h (each ISA's
instruction class: an ``amx`` ISA may use all three levels, ``avx512`` the last two, ``avx2``
the last one, ``none`` nothing).

A function belongs to a namespace when its qualified name (return type and parameter list
removed) starts with it; lambdas, local classes, anonymous-namespace helpers, template
instances and compiler clones (``[clone .constprop.0]``) inside it count. An AVX instruction
anywhere else is the bug class of bitsandbytes#2021 (-mavx2 on a whole target): SIGILL on an
older CPU. Exit status 0 if clean, 1 on violations (each offending function is printed), 2 if
the check cannot run (objdump missing, no symbol table: pass the unstripped .so from the build
directory, not the stripped installed one).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict

# Which instruction classes each ISA class of csrc/include/qlora/isa_list.h may contain.
_CLASS_LEVELS = {"amx": {"amx", "avx512", "avx2"}, "avx512": {"avx512", "avx2"},
                 "avx2": {"avx2"}, "none": set()}
_ISA_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc", "include",
                         "qlora", "isa_list.h")


def allowed_namespaces(isa_list: str = _ISA_LIST) -> dict[str, tuple[str, ...]]:
    """For each instruction level, the namespaces allowed to use it, from the ISA list
    (lines ``X(name, class)``), so a new ISA needs no change here."""
    with open(isa_list, encoding="utf-8") as f:
        entries = re.findall(r"X\((\w+),\s*(\w+)\)", f.read())
    if not entries:
        raise SystemExit(f"error: no X(name, class) entries in {isa_list}")
    allowed: dict[str, list[str]] = defaultdict(list)
    for name, cls in entries:
        for level in _CLASS_LEVELS[cls]:
            allowed[level].append(f"qlora::kernels::{name}::")
    return {level: tuple(v) for level, v in allowed.items()}


ALLOWED = allowed_namespaces()

_FUNC = re.compile(r"^[0-9a-f]+ <(.+)>:$")
_INSN = re.compile(r"^\s+([0-9a-f]+):\s+(.*)$")
_VMX = {"verr", "verw", "vmcall", "vmlaunch", "vmresume", "vmxoff", "vmxon", "vmread",
        "vmwrite", "vmptrld", "vmptrst", "vmclear", "vmfunc", "vmrun", "vmload", "vmsave",
        "vmmcall"}
_BMI = {"andn", "bextr", "blsi", "blsmsk", "blsr", "bzhi", "mulx", "pdep", "pext", "rorx",
        "sarx", "shlx", "shrx"}
_AVX512_REG = re.compile(r"%zmm\d+|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|\{%k[0-7]\}")
_AVX512_MNEMONIC = re.compile(
    r"^(k(mov|and|andn|or|xor|xnor|not|shift|unpck|ortest|test|add)[bwdq]|"
    r"vpternlog|vpermt2|vpermi2|vp?compress|vp?expand|vpmovm2|vpmov[bwdq]2m|vpbroadcastm|"
    r"vrcp14|vrsqrt14|vgetexp|vgetmant|vrndscale|vscalef|vfixupimm|vreduce|vrange|vfpclass|"
    r"vdbpsadbw|vpmadd52|vpopcnt|vpshld|vpshrd|vpermb|vpmultishift|vpconflict|vplzcnt|"
    r"vcvtne2ps2bf16|vdpbf16ps|valign[dq]|vpro[lr][dq]|vpro[lr]v[dq]|vpsravw|vpsllvw|vpsrlvw|"
    r"vp?blendm|vpmovu?s?[qdw][bdw]\b|vcvt\w*2u|vcvtu|vcvtt?\w*2qq|vcvtqq|vcvtuqq|"
    r"v(insert|extract)[fi](32x4|64x2|32x8|64x4)|vshuf[fi](32x4|64x2)|"
    r"vbroadcast[fi](32x[248]|64x[24])|vmovdq[au](8|16|32|64)|vpcmpu?[bwdq]\b|vpmovw2m|vptestn?m)"
)
_YMM = re.compile(r"%ymm\d+")
_AMX_MNEMONIC = re.compile(r"^(ldtilecfg|sttilecfg|tilerelease|tilezero|tileloadd|tileloaddt1|"
                           r"tilestored|tdpbf16ps|tdpfp16ps|tdpb[su][su]d)")


def classify(text: str) -> str | None:
    """'amx', 'avx512', 'avx2' or None (baseline) for one disassembled instruction (AT&T
    syntax)."""
    parts = text.split()
    if not parts:
        return None
    i = 0
    while i < len(parts) and parts[i] in ("lock", "rep", "repz", "repnz", "repe", "repne",
                                          "notrack", "bnd", "data16", "addr32", "cs", "ds"):
        i += 1
    if i >= len(parts):
        return None
    mnemonic = parts[i]
    operands = " ".join(parts[i + 1:]).split("#")[0]
    if _AMX_MNEMONIC.match(mnemonic):
        return "amx"
    if _AVX512_REG.search(operands) or _AVX512_MNEMONIC.match(mnemonic):
        return "avx512"
    if mnemonic.startswith("{evex}") or mnemonic.startswith("{vex}"):
        return "avx2"
    if mnemonic.startswith("v") and mnemonic not in _VMX:
        return "avx2"
    if _YMM.search(operands):
        return "avx2"
    if mnemonic in _BMI:
        return "avx2"
    return None


def qualified_name(demangled: str) -> str:
    """The function's qualified name: clones, return type and parameter list removed, so
    namespaces named only in parameter types do not count."""
    s = re.sub(r" \[clone [^\]]*\]", "", demangled)
    s = s.replace("(anonymous namespace)", "{anon}")
    s = re.sub(r"@@?[\w.]+$", "", s)
    depth = 0
    for pos, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "(" and depth == 0:
            if s[max(0, pos - 8):pos] == "operator":
                continue
            head = s[:pos]
            break
    else:
        head = s
    # Drop a return type ("void ns::f<4>"): the last space outside template brackets.
    depth, cut = 0, 0
    for pos, ch in enumerate(head):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == " " and depth == 0:
            cut = pos + 1
    return head[cut:].replace("{anon}", "(anonymous namespace)")


def has_symtab(path: str) -> bool:
    proc = subprocess.run(["objdump", "-t", path], capture_output=True, text=True)
    return proc.returncode == 0 and "no symbols" not in proc.stdout


def check(path: str, verbose: bool = False) -> int:
    if shutil.which("objdump") is None:
        print("error: objdump not found (Debian/Ubuntu: apt-get install binutils)",
              file=sys.stderr)
        return 2
    if not os.path.isfile(path):
        print(f"error: {path} is not a file", file=sys.stderr)
        return 2
    if not has_symtab(path):
        print(f"error: {path} has no symbol table (stripped), so instructions cannot be "
              "attributed to functions; pass the unstripped build-directory .so "
              "(e.g. build/<wheel_tag>/_core*.so)", file=sys.stderr)
        return 2
    proc = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"error: objdump failed: {proc.stderr.strip()}", file=sys.stderr)
        return 2

    func = "<before any symbol>"
    hits: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    n_insn = 0
    for line in proc.stdout.splitlines():
        m = _FUNC.match(line)
        if m:
            func = m.group(1)
            continue
        m = _INSN.match(line)
        if not m:
            continue
        n_insn += 1
        level = classify(m.group(2))
        if level is not None:
            hits[func][level].append(f"{m.group(1)}: {m.group(2).strip()}")

    bad: list[tuple[str, str, list[str]]] = []
    ok: dict[str, int] = defaultdict(int)
    for f, levels in hits.items():
        name = qualified_name(f)
        for level, insns in levels.items():
            if name.startswith(ALLOWED.get(level, ())):
                ok[name.split("::")[2]] += 1
            else:
                bad.append((f, level, insns))

    print(f"{path}: {n_insn} instructions, {len(hits)} functions use AVX-class instructions")
    for ns, n in sorted(ok.items()):
        print(f"  ok: {n} function/level pairs inside qlora::kernels::{ns}")
    if verbose:
        for f in sorted(hits):
            print(f"  {qualified_name(f)}: {', '.join(sorted(hits[f]))}")
    if not bad:
        print("static ISA check passed: AVX/AVX2/AVX-512 only in the ISA namespaces")
        return 0
    print(f"static ISA check FAILED: {len(bad)} function/level pair(s) outside the allowed ISA namespaces "
          "use AVX-class instructions (SIGILL on CPUs without them):", file=sys.stderr)
    for f, level, insns in sorted(bad):
        allowed = " or ".join(a.rstrip(":") for a in ALLOWED.get(level, ())) or "no namespace"
        print(f"  [{level}] {f}\n      {len(insns)} instruction(s), allowed only in {allowed}; "
              f"first: {insns[0]}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("extension", help="path of the unstripped _core*.so")
    p.add_argument("-v", "--verbose", action="store_true", help="list every AVX-using function")
    args = p.parse_args(argv)
    return check(args.extension, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
