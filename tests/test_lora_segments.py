"""Mixed-adapter batches through ``_core.forward_adapters``: random mixes of segments (each row on
one adapter or none, rows in any order, empty segments, every row on one adapter, ranks 1..64,
per-row scales) on every instruction set this CPU supports. Every row must be within the
float64 reference's bound (reference.forward_bound with that row's adapter and scale) and within
the two bounds of the single-adapter forward of the same row alone; permuting the rows of the
batch permutes the result bit for bit; and the thread count never changes a bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import qlora
import reference as ref
from conftest import ISAS, use_isa
from qlora import _core


def make_tensor(out_f, in_f, group_size, seed=0):
    """An Nf4Tensor quantized by the core, and its dequantized weight (float32)."""
    w = np.random.default_rng(seed).standard_normal((out_f, in_f)).astype(np.float32)
    codes = np.empty(_core.packed_bytes(out_f, in_f), np.uint8)
    absmax = np.empty(_core.group_count(out_f * in_f, group_size), np.float32)
    _core.quantize_nf4(w, group_size, codes, absmax)
    t = _core.Nf4Tensor(codes, absmax, None, None, None, 0.0, out_f, in_f, group_size)
    deq = np.empty((out_f, in_f), np.float32)
    _core.dequantize_nf4(t, deq)
    return t, deq


def make_adapters(rng, ranks, out_f, in_f):
    return [(rng.uniform(-0.3, 0.3, (r, in_f)).astype(np.float32),
             rng.standard_normal((out_f, r)).astype(np.float32) * np.float32(0.2),
             np.float32(rng.uniform(0.25, 4.0))) for r in ranks]


def segments_for(assign, adapters, row_scale):
    """One segment per adapter over the rows assigned to it (ascending, possibly none); with
    row_scale, each row's own scale. An adapter holding every row gets rows=None."""
    batch = len(assign)
    segs = []
    for i, (a, b, s) in enumerate(adapters):
        rows = np.flatnonzero(assign == i).astype(np.int64)
        scales = None if row_scale is None else row_scale[rows].copy()
        if batch > 0 and len(rows) == batch:
            segs.append((a, b, float(s), None, scales))
        else:
            segs.append((a, b, float(s), rows, scales))
    return segs


def row_expectation(x, deq, bias, assign, adapters, row_scale, r):
    """(float64 value, bound) of row r with its own adapter (or none) and scale."""
    i = assign[r]
    in_f, out_f = deq.shape[1], deq.shape[0]
    if i < 0:
        a, b, s = np.zeros((0, in_f), np.float32), np.zeros((out_f, 0), np.float32), 0.0
    else:
        a, b, s = adapters[i]
        s = float(s if row_scale is None else row_scale[r])
    args = (x[r:r + 1], deq, a, b, s, bias)
    return ref.forward(*args)[0], ref.forward_bound(*args)[0], (a, b, s)


mixes = st.fixed_dictionaries({
    "out_f": st.integers(1, 70),
    "in_f": st.integers(1, 90),
    "group_size": st.sampled_from([17, 32, 64, 100, 128]),
    "batch": st.integers(0, 24),
    "ranks": st.lists(st.integers(1, 64), min_size=0, max_size=6),
    "assign_mode": st.sampled_from(["random", "one_adapter", "no_adapter"]),
    "per_row_scale": st.booleans(),
    "bias": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
})


@given(mixes)
def test_random_mixes_match_reference_and_single_rows(m):
    rng = np.random.default_rng(m["seed"])
    out_f, in_f, batch = m["out_f"], m["in_f"], m["batch"]
    t, deq = make_tensor(out_f, in_f, m["group_size"], m["seed"] % 1000)
    adapters = make_adapters(rng, m["ranks"], out_f, in_f)
    n_ad = len(adapters)
    if m["assign_mode"] == "one_adapter" and n_ad > 0:
        assign = np.zeros(batch, np.int64)
    elif m["assign_mode"] == "no_adapter" or n_ad == 0:
        assign = np.full(batch, -1, np.int64)
    else:  # -1: base only; some adapters may get no row at all
        assign = rng.integers(-1, n_ad, batch)
    row_scale = rng.uniform(-2.0, 2.0, batch).astype(np.float32) if m["per_row_scale"] else None
    bias = rng.standard_normal(out_f).astype(np.float32) if m["bias"] else None
    x = rng.standard_normal((batch, in_f)).astype(np.float32)
    segs = segments_for(assign, adapters, row_scale)
    for isa in ISAS:
        with use_isa(isa):
            y = np.full((batch, out_f), np.nan, np.float32)
            _core.forward_adapters(t, x, segs, bias, y)
            for r in range(batch):
                want, bound, (a, b, s) = row_expectation(x, deq, bias, assign, adapters, row_scale, r)
                err = np.abs(y[r].astype(np.float64) - want)
                assert (err <= bound).all(), f"{isa} row {r}: max excess {np.max(err - bound)}"
                # The same row alone, with its adapter as the layer's only one.
                y1 = np.empty((1, out_f), np.float32)
                one = [(a, b, s, None, None)] if a.shape[0] > 0 else []
                _core.forward_adapters(t, x[r:r + 1], one, bias, y1)
                assert (np.abs(y[r].astype(np.float64) - y1[0]) <= 2 * bound).all(), f"{isa} row {r}"


@pytest.mark.parametrize("batch", [1, 2, 5, 8, 9, 40, 256])
def test_row_order_and_thread_count_change_no_bit(batch, restore_threads):
    """Rows in any order: shuffling the batch (and the segments' row lists with it) shuffles the
    result exactly; 1, 2 and 3 threads agree bit for bit. Up to one batch chunk, so every row
    runs through the same product kernel wherever it sits."""
    out_f, in_f = 75, 96
    t, _ = make_tensor(out_f, in_f, 32, 3)
    rng = np.random.default_rng(batch)
    adapters = make_adapters(rng, [16, 8, 64, 1], out_f, in_f)
    assign = rng.integers(-1, len(adapters), batch)
    row_scale = rng.uniform(0.5, 2.0, batch).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    x = rng.standard_normal((batch, in_f)).astype(np.float32)
    perm = rng.permutation(batch)
    for isa in ISAS:
        with use_isa(isa):
            results = []
            for threads in (1, 2, 3):
                qlora.set_num_threads(threads)
                y = np.empty((batch, out_f), np.float32)
                _core.forward_adapters(t, x, segments_for(assign, adapters, row_scale), bias, y)
                results.append(y)
            for y in results[1:]:
                np.testing.assert_array_equal(y, results[0], err_msg=isa)
            yp = np.empty((batch, out_f), np.float32)
            _core.forward_adapters(t, np.ascontiguousarray(x[perm]),
                                   segments_for(assign[perm], adapters, row_scale[perm]), bias, yp)
            np.testing.assert_array_equal(yp, results[0][perm], err_msg=isa)


def test_batch_crossing_a_chunk_with_overlapping_segments():
    """300 rows (two batch chunks): an adapter on every row plus adapters on scattered rows, so
    some rows get two terms; each row within the float64 bound of the sum of its terms."""
    out_f, in_f = 40, 64
    t, deq = make_tensor(out_f, in_f, 64, 5)
    rng = np.random.default_rng(9)
    (a0, b0, s0), (a1, b1, s1) = make_adapters(rng, [4, 33], out_f, in_f)
    x = rng.standard_normal((300, in_f)).astype(np.float32)
    rows = np.sort(rng.choice(300, 111, replace=False)).astype(np.int64)
    segs = [(a0, b0, float(s0), None, None), (a1, b1, float(s1), rows, None),
            (a1, b1, 1.0, np.zeros(0, np.int64), None)]
    for isa in ISAS:
        with use_isa(isa):
            y = np.empty((300, out_f), np.float32)
            _core.forward_adapters(t, x, segs, None, y)
            want = ref.forward(x, deq, a0, b0, float(s0))
            mag = ref.forward_abs(x, deq, a0, b0, float(s0))
            want[rows] += float(s1) * ((x[rows].astype(np.float64) @ a1.T.astype(np.float64))
                                       @ b1.T.astype(np.float64))
            mag[rows] += abs(float(s1)) * ((np.abs(x[rows].astype(np.float64)) @ np.abs(a1.T))
                                           @ np.abs(b1.T))
            bound = (in_f + 4 + 33 + in_f + 4) * 2.0**-24 * mag * 1.01
            assert (np.abs(y - want) <= bound).all(), isa
