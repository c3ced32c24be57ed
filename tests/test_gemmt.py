"""The backward's kernels from Python: ``_core.input_grad`` (dx = grad_y @ deq(W)) against NumPy
float64 ``g @ deq(W)`` within the derived float32 bound, on every instruction set this CPU runs,
over odd sizes, group sizes, plain and double-quantized scales and batches 1..300; bit-identical
for 1, 2 and 3 threads; and the training bindings (``_core.forward_train``, ``_core.backward``,
``_core.dropout_mask``) against float64 formulas.

The bound: every dx element is a float32 sum of out_features products, each product and each
partial sum rounded once (the batch-1 kernels fold the group scale into g, one more rounding), so
|dx - exact| <= (out + 2) * 2**-24 * sum_o |g[b, o] * deq[o, i]|; the tests allow out + 4, as the
forward's bound does (reference.forward_bound). Batch 1 sums blocks of ROW_BLOCK rows separately
and adds the block sums in order: chains of at most ROW_BLOCK terms plus one addition per block,
inside the same bound.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from conftest import ISAS, use_isa
from qlora import _core

EPS = 2.0**-24
ROW_BLOCK = 512  # kGemmTRowBlock in kernels.h: the batch-1 driver's fixed row blocks
NESTED_MAP = ((np.arange(256, dtype=np.float32) - 127) / 128).astype(np.float32)
NESTED_OFFSET = np.float32(0.37)


def make_tensor(out_f, in_f, group_size, nested, seed=0):
    """(Nf4Tensor, float64 deq(W)) from the reference's own quantization of a random weight; the
    double-quantized variant replaces the scales by arbitrary 8-bit codes over NESTED_MAP."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    codes = np.empty(_core.packed_bytes(out_f, in_f), np.uint8)
    absmax = np.empty(_core.group_count(out_f * in_f, group_size), np.float32)
    _core.quantize_nf4(w, group_size, codes, absmax)
    flat_codes, ref_absmax = ref.quantize(w, group_size)
    np.testing.assert_array_equal(absmax, ref_absmax)
    groups = absmax.size
    if not nested:
        t = _core.Nf4Tensor(codes, absmax, None, None, None, 0.0, out_f, in_f, group_size)
        return t, ref.dequantize(flat_codes, absmax, group_size).astype(np.float64)
    qscales = ((np.arange(groups) * 37 + 11) % 256).astype(np.uint8)
    nested_scales = (0.3 + 0.1 * np.arange(-(-groups // 256))).astype(np.float32)
    # group_scale's float32 arithmetic: one multiply, then one add.
    scale = (NESTED_MAP[qscales] * nested_scales[np.arange(groups) // 256]).astype(np.float32) + NESTED_OFFSET
    t = _core.Nf4Tensor(codes, None, qscales, nested_scales, NESTED_MAP, float(NESTED_OFFSET), out_f, in_f, group_size)
    return t, ref.dequantize(flat_codes, scale.astype(np.float32), group_size).astype(np.float64)


def assert_within_bound(dx, g, deq):
    g64 = g.reshape(-1, deq.shape[0]).astype(np.float64)
    want = g64 @ deq
    bound = (deq.shape[0] + 4) * EPS * (np.abs(g64) @ np.abs(deq)) * 1.01 + 1e-30
    err = np.abs(dx.reshape(want.shape).astype(np.float64) - want)
    assert (err <= bound).all(), f"max excess {np.max(err - bound)}"


def input_grad(t, g):
    dx = np.full(g.shape[:-1] + (t.in_features,), np.nan, np.float32)
    _core.input_grad(t, g, dx)
    return dx


@pytest.mark.parametrize("group_size", [17, 32, 64, 100, 128])
@pytest.mark.parametrize("nested", [False, True])
def test_input_grad_odd_sizes(isa, group_size, nested):
    for out_f in (1, 7, 33):
        for in_f in (1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 63, 67, 127, 129, 255):
            t, deq = make_tensor(out_f, in_f, group_size, nested, seed=out_f * 1000 + in_f)
            rng = np.random.default_rng(in_f)
            for batch in (1, 2, 5, 9):
                g = rng.standard_normal((batch, out_f)).astype(np.float32)
                assert_within_bound(input_grad(t, g), g, deq)


@pytest.mark.parametrize("shape", [(600, 1100, 100), (530, 1024, 64), (70, 4096, 128)])
def test_input_grad_batches_and_threads(isa, shape, restore_threads):
    out_f, in_f, gs = shape
    for nested in (False, True):
        t, deq = make_tensor(out_f, in_f, gs, nested, seed=out_f)
        rng = np.random.default_rng(in_f)
        for batch in (1, 3, 8, 31, 256, 300):
            if isa == "scalar" and batch > 31:
                continue  # the scalar specification runs the same row loop; seconds per call here
            g = rng.standard_normal((batch, out_f)).astype(np.float32)
            _core.set_num_threads(1)
            dx1 = input_grad(t, g)
            assert_within_bound(dx1, g, deq)
            for threads in (2, 3):
                _core.set_num_threads(threads)
                np.testing.assert_array_equal(input_grad(t, g).view(np.uint32), dx1.view(np.uint32))


def plain_rows(t, codes, absmax, r0, r1):
    """The Nf4Tensor of rows [r0, r1) of a plain-scaled tensor whose groups never straddle rows."""
    out_f, in_f, gs = t.out_features, t.in_features, t.group_size
    row_bytes = codes.size // out_f
    gpr = in_f // gs
    return _core.Nf4Tensor(codes[r0 * row_bytes : r1 * row_bytes].copy(), absmax[r0 * gpr : r1 * gpr].copy(),
                           None, None, None, 0.0, r1 - r0, in_f, gs)


@pytest.mark.parametrize("shape", [(1300, 1024, 64), (1537, 160, 32), (1025, 512, 128)])
def test_input_grad_batch1_is_row_blocks_added_in_order(isa, shape, restore_threads):
    """Batch 1 on layers taller than one row block: the result is, bit for bit, the float32 sum in
    block order of the same product over each block of ROW_BLOCK rows as a layer of its own (a
    block of at most ROW_BLOCK rows is one chain), for 1, 2 and 3 threads, within the bound."""
    out_f, in_f, gs = shape
    rng = np.random.default_rng(out_f)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    codes = np.empty(_core.packed_bytes(out_f, in_f), np.uint8)
    absmax = np.empty(_core.group_count(out_f * in_f, gs), np.float32)
    _core.quantize_nf4(w, gs, codes, absmax)
    t = _core.Nf4Tensor(codes, absmax, None, None, None, 0.0, out_f, in_f, gs)
    flat_codes, _ = ref.quantize(w, gs)
    deq = ref.dequantize(flat_codes, absmax, gs).astype(np.float64)
    g = rng.standard_normal((1, out_f)).astype(np.float32)
    want = None
    for r0 in range(0, out_f, ROW_BLOCK):
        r1 = min(out_f, r0 + ROW_BLOCK)
        part = input_grad(plain_rows(t, codes, absmax, r0, r1), np.ascontiguousarray(g[:, r0:r1]))
        want = part if want is None else (want + part).astype(np.float32)
    assert out_f > 2 * ROW_BLOCK
    assert_within_bound(want, g, deq)
    for threads in (1, 2, 3):
        _core.set_num_threads(threads)
        np.testing.assert_array_equal(input_grad(t, g).view(np.uint32), want.view(np.uint32))


def test_input_grad_leading_dims_and_rows():
    t, deq = make_tensor(33, 65, 32, False)
    g = np.random.default_rng(3).standard_normal((2, 3, 33)).astype(np.float32)
    dx = input_grad(t, g)
    assert dx.shape == (2, 3, 65)
    assert_within_bound(dx, g, deq)
    with pytest.raises(ValueError, match="grad_y"):
        _core.input_grad(t, np.zeros((2, 32), np.float32), np.zeros((2, 65), np.float32))


@pytest.mark.parametrize("simd", [name for name in ISAS if name != "scalar"] or [None])
def test_simd_input_grad_near_scalar(simd):
    if simd is None:
        pytest.skip("no SIMD instruction set on this CPU")
    t, deq = make_tensor(129, 255, 64, False, seed=9)
    g = np.random.default_rng(4).standard_normal((13, 129)).astype(np.float32)
    with use_isa("scalar"):
        s = input_grad(t, g).astype(np.float64)
    with use_isa(simd):
        v = input_grad(t, g).astype(np.float64)
    # Each is within the bound of the exact sum, so they are within twice it of each other.
    bound = 2 * (129 + 4) * EPS * (np.abs(g.astype(np.float64)) @ np.abs(deq)) * 1.01
    assert (np.abs(s - v) <= bound).all()


# ------------------------------------------------------------------ training bindings


def splitmix64(z):
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_multipliers(p, seed, batch, in_f):
    """train.h's dropout, written out in NumPy: keep when the hash of (seed, flat index) < t."""
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64(seed))
        idx = np.arange(1, batch * in_f + 1, dtype=np.uint64)
        h = splitmix64(key + idx * np.uint64(0x9E3779B97F4A7C15))
    keep = (h >> np.uint64(40)) < np.uint64(round((1.0 - float(np.float32(p))) * 2**24))
    scale = np.float32(1.0 / (1.0 - float(np.float32(p))))
    return np.where(keep, scale, np.float32(0)).astype(np.float32).reshape(batch, in_f)


def test_dropout_mask_is_the_documented_hash():
    for p in (0.0, 0.1, 0.5):
        mask = np.empty((17, 129), np.uint8)
        _core.dropout_mask(17, 129, p, 2024, mask)
        np.testing.assert_array_equal(mask, dropout_multipliers(p, 2024, 17, 129) != 0)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_training_bindings_match_float64(isa, p):
    out_f, in_f, rank, gs = 37, 70, 4, 32
    t, deq = make_tensor(out_f, in_f, gs, False, seed=5)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, in_f)).astype(np.float32)
    a = (0.2 * rng.standard_normal((rank, in_f))).astype(np.float32)
    b = (0.2 * rng.standard_normal((out_f, rank))).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    g = rng.standard_normal((2, 3, out_f)).astype(np.float32)
    s = 1.5
    y = np.empty((2, 3, out_f), np.float32)
    u = np.empty((2, 3, rank), np.float32)
    _core.forward_train(t, x, a, b, s, bias, y, u, dropout=p, seed=11)
    m = dropout_multipliers(p, 11, 6, in_f).astype(np.float64)
    x64, g64 = x.reshape(6, in_f).astype(np.float64), g.reshape(6, out_f).astype(np.float64)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    xt = x64 * m
    u_want = xt @ a64.T
    tol = 1e-4  # float32 sums of at most 70 terms of order 1: far inside it, far outside a bug
    np.testing.assert_allclose(u.reshape(6, rank), u_want, rtol=0, atol=tol)
    y_want = x64 @ deq.T + bias + s * u_want @ b64.T
    np.testing.assert_allclose(y.reshape(6, out_f), y_want, rtol=0, atol=tol * 10)

    dx = np.empty_like(x)
    da = np.empty_like(a)
    db = np.empty_like(b)
    dbias = np.empty_like(bias)
    _core.backward(t, x, a, b, s, u, g, dx=dx, da=da, db=db, dbias=dbias, dropout=p, seed=11)
    gb = g64 @ b64
    np.testing.assert_allclose(db, s * g64.T @ u.reshape(6, rank).astype(np.float64), rtol=0, atol=tol)
    np.testing.assert_allclose(da, s * gb.T @ xt, rtol=0, atol=tol)
    np.testing.assert_allclose(dx.reshape(6, in_f), g64 @ deq + s * m * (gb @ a64), rtol=0, atol=tol * 10)
    np.testing.assert_allclose(dbias, g64.sum(axis=0), rtol=0, atol=tol)
    with pytest.raises(ValueError, match="x is needed"):
        _core.backward(t, None, a, b, s, u, g, da=da)
    with pytest.raises(ValueError, match="dropout"):
        _core.forward_train(t, x, a, b, s, bias, y, u, dropout=1.0)
