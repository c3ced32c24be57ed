"""The int8 precision from Python: each int8 kernel against an independent NumPy model of the
int8 arithmetic (tight bound), the int8 result against the float64 product of the layer's own
dequantized weights (the derived error bound), the relative Frobenius difference to fp32,
bit-identical results for any thread count, and the fp32 fallback for layers whose groups do not
line up with 32-column blocks.

The int8 arithmetic (precision.h): each row of x is cut into blocks of 32 columns;
``d = amax / 127`` and ``q = rint(x * float32(127 / amax))`` (ties to even) per block; a weight is
``kNf4Int8[code] * float32(scale * float32(1 / 127))``; per block the int32 dot of q and the int8
codes is exact, and ``float(isum) * float32(d * ws)`` is added in float32.
"""

from __future__ import annotations

import numpy as np
import pytest

import qlora
from qlora import QLoraLinear, _core

U = 2.0**-24  # unit roundoff of float32
NF4_INT8 = np.array([-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127])
# max |round(127 v) / 127 - v| over the NF4 codebook (REFERENCE.md: 0.0037 of absmax).
TABLE_ERR = float(np.max(np.abs(NF4_INT8 / 127.0 - np.array(_core.NF4_CODEBOOK, np.float64))))
assert 0.0036 < TABLE_ERR < 0.0037

def _has_int8(isa: str) -> bool:
    """Whether the ISA's own table has an int8 product kernel (forward with isa= raises if not)."""
    t = _tensor(1, 32, 32)[0]
    try:
        _core.forward(t, np.zeros((1, 32), np.float32), np.zeros((0, 32), np.float32),
                      np.zeros((1, 0), np.float32), 0.0, None, np.empty((1, 1), np.float32),
                      precision="int8", isa=isa)
    except ValueError:
        return False
    return True


def _tensor(out_f, in_f, group_size, seed=0, double_quant=False):
    """(Nf4Tensor, dequantized float32 weight) of a Gaussian weight."""
    w = np.random.default_rng(seed).standard_normal((out_f, in_f), dtype=np.float32)
    if double_quant:
        # The one place a layer's private tensor is used: double quantization has no _core entry.
        t = QLoraLinear.from_weight(w, rank=1, group_size=group_size, double_quant=True)._state.tensor
    else:
        codes = np.empty(_core.packed_bytes(out_f, in_f), np.uint8)
        absmax = np.empty(_core.group_count(out_f * in_f, group_size), np.float32)
        _core.quantize_nf4(w, group_size, codes, absmax)
        t = _core.Nf4Tensor(codes, absmax, None, None, None, 0.0, out_f, in_f, group_size)
    deq = np.empty((out_f, in_f), np.float32)
    _core.dequantize_nf4(t, deq)
    return t, deq


INT8_ISAS = [n for n in _core.available_isas() if n != "scalar" and _has_int8(n)]
MISSING = [n for n in ("avx512_vnni", "avx_vnni", "avx2", "neon_dot")
           if n in _core.compiled_isas() and n not in _core.available_isas()]
# Every int8 kernel this CPU runs, the scalar specification included; the others are skipped
# with a message naming them.
KERNELS = ["scalar"] + INT8_ISAS + [
    pytest.param(n, marks=pytest.mark.skip(reason=f"{n}: this CPU lacks its instructions"))
    for n in MISSING
]


def run(t, x, precision="int8", isa=None, bias=None, lora=None):
    out_f = t.out_features
    a, b, s = lora if lora is not None else (np.zeros((0, t.in_features), np.float32),
                                             np.zeros((out_f, 0), np.float32), 0.0)
    y = np.empty((x.shape[0], out_f), np.float32)
    _core.forward(t, x, a, b, s, bias, y, precision=precision, isa=isa)
    return y


def q8_model(x):
    """NumPy float32 model of quantize_q8 (finite inputs): (q as int64, d as float32) by block."""
    batch, in_f = x.shape
    cols = -(-in_f // 32) * 32
    xp = np.zeros((batch, cols), np.float32)
    xp[:, :in_f] = x
    blocks = xp.reshape(batch, cols // 32, 32)
    amax = np.abs(blocks).max(axis=2)
    with np.errstate(divide="ignore"):
        inv = np.float32(127.0) / amax
    ok = (amax > 0) & np.isfinite(inv)
    q = np.where(ok[..., None], np.rint(blocks * np.where(ok, inv, 0)[..., None]), 0)
    d = np.where(ok, amax / np.float32(127.0), np.float32(0)).astype(np.float32)
    return q.astype(np.int64), d


def int8_model(x, deq, codes_int8, scales):
    """(exact value of the int8 sum of terms, sum of |terms|) in float64, per output element.
    codes_int8: (out, cols) the int8 table entry of each weight; scales: (out, blocks) float32."""
    q, d = q8_model(x)
    batch, nb = d.shape
    out_f = deq.shape[0]
    ws = (scales * np.float32(1.0 / 127.0)).astype(np.float32)  # (out, nb), float32 rounding
    cq = codes_int8.reshape(out_f, nb, 32)
    isum = np.einsum("bkc,okc->bok", q, cq)  # exact in int64
    s = (d[:, None, :] * ws[None, :, :]).astype(np.float32)  # float32(d * ws)
    terms = (isum.astype(np.float32) * s).astype(np.float64)  # each term rounds once in float32
    return terms.sum(axis=2), np.abs(terms).sum(axis=2)


def int8_codes_and_scales(deq, group_size):
    """Recover each weight's int8 table entry and its block scale from the dequantized weight:
    a group's scale is max |deq| over it (its absmax element decodes to code 0 or 15)."""
    out_f, in_f = deq.shape
    flat = deq.reshape(-1).astype(np.float64)
    g = np.arange(flat.size) // group_size
    smax = np.zeros(g[-1] + 1)
    np.maximum.at(smax, g, np.abs(flat))
    s = smax[g]
    v = np.divide(flat, s, out=np.zeros_like(flat), where=s > 0)
    code = np.abs(v[:, None] - np.array(_core.NF4_CODEBOOK)[None, :]).argmin(axis=1)
    ci = NF4_INT8[code].reshape(out_f, in_f)
    scales = s.reshape(out_f, in_f)[:, ::32].astype(np.float32)  # q8_layout_ok: one group per block
    return ci, scales, s.reshape(out_f, in_f)


SHAPES = [(1, 32), (5, 64), (7, 96), (18, 160), (3, 224), (33, 256), (9, 480), (17, 512), (6, 544),
          (4, 992), (65, 1056)]
GROUPS = [32, 64, 96, 128, 160]


@pytest.mark.parametrize("isa", KERNELS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_each_int8_kernel_matches_the_numpy_model(isa, group_size):
    # Every kernel sums the same float32 terms as the model, in some order, then adds the bias:
    # recursive summation of nb + 1 terms is within gamma_nb * sum |terms| of the exact sum.
    for k, (out_f, in_f) in enumerate(SHAPES):
        for dq in (False, True):
            t, deq = _tensor(out_f, in_f, group_size, seed=k, double_quant=dq)
            ci, scales, _ = int8_codes_and_scales(deq, group_size)
            bias = np.random.default_rng(k).standard_normal(out_f).astype(np.float32)
            for batch in (1, 3, 8, 17, 33):
                x = np.random.default_rng(100 + batch).standard_normal((batch, in_f), dtype=np.float32)
                y = run(t, x, isa=isa, bias=bias if batch % 2 else None)
                want, mag = int8_model(x, deq, ci, scales)
                if batch % 2:
                    want, mag = want + bias, mag + np.abs(bias)
                nb = in_f // 32 + 1
                bound = nb * U / (1 - nb * U) * mag * 1.001 + 1e-30
                err = np.abs(y.astype(np.float64) - want)
                assert (err <= bound).all(), (isa, group_size, out_f, in_f, dq, batch, np.max(err - bound))


def float64_bound(x, deq, s_col, bias_abs, lora_mag):
    """Per-element bound of the int8 forward against x @ deq.T (float64), derived:

    per block of 32 columns with d = amax / 127, the quantized activation q * d differs from x
    by at most d / 2 (the rounding to an integer) plus 3u |x| (the float32 reciprocal, product
    and d); the int8 weight kNf4Int8[c] * float32(s / 127) differs from the dequantized weight
    code_value * s by at most TABLE_ERR * s (0.00368 of the group scale s, the table's rounding)
    plus u |deq| + 2u s (the float32 roundings of deq and of s / 127). With ex and ew those
    per-element errors, |x w - x' w'| <= |ex| |w| + |x| |ew| + |ex| |ew|. The float32 evaluation
    (one rounding per block term's two multiplies, nb + 1 additions with the bias, and the fp32
    LoRA term added once) adds (nb + 4) u times the sum of |x'| |w'| and |bias|, plus the LoRA
    term's own fp32 bound."""
    batch, in_f = x.shape
    cols = -(-in_f // 32) * 32
    nb = cols // 32
    xa = np.abs(x.astype(np.float64))
    d = xa.reshape(batch, nb, 32).max(axis=2) / 127.0
    ex = np.repeat(d, 32, axis=1)[:, :in_f] * (0.5 + U) + 3.01 * U * xa
    wa = np.abs(deq.astype(np.float64))
    ew = TABLE_ERR * s_col + U * wa + 2.01 * U * s_col
    quant = ex @ wa.T + xa @ ew.T + ex @ ew.T
    mag = (xa + ex) @ (wa + ew).T + bias_abs
    return quant + (nb + 4) * U * mag * 1.01 + lora_mag + 1e-30


@pytest.mark.parametrize("group_size", GROUPS)
def test_int8_within_the_derived_bound_of_the_float64_product(group_size):
    rank = 4
    for k, (out_f, in_f) in enumerate(SHAPES):
        for dq in (False, True):
            t, deq = _tensor(out_f, in_f, group_size, seed=10 + k, double_quant=dq)
            _, _, s_col = int8_codes_and_scales(deq, group_size)
            rng = np.random.default_rng(k)
            bias = rng.standard_normal(out_f).astype(np.float32)
            a = rng.standard_normal((rank, in_f)).astype(np.float32) * 0.1
            b = rng.standard_normal((out_f, rank)).astype(np.float32) * 0.1
            for batch in (1, 2, 5, 9, 33, 257):
                x = rng.standard_normal((batch, in_f), dtype=np.float32) * 3
                y = run(t, x, bias=bias, lora=(a, b, 0.5))
                x64 = x.astype(np.float64)
                xa = x64 @ a.T.astype(np.float64)
                want = x64 @ deq.T.astype(np.float64) + bias + 0.5 * xa @ b.T.astype(np.float64)
                lora_mag = (rank + in_f + 4) * U * 1.01 * 0.5 * (np.abs(x64) @ np.abs(a.T) @ np.abs(b.T))
                bound = float64_bound(x, deq, s_col, np.abs(bias), lora_mag)
                err = np.abs(y.astype(np.float64) - want)
                assert (err <= bound).all(), (group_size, out_f, in_f, dq, batch, np.max(err / bound))


# Measured on Gaussian x and W (1024 x 4096, group 64): 0.0081-0.0084 at batches 1, 16, 64
# (int8 activations and the int8 table add about 0.8% to fp32's result); asserted with
# a margin, and from below so a kernel silently running fp32 would fail too.
FROB_MEASURED = 0.0082


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_relative_frobenius_difference_to_fp32(batch):
    t, _ = _tensor(1024, 4096, 64, seed=3)
    x = np.random.default_rng(batch).standard_normal((batch, 4096), dtype=np.float32)
    y8, y32 = run(t, x), run(t, x, precision="fp32")
    rel = np.linalg.norm(y8 - y32) / np.linalg.norm(y32)
    print(f"batch {batch}: relative Frobenius difference int8 vs fp32 = {rel:.5f}")
    assert 0.5 * FROB_MEASURED < rel < 1.5 * FROB_MEASURED


@pytest.mark.parametrize("batch", [1, 3, 8, 40, 300])
def test_bit_identical_for_any_thread_count(batch, restore_threads):
    t, _ = _tensor(523, 1056, 64, seed=4)
    x = np.random.default_rng(batch).standard_normal((batch, 1056), dtype=np.float32)
    results = []
    for n in (1, 2, 3, 5):
        qlora.set_num_threads(n)
        results.append(run(t, x).view(np.uint32))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


@pytest.mark.parametrize("shape, group_size", [((9, 100), 50), ((9, 96), 17), ((9, 100), 32),
                                               ((9, 64), 100)])
def test_layers_failing_q8_layout_run_fp32_exactly(shape, group_size):
    t, _ = _tensor(*shape, group_size)
    for batch in (1, 6):
        choice = _core.gemm_choice(t, "int8", batch)
        assert choice["fallback"] is True and choice["precision"] == "fp32"
        x = np.random.default_rng(batch).standard_normal((batch, shape[1]), dtype=np.float32)
        np.testing.assert_array_equal(run(t, x).view(np.uint32),
                                      run(t, x, precision="fp32").view(np.uint32))


def test_kernel_info_names_the_int8_kernel():
    regimes = _core.kernel_info()["precisions"]["int8"]
    t, _ = _tensor(8, 64, 64)
    if not INT8_ISAS:
        pytest.skip("no SIMD int8 kernel on this CPU: int8 runs fp32")
    print("int8 regimes:", regimes)
    assert all(r["precision"] == "int8" and not r["fallback"] for r in regimes)
    assert regimes[0]["isa"] == INT8_ISAS[0]
    for batch in (1, 8, 300):
        assert _core.gemm_choice(t, "int8", batch)["kernel"].endswith("gemm_nf4_q8")


def test_nan_and_inf_in_x_reach_the_output():
    t, _ = _tensor(5, 128, 64)
    x = np.random.default_rng(0).standard_normal((3, 128), dtype=np.float32)
    x[0, 5] = np.nan
    x[2, 100] = np.inf
    y = run(t, x)
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all() and not np.isfinite(y[2]).any()
