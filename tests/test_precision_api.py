"""The compute precisions from the public API: ``qlora.set_precision`` / ``get_precision``,
``QLORA_PRECISION``, ``layer.forward(x, precision=...)``, ``qlora.kernel_info()``, the fallback
rules, thread-count independence and each precision's error bound against float64.

Error bounds, per output element y[b, o], against the float64 product of the same x with the
layer's own dequantized float32 weight w = deq(W) (``layer.dequantize_weight()``), plus the LoRA
term and the bias in float64. Notation: n = in_features, r = rank, eps = 2**-24 (float32's unit
roundoff), S = sum_c |x_c| |w_c|, L = scaling * sum_j |x| |A_j| |B_oj| (the LoRA term's absolute
sum), beta = |bias_o|. Every float32 sum of m terms of absolute sum T is within gamma_m * T of
the exact sum, gamma_m = m eps / (1 - m eps), written m eps * 1.01 here (m eps < 1 %).

fp32: only float32 rounding of the products and sums: |err| <= (n + r + 4) eps 1.01 (S + L + beta).
The LoRA term costs n + r + 2 roundings (x A^T, then B, then the scaling) and joining base, LoRA
and bias two more, so n + r + 4 covers every order the kernels may use.

bf16: x and w are rounded to bfloat16 (8 significant bits, round to nearest even), unit
roundoff u = 2**-8: xh = x (1 + d1), wh = w (1 + d2), |d1|, |d2| <= u, so

    |xh wh - x w| = |x w| |d1 + d2 + d1 d2| <= (2u + u**2) |x w| = (2**-7 + 2**-16) |x w|.

A product of two 8-bit significands has at most 16 bits, so xh * wh is exact in float32; their
float32 sum is the fp32 case above with S replaced by sum |xh wh| <= (1 + u)**2 S. Hence

    |err| <= (2**-7 + 2**-16) S + (n + r + 4) eps 1.01 ((1 + u)**2 S + L + beta) + tiny,

tiny = 2**-126 per term for denormals flushed to zero (AVX512-BF16 does).
:func:`test_bf16_constant_is_the_rounding_of_both_operands` checks the constant: a one-column
bf16 product is exactly bf16(x) * bf16(w), and bf16 rounding's relative error reaches but never
exceeds u.

int8: per row, x is cut into blocks of 32 columns with d = amax / 127 and q = round(x / d), so
|x_c - d q_c| <= d / 2 (plus float32 rounding of x * (127 / amax) and of d, below d * 2**-14);
each weight is s * T8[c] / 127 instead of w_c = fl(s * NF4[c]), s the group's absmax, and
|NF4[c] - T8[c] / 127| <= t = 0.0037 (REFERENCE.md; recomputed below), so
|w_c - s T8[c] / 127| <= t s + eps |w_c|. Writing x w - (d q)(s T8 / 127) =
x (w - s T8/127) + (x - d q) (s T8/127):

    |err| <= sum_c |x_c| (t s_c + eps |w_c|) + (1/2 + 2**-14) sum_c d_c (|w_c| + t s_c)
             + (n + r + 8) eps 1.01 (A + L + beta),

A = sum_c (|x_c| + d_c / 2 + d_c 2**-14) (|w_c| + t s_c) bounding the blocks' absolute sum. The
int32 block sums are exact (|isum| <= 32 * 127 * 127 < 2**24, so also exact as float32); each
block's scale d * s / 127 costs three roundings and its addition one, which n + 8 covers since
n >= 32 * blocks - 31.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qlora
from qlora import QLoraLinear, _core

EPS = 2.0**-24
U_BF16 = 2.0**-8
TINY = 2.0**-126
CHOICES = "'fp32', 'bf16', 'int8'"
ENTRY = {"fp32": "gemm_nf4_f32", "bf16": "gemm_nf4_bf16", "int8": "gemm_nf4_q8"}


@pytest.fixture
def restore_precision():
    """Restore the process default precision after a test that changes it."""
    saved = qlora.get_precision()
    yield saved
    qlora.set_precision(saved)


def make_layer(out_f=70, in_f=192, group_size=64, rank=4, seed=0, bias=True):
    """A Gaussian layer with a non-zero LoRA term and (optionally) a bias."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    b = rng.standard_normal(out_f).astype(np.float32) if bias else None
    layer = QLoraLinear.from_weight(w, rank=rank, alpha=2.0 * rank, group_size=group_size,
                                    bias=b, seed=seed)
    layer.set_lora_b(rng.normal(0, 0.05, (out_f, rank)).astype(np.float32))
    return layer


def xs(batch, in_f, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, in_f)).astype(np.float32)


def served(layer, precision, batch):
    return _core.gemm_choice(layer._state.tensor, precision, batch)


def native(precision, layer=None, batch=32):
    """True when this CPU has a kernel that computes ``precision`` for this layer and batch."""
    layer = layer or make_layer()
    return served(layer, precision, batch)["precision"] == precision


def python(code, **env):
    full = {k: v for k, v in os.environ.items()
            if k not in ("QLORA_PRECISION", "QLORA_FORCE_ISA", "QLORA_NUM_THREADS")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=120)


# ------------------------------------------------------------------ set/get, env, forward(precision=)
def test_default_is_fp32_without_the_environment_variable():
    r = python("import qlora; print(qlora.get_precision())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "fp32"
    r = python("import qlora; print(qlora.get_precision())", QLORA_PRECISION="")
    assert r.stdout.strip() == "fp32"


def test_set_precision_round_trip(restore_precision):
    for name in ("bf16", "int8", "fp32", "int8"):
        qlora.set_precision(name)
        assert qlora.get_precision() == name
        assert qlora.kernel_info()["precision"] == name


@pytest.mark.parametrize("bad", ["fp16", "BF16", "", " int8", "float32"])
def test_set_precision_rejects_unknown_names(bad, restore_precision):
    qlora.set_precision("bf16")
    with pytest.raises(ValueError) as e:
        qlora.set_precision(bad)
    msg = str(e.value)
    assert "name" in msg and CHOICES in msg and repr(bad) in msg
    assert qlora.get_precision() == "bf16"  # unchanged


@pytest.mark.parametrize("bad", [None, 16, b"bf16", ["fp32"], np.float32(1)])
def test_set_precision_rejects_non_strings(bad, restore_precision):
    with pytest.raises(TypeError) as e:
        qlora.set_precision(bad)
    msg = str(e.value)
    assert "name" in msg and CHOICES in msg and type(bad).__name__ in msg
    assert qlora.get_precision() == restore_precision


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_default_precision_drives_later_forwards(precision, restore_precision):
    layer, x = make_layer(), xs(33, 192)
    explicit = layer.forward(x, precision=precision)
    fp32 = layer.forward(x, precision="fp32")
    qlora.set_precision(precision)
    assert np.array_equal(layer.forward(x), explicit)
    assert np.array_equal(layer(x), explicit)
    if native(precision, layer, 33):
        assert not np.array_equal(explicit, fp32)  # the setting really changed the kernel
    qlora.set_precision("fp32")
    assert np.array_equal(layer.forward(x), fp32)


def test_per_call_precision_overrides_the_default(restore_precision):
    layer, x = make_layer(), xs(9, 192)
    ref = {p: layer.forward(x, precision=p) for p in ("fp32", "bf16", "int8")}
    for default in ("fp32", "bf16", "int8"):
        qlora.set_precision(default)
        for p, y in ref.items():
            assert np.array_equal(layer.forward(x, precision=p), y), (default, p)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_environment_sets_the_default(precision):
    code = ("import numpy as np, qlora\n"
            "w = np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)\n"
            "layer = qlora.QLoraLinear.from_weight(w, rank=2)\n"
            "x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)\n"
            f"same = np.array_equal(layer.forward(x), layer.forward(x, precision={precision!r}))\n"
            "print(qlora.get_precision(), same)\n")
    r = python(code, QLORA_PRECISION=precision)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [precision, "True"]


@pytest.mark.parametrize("bad", ["fp16", "BF16", "int4", " fp32"])
def test_environment_invalid_value_fails_the_import(bad):
    r = python("import qlora", QLORA_PRECISION=bad)
    assert r.returncode == 1  # a Python exception, not a signal
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and "QLORA_PRECISION" in last
    assert CHOICES in last and repr(bad) in last


@pytest.mark.parametrize("bad, exc", [("fp64", ValueError), ("FP32", ValueError),
                                      ("", ValueError), (32, TypeError), (b"int8", TypeError),
                                      (True, TypeError)])
def test_forward_rejects_bad_precision_and_leaves_the_layer(bad, exc):
    layer, x = make_layer(), xs(3, 192)
    before = layer._state
    out = np.full((3, 70), 7.0, np.float32)
    with pytest.raises(exc) as e:
        layer.forward(x, out=out, precision=bad)
    msg = str(e.value)
    assert "precision" in msg and CHOICES in msg
    assert (repr(bad) if exc is ValueError else type(bad).__name__) in msg
    assert layer._state is before and (out == 7.0).all()  # nothing written, nothing changed


def test_precision_is_keyword_only():
    layer, x = make_layer(), xs(2, 192)
    with pytest.raises(TypeError):
        layer.forward(x, None, "bf16")


# ------------------------------------------------------------------ kernel_info
def _chain(info):
    """The ISAs the active one may take kernels from: itself and those below it."""
    avail = info["available_isas"]
    return avail[avail.index(info["isa"]):]


def test_kernel_info_is_a_plain_json_dict():
    info = qlora.kernel_info()
    assert type(info) is dict
    again = json.loads(json.dumps(info))
    assert again == info  # plain types only: a round trip through JSON changes nothing
    assert set(info) >= {"isa", "available_isas", "compiled_isas", "cpu_features", "precision",
                         "num_threads", "precisions", "isa_kernels"}
    assert info["isa"] == qlora.active_isa()
    assert info["available_isas"] == qlora.available_isas()
    assert set(info["available_isas"]) <= set(info["compiled_isas"])
    assert info["num_threads"] == qlora.get_num_threads()
    assert info["precision"] == qlora.get_precision()
    assert set(info["precisions"]) == {"fp32", "bf16", "int8"}
    assert set(info["isa_kernels"]) == set(info["available_isas"])
    for p, regimes in info["precisions"].items():
        assert regimes and regimes[0]["from_batch"] == 1
        starts = [r["from_batch"] for r in regimes]
        assert starts == sorted(set(starts))
        for r in regimes:
            assert set(r) == {"from_batch", "kernel", "isa", "precision", "fallback"}
            isa, entry = r["kernel"].split(".")
            assert isa == r["isa"] and isa in _chain(info)
            assert entry in info["isa_kernels"][isa]  # served by what that ISA provides
            assert entry == ENTRY[r["precision"]]
            assert r["fallback"] == (r["precision"] != p)
            if r["fallback"]:
                assert r["precision"] == "fp32"  # the fastest path at least as accurate
            assert r["isa"] != "scalar" or p == "fp32"  # the scalar emulation is a spec only
    assert not any(r["fallback"] for r in info["precisions"]["fp32"])


def test_kernel_info_names_the_kernels_the_cpu_features_promise():
    info = qlora.kernel_info()
    print("\nkernel_info: isa", info["isa"], "| features", ",".join(info["cpu_features"]), "|",
          "; ".join(f"{p}: " + ", ".join(f"{r['kernel']}@{r['from_batch']}"
                                         + ("(fallback)" if r["fallback"] else "")
                                         for r in regs)
                    for p, regs in info["precisions"].items()))
    for p in ("bf16", "int8"):
        providers = [isa for isa in _chain(info) if isa != "scalar"
                     and ENTRY[p] in info["isa_kernels"][isa]]
        regimes = info["precisions"][p]
        if providers:
            assert any(not r["fallback"] for r in regimes), (p, providers, regimes)
            # The best provider serves the largest batches it is offered for.
            assert regimes[-1]["isa"] in providers
        else:
            assert all(r["fallback"] for r in regimes), (p, regimes)
    # The features detected decide which ISAs are offered (AMX only when the OS grants it).
    feats = set(info["cpu_features"])
    for isa in info["available_isas"]:
        assert isa == "scalar" or isa in feats, isa
    if "avx512_bf16" in feats and "gemm_nf4_bf16" in info["isa_kernels"].get("avx512_bf16", []) \
            and "avx512_bf16" in _chain(info):
        first = info["precisions"]["bf16"][0]
        assert not first["fallback"] and first["kernel"] == "avx512_bf16.gemm_nf4_bf16"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_gemm_choice_of_a_layer_matches_kernel_info(precision):
    info = qlora.kernel_info()["precisions"][precision]
    layer = make_layer()
    for batch in (1, 2, 7, 8, 9, 16, 24, 31, 32, 33, 64, 200, 256, 300, 1000):
        chunk = min(batch, _core.BATCH_CHUNK)
        expected = [r for r in info if r["from_batch"] <= chunk][-1]
        got = served(layer, precision, batch)
        assert got["kernel"] == expected["kernel"], (batch, got, expected)
        assert got["precision"] == expected["precision"]


# ------------------------------------------------------------------ fallback rules
@pytest.mark.parametrize("shape, group_size", [((6, 96), 48), ((5, 40), 64), ((3, 17), 32)])
def test_int8_on_a_layer_without_whole_blocks_runs_fp32_exactly(shape, group_size):
    # Groups of 48 do not hold whole 32-column blocks; rows of 40 or 17 columns start
    # mid-block of the flat groups: every int8 kernel needs one scale per block.
    layer = make_layer(*shape, group_size=group_size, rank=2)
    for batch in (1, 8, 40):
        x = xs(batch, shape[1], seed=batch)
        assert served(layer, "int8", batch)["precision"] == "fp32"
        y8, y32 = layer.forward(x, precision="int8"), layer.forward(x, precision="fp32")
        assert y8.tobytes() == y32.tobytes()  # bit for bit


def test_int8_on_whole_blocks_is_not_fp32_where_a_kernel_exists():
    layer, x = make_layer(64, 256, group_size=64), xs(8, 256)
    if not native("int8", layer, 8):
        pytest.skip(f"SKIPPED: no int8 kernel on this CPU ({served(layer, 'int8', 8)['kernel']})")
    assert not np.array_equal(layer.forward(x, precision="int8"),
                              layer.forward(x, precision="fp32"))


class _Isa:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.saved = _core.active_isa()
        _core.set_isa(self.name)

    def __exit__(self, *exc):
        _core.set_isa(self.saved)


@pytest.mark.skipif("avx2" not in _core.available_isas(), reason="SKIPPED: no AVX2 on this CPU")
def test_avx2_serves_bf16_as_fp32_and_int8_with_its_own_kernel():
    layer, before = make_layer(64, 256), _core.active_isa()
    with _Isa("avx2"):
        info = qlora.kernel_info()
        assert info["isa"] == "avx2"
        own = info["isa_kernels"]["avx2"]
        assert "gemm_nf4_bf16" not in own  # AVX2 has no bf16 instruction
        for batch in (1, 8, 40):
            x = xs(batch, 256, seed=batch)
            y32 = layer.forward(x, precision="fp32")
            assert served(layer, "bf16", batch)["kernel"] == "avx2.gemm_nf4_f32"
            assert layer.forward(x, precision="bf16").tobytes() == y32.tobytes()
            y8 = layer.forward(x, precision="int8")
            if "gemm_nf4_q8" in own:  # the AVX2 int8 kernel has landed
                assert served(layer, "int8", batch)["kernel"] == "avx2.gemm_nf4_q8"
                assert not np.array_equal(y8, y32)
            else:
                assert served(layer, "int8", batch)["kernel"] == "avx2.gemm_nf4_f32"
                assert y8.tobytes() == y32.tobytes()
    assert _core.active_isa() == before


# ------------------------------------------------------------------ threads
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_bit_identical_for_any_thread_count(precision, restore_threads):
    layer = make_layer(96, 320, group_size=64, rank=8)
    for batch in (1, 5, 8, 33, 300):
        x = xs(batch, 320, seed=batch)
        results = []
        for n in (1, 2, 3):
            qlora.set_num_threads(n)
            results.append(layer.forward(x, precision=precision).tobytes())
        assert results[0] == results[1] == results[2], (precision, batch)


# ------------------------------------------------------------------ error bounds
def bf16(a):
    """float32 -> bf16 -> float32, round to nearest even (finite values), from the bits."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def reference(layer, x):
    """float64 y, S (= |x| @ |w|.T), L and |bias| from the layer's own dequantized weight."""
    x64 = x.astype(np.float64)
    w64 = layer.dequantize_weight().astype(np.float64)
    a64, b64 = layer.lora_a.astype(np.float64), layer.lora_b.astype(np.float64)
    bias = np.zeros(layer.out_features) if layer.bias is None else layer.bias.astype(np.float64)
    y = x64 @ w64.T + layer.scaling * (x64 @ a64.T) @ b64.T + bias
    s = np.abs(x64) @ np.abs(w64).T
    lo = layer.scaling * (np.abs(x64) @ np.abs(a64).T) @ np.abs(b64).T
    return y, s, lo, np.abs(bias), w64


def bound_fp32(layer, x):
    y, s, lo, beta, _ = reference(layer, x)
    m = layer.in_features + layer.rank + 4
    return y, m * EPS * 1.01 * (s + lo + beta) + TINY * (2 * m)


def bound_bf16(layer, x):
    y, s, lo, beta, _ = reference(layer, x)
    m = layer.in_features + layer.rank + 4
    b = ((2.0**-7 + 2.0**-16) * s + m * EPS * 1.01 * ((1 + U_BF16) ** 2 * s + lo + beta)
         + TINY * (2 * m + 4))
    return y, b


def table_error():
    """max |NF4[c] - round(127 NF4[c]) / 127|, and the int8 table it implies."""
    cb = np.array(_core.NF4_CODEBOOK, np.float64)
    t8 = np.round(127 * cb)
    return float(np.max(np.abs(cb - t8 / 127))), t8


def bound_int8(layer, x, parts=False):
    y, _, lo, beta, w64 = reference(layer, x)
    n, out_f = layer.in_features, layer.out_features
    t, _ = table_error()
    x64 = np.abs(x.astype(np.float64))
    # d per element of x: its 32-column block's amax / 127 (blocks restart at each row).
    blocks = -(-n // 32)
    padded = np.zeros(x.shape[:-1] + (blocks * 32,))
    padded[..., :n] = x64
    d = np.repeat(padded.reshape(*x.shape[:-1], blocks, 32).max(-1) / 127, 32, -1)[..., :n]
    # s per weight: the absmax of its flat group.
    flat = np.arange(out_f * n) // layer.group_size
    s = layer.scale.astype(np.float64)[flat].reshape(out_f, n)
    wa = np.abs(w64) + t * s
    err = x64 @ (t * s + EPS * np.abs(w64)).T + (0.5 + 2.0**-14) * (d @ wa.T)
    a = (x64 + d * (0.5 + 2.0**-14)) @ wa.T
    m = n + layer.rank + 8
    summation = m * EPS * 1.01 * (a + lo + beta) + TINY * (2 * m)
    return (y, err, summation) if parts else (y, err + summation)


BOUNDS = {"fp32": bound_fp32, "bf16": bound_bf16, "int8": bound_int8}


def test_reference_table_error_is_as_stated():
    t, t8 = table_error()
    assert t8.tolist() == [-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127]
    assert 0.0030 < t <= 0.0037


def test_bf16_constant_is_the_rounding_of_both_operands():
    # bf16 rounding's relative error never exceeds u = 2**-8 and comes within 1 % of it (a tie
    # half an ulp above a power of two), so 2u + u**2 is the product's constant.
    v = np.random.default_rng(5).standard_normal(200_000).astype(np.float32)
    rel = np.abs(bf16(v).astype(np.float64) / v - 1)
    assert 0.99 * U_BF16 < rel.max() <= U_BF16
    tie = np.float32(1 + 2.0**-8)
    assert bf16(np.array([tie]))[0] == 1.0 and abs(float(tie) - 1) / float(tie) < U_BF16
    # One column: y = bf16(x) * bf16(w) exactly, since the product of two 8-bit significands is
    # exact in float32. Ties (low 16 bits 0x8000) and near-ties check round to nearest even.
    layer = make_layer(37, 1, group_size=64, rank=1, bias=False)
    layer.set_lora_b(np.zeros((37, 1), np.float32))
    if not native("bf16", layer, 1):
        pytest.skip("SKIPPED: no bf16 kernel on this CPU")
    base = np.random.default_rng(6).standard_normal(64).astype(np.float32).view(np.uint32)
    low = np.array([0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF, 0x7FFE], np.uint32)
    xv = ((base[:, None] & 0xFFFF0000) | low[None, :]).ravel().view(np.float32)[:, None]
    w = layer.dequantize_weight()
    expected = bf16(xv).astype(np.float64) @ bf16(w).astype(np.float64).T
    for batch in (1, 8, len(xv)):
        y = layer.forward(xv[:batch], precision="bf16")
        assert np.array_equal(y.astype(np.float64), expected[:batch]), batch


def int8_model(layer, x):
    """The int8 arithmetic in NumPy, independent of the core's kernels: Q8 blocks of 32 per row
    (float32 127 / amax, round half to even), the int8 codebook round(127 v), exact block dot
    products, each scaled by d * s / 127 and summed in float64; then the LoRA term and bias."""
    n, out_f = layer.in_features, layer.out_features
    _, t8 = table_error()
    blocks = -(-n // 32)
    xp = np.zeros((x.shape[0], blocks * 32), np.float32)
    xp[:, :n] = x
    xb = xp.reshape(x.shape[0], blocks, 32)
    amax = np.abs(xb).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, 0).astype(np.float32)
    q = np.clip(np.rint((xb * inv[..., None]).astype(np.float32)), -127, 127)
    d = (amax / np.float32(127)).astype(np.float32).astype(np.float64)
    # The codes, recovered from the dequantized weight and the scales (exact: w = fl(v * s)).
    w = layer.dequantize_weight()
    flat = np.arange(out_f * n) // layer.group_size
    s = layer.scale[flat].reshape(out_f, n)
    cb = np.array(_core.NF4_CODEBOOK, np.float32)
    codes = np.abs((cb[None, None, :] * s[..., None]).astype(np.float32) - w[..., None]).argmin(-1)
    wq = np.zeros((out_f, blocks * 32))
    wq[:, :n] = t8[codes]
    sb = np.zeros((out_f, blocks * 32))
    sb[:, :n] = s
    sblk = sb.reshape(out_f, blocks, 32)[..., 0]  # one scale per block (whole-block layouts)
    isum = np.einsum("bkj,okj->bok", q.astype(np.float64), wq.reshape(out_f, blocks, 32))
    y = np.einsum("bok,bk,ok->bo", isum, d, sblk / 127)
    x64 = x.astype(np.float64)
    bias = 0 if layer.bias is None else layer.bias.astype(np.float64)
    return y + layer.scaling * (x64 @ layer.lora_a.astype(np.float64).T) @ \
        layer.lora_b.astype(np.float64).T + bias


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int8_bound_holds_for_a_numpy_model_of_the_int8_arithmetic(group_size):
    # Checks the derivation itself, on any CPU: the exactly computed int8 arithmetic (no float32
    # summation) lies within the bound, and uses a real part of it (not a vacuous bound).
    worst = 0.0
    for out_f, in_f in ((7, 32), (33, 256), (20, 1024)):
        layer = make_layer(out_f, in_f, group_size=group_size, rank=3, seed=in_f)
        x = xs(17, in_f, seed=in_f) * np.linspace(0.1, 10, in_f, dtype=np.float32)
        ref, rounding, summation = bound_int8(layer, x, parts=True)
        bound = rounding + summation
        model = int8_model(layer, x)
        err = np.abs(model - ref)
        assert (err <= bound).all(), float(np.max(err / bound))
        worst = max(worst, float(np.max(err / bound)))
        if native("int8", layer, 17):
            # The kernel computes the model's numbers up to the order of its float32 sums.
            y = layer.forward(x, precision="int8").astype(np.float64)
            assert (np.abs(y - model) <= 2 * summation).all()
    assert worst > 0.1, worst  # measured 0.12-0.32


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_within_the_derived_bound_of_float64(precision, group_size):
    rng = np.random.default_rng(group_size)
    # (5, 96) at group 64 and 256: groups straddle rows, so int8 runs (and is bounded as) fp32.
    for out_f, in_f in ((1, 32), (7, 64), (33, 256), (70, 1024), (5, 96)):
        layer = make_layer(out_f, in_f, group_size=group_size, rank=min(3, out_f), seed=out_f + in_f)
        for batch in (1, 3, 8, 17, 40):
            x = rng.standard_normal((batch, in_f)).astype(np.float32) * 3
            y = layer.forward(x, precision=precision).astype(np.float64)
            ref, bound = BOUNDS[precision](layer, x)
            err = np.abs(y - ref)
            assert (err <= bound).all(), (precision, out_f, in_f, batch,
                                          float(np.max(err / bound)))


def test_reduced_precisions_exceed_the_fp32_bound():
    # Where a kernel exists, bf16 and int8 really round: their error exceeds what float32
    # rounding alone allows somewhere, so passing their own bounds is not passing fp32's.
    layer, x = make_layer(70, 1024, rank=3), xs(40, 1024)
    for p, tighter in (("bf16", "fp32"), ("int8", "fp32")):
        if not native(p, layer, 40):
            continue
        y = layer.forward(x, precision=p).astype(np.float64)
        ref, bound = BOUNDS[tighter](layer, x)
        assert (np.abs(y - ref) > bound).any(), p


def test_relative_frobenius_difference_to_fp32(capsys):
    """Gaussian weight and activations, 1024 x 4096, group 64, batch 32 (and batch 1): the
    distance of each precision to the fp32 path, printed. bf16 (two roundings of relative size
    up to 2**-8, random in sign) measures about 0.2-0.3 %; int8 (activation steps of amax/127
    over 32 Gaussian values and the table's rounding) about 0.8 %. Each is asserted inside a
    band around the measured figure, wide enough for other data, narrow enough that a silent
    fp32 fallback (0) or a broken kernel (> 2 %) fails."""
    layer = make_layer(1024, 4096, group_size=64, rank=16, seed=11)
    bands = {"bf16": (0.001, 0.006), "int8": (0.004, 0.016)}
    for batch in (32, 1):
        x = xs(batch, 4096, seed=12 + batch)
        y32 = layer.forward(x, precision="fp32").astype(np.float64)
        for p, (lo, hi) in bands.items():
            choice = served(layer, p, batch)
            y = layer.forward(x, precision=p).astype(np.float64)
            rel = float(np.linalg.norm(y - y32) / np.linalg.norm(y32))
            with capsys.disabled():
                print(f"\n{p} vs fp32, batch {batch}: relative Frobenius difference "
                      f"{100 * rel:.3f} % ({choice['kernel']})", end="")
            if choice["precision"] != p:
                assert rel == 0.0  # the fallback is fp32 itself
                continue
            assert lo < rel < hi, (p, batch, rel)
