"""The forward pass against the float64 reference, within the derived float32 bound
(reference.forward_bound: |err| <= (in + rank + 4) * 2**-24 * sum|terms| * 1.01), on every
instruction set this CPU supports, and every SIMD table against the scalar one."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from hypothesis import given, strategies as st

import reference as ref
import qlora
from conftest import ISAS, SIMD_ISAS, use_isa
from qlora import QLoraLinear, _core


# The float32 weight each layer was built from, so the reference can quantize it itself
# (QLoraLinear has __slots__, so it is kept beside the layer rather than on it).
_WEIGHTS: "weakref.WeakKeyDictionary[QLoraLinear, np.ndarray]" = weakref.WeakKeyDictionary()


def build(w, **kwargs):
    layer = QLoraLinear.from_weight(w, **kwargs)
    _WEIGHTS[layer] = np.asarray(w, np.float32)
    return layer


def make_layer(out_f, in_f, rank=4, group_size=64, bias=True, seed=0, lora_b=True):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    b = rng.standard_normal(out_f).astype(np.float32) if bias else None
    layer = build(w, rank=rank, alpha=2.5 * rank, group_size=group_size, bias=b, seed=seed)
    if lora_b:
        layer.set_lora_b(rng.standard_normal((out_f, rank)).astype(np.float32))
    return layer


def expected(layer, x):
    """(float64 reference, bound) for layer(x), from the reference's own quantization of the
    weight the layer was built from (never from the layer's codes)."""
    codes, absmax = ref.quantize(_WEIGHTS[layer], layer.group_size)
    deq = ref.dequantize(codes, absmax, layer.group_size)
    args = (np.asarray(x, np.float32), deq, layer.lora_a, layer.lora_b, layer.scaling, layer.bias)
    return ref.forward(*args), ref.forward_bound(*args)


def assert_close(y, x, layer):
    want, bound = expected(layer, x)
    assert y.dtype == np.float32
    assert y.shape == want.shape
    err = np.abs(y.astype(np.float64) - want)
    assert (err <= bound).all(), f"max excess {np.max(err - bound)}"


def test_vector_input(isa):
    layer = make_layer(37, 70, rank=3, group_size=16)
    x = np.random.default_rng(1).standard_normal(70).astype(np.float32)
    y = layer.forward(x)
    assert y.shape == (37,)
    assert_close(y, x, layer)
    np.testing.assert_array_equal(layer(x), y)  # __call__ is forward


@pytest.mark.parametrize("lead", [(0,), (1,), (5,), (2, 3), (2, 0, 3), (1, 1, 1, 4), (300,)])
def test_batch_any_leading_dims(isa, lead):
    layer = make_layer(33, 65, rank=5, group_size=32)
    x = np.random.default_rng(2).standard_normal(lead + (65,)).astype(np.float32)
    y = layer(x)
    assert y.shape == lead + (33,)
    assert_close(y, x, layer)
    # Each row is the same as its own vector forward.
    flat = x.reshape(-1, 65)
    for i in range(min(flat.shape[0], 3)):
        assert_close(layer(flat[i]), flat[i], layer)


def test_zero_length_batch_with_out():
    layer = make_layer(8, 16)
    out = np.empty((0, 8), np.float32)
    assert layer(np.empty((0, 16), np.float32), out=out) is out


def test_bias_and_lora_terms_each_contribute(isa):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((20, 40)).astype(np.float32)
    x = rng.standard_normal((4, 40)).astype(np.float32)
    bias = rng.standard_normal(20).astype(np.float32)
    b = rng.standard_normal((20, 6)).astype(np.float32)
    plain = build(w, rank=6, alpha=3.0)
    y0 = plain(x)
    assert_close(y0, x, plain)  # B == 0: the LoRA term vanishes
    plain.set_bias(bias)
    y1 = plain(x)
    assert_close(y1, x, plain)
    np.testing.assert_allclose(y1 - y0, np.broadcast_to(bias, y1.shape), atol=1e-5)
    plain.set_lora_b(b)
    y2 = plain(x)
    assert_close(y2, x, plain)
    lora = plain.scaling * (x.astype(np.float64) @ plain.lora_a.T.astype(np.float64)) @ b.T
    assert np.abs(lora).max() > 0.1  # the term is large enough to matter
    np.testing.assert_allclose(y2 - y1, lora, atol=1e-4)
    plain.set_bias(None)
    assert_close(plain(x), x, plain)


def test_out_is_written_and_returned(isa):
    layer = make_layer(9, 31)
    x = np.random.default_rng(4).standard_normal((2, 3, 31)).astype(np.float32)
    out = np.full((2, 3, 9), np.nan, np.float32)
    y = layer.forward(x, out=out)
    assert y is out
    assert_close(out, x, layer)
    np.testing.assert_array_equal(out, layer(x))
    v = np.full(9, np.nan, np.float32)
    assert layer(x[0, 0], out=v) is v
    # A single row takes the batch-1 kernel, whose summation order differs from the batched
    # one: equal to the same call without out=, and within the bound of the reference.
    np.testing.assert_array_equal(v, layer(x[0, 0]))
    assert_close(v, x[0, 0], layer)


def test_dequantize_out(isa):
    layer = make_layer(9, 31)
    out = np.empty((9, 31), np.float32)
    assert layer.dequantize_weight(out=out) is out
    np.testing.assert_array_equal(out, layer.dequantize_weight())


def test_converted_inputs_give_same_result():
    layer = make_layer(12, 24)
    x = np.random.default_rng(5).standard_normal((3, 24)).astype(np.float32)
    y = layer(x)
    np.testing.assert_array_equal(layer(x.astype(np.float64)), y)  # exact: x is float32-valued
    np.testing.assert_array_equal(layer(np.asfortranarray(x)), y)
    np.testing.assert_array_equal(layer(x.tolist()), y)
    wide = np.zeros((3, 48), np.float32)
    wide[:, ::2] = x
    np.testing.assert_array_equal(layer(wide[:, ::2]), y)  # non-contiguous view
    xi = np.arange(-36, 36).reshape(3, 24)
    np.testing.assert_array_equal(layer(xi), layer(xi.astype(np.float32)))


@st.composite
def cases(draw):
    out_f = draw(st.integers(1, 300))
    in_f = draw(st.integers(1, 300))
    rank = draw(st.integers(1, min(out_f, in_f, 64)))
    group_size = draw(st.one_of(st.integers(1, 513), st.sampled_from(ref.BNB_BLOCKSIZES)))
    lead = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return out_f, in_f, rank, group_size, lead, bias, seed


@given(case=cases())
def test_forward_matches_reference_property(case):
    out_f, in_f, rank, group_size, lead, bias, seed = case
    x = np.random.default_rng(seed + 1).standard_normal(lead + (in_f,)).astype(np.float32)
    for name in ISAS:  # every instruction set (a fixture would run once per example set)
        with use_isa(name):
            layer = make_layer(out_f, in_f, rank=rank, group_size=group_size, bias=bias,
                               seed=seed)
            assert_close(layer(x), x, layer)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_in_x_propagate(isa, bad):
    layer = make_layer(10, 40, rank=2, group_size=8)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 40)).astype(np.float32)
    x[1, 3] = bad
    x[3, 39] = bad
    x[3, 0] = -bad if not np.isnan(bad) else bad
    y = layer(x)
    codes, absmax = ref.quantize(_WEIGHTS[layer], layer.group_size)
    args = (x, ref.dequantize(codes, absmax, layer.group_size), layer.lora_a, layer.lora_b,
            layer.scaling, layer.bias)
    want = ref.forward_ieee(*args)
    with np.errstate(invalid="ignore"):
        bound = ref.forward_bound(*args)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    inf = np.isinf(want)
    np.testing.assert_array_equal(y[inf], want[inf])
    fin = np.isfinite(want)
    assert np.isfinite(y[fin]).all()
    assert (np.abs(y[fin] - want[fin]) <= bound[fin]).all()
    assert np.isfinite(y[[0, 2, 4]]).all()  # rows without NaN/Inf are untouched
    assert not np.isfinite(y[[1, 3]]).any()


def test_nan_with_zero_lora_b_still_propagates():
    # With B == 0 the LoRA term is NaN * 0 = NaN in IEEE arithmetic: skipping it would hide NaN.
    layer = make_layer(6, 12, rank=2, lora_b=False, bias=False)
    x = np.zeros(12, np.float32)
    x[5] = np.nan
    assert np.isnan(layer(x)).all()


NO_SIMD = pytest.param(None, marks=pytest.mark.skip(reason="no SIMD instruction set here"))


@pytest.mark.parametrize("simd", SIMD_ISAS or [NO_SIMD])
@pytest.mark.parametrize("group_size", [1, 17, 32, 64, 100, 4096])
def test_simd_matches_scalar(simd, group_size):
    for shape in [(1, 1), (7, 33), (64, 64), (129, 255), (300, 193), (17, 1023)]:
        rng = np.random.default_rng(shape[0] * 7 + group_size)
        w = rng.standard_normal(shape).astype(np.float32)
        w[0, : shape[1] // 2] = 0.0
        bias = rng.standard_normal(shape[0]).astype(np.float32)
        results = {}
        for name in ("scalar", simd):
            with use_isa(name):
                layer = build(w, rank=1, group_size=group_size, bias=bias)
                layer.set_lora_b(np.ones((shape[0], 1), np.float32))
                results[name] = layer
        s, v = results["scalar"], results[simd]
        # Codes, scales and dequantized weights are bit-identical (the kernels.h contract) ...
        np.testing.assert_array_equal(s.scale.view(np.uint32), v.scale.view(np.uint32))
        np.testing.assert_array_equal(s._state.weight.codes, v._state.weight.codes)
        with use_isa(simd):
            deq_v = v.dequantize_weight()
        np.testing.assert_array_equal(s.dequantize_weight().view(np.uint32), deq_v.view(np.uint32))
        # ... and the forward, for batches on both sides of kBatchChunk (256), is within the
        # float32 bound of the exact result on both.
        for batch in (1, 5, 257):
            x = rng.standard_normal((batch, shape[1])).astype(np.float32)
            for name in ("scalar", simd):
                with use_isa(name):
                    assert_close(results[name](x), x, results[name])


def unaligned(a):
    """A copy of ``a`` whose data starts one byte past an aligned address."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    u = buf[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned and u.flags.c_contiguous
    return u


class _AlignedOnly:
    """Wraps a core function and fails if any array argument is misaligned."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        for i, arg in enumerate(args):
            if isinstance(arg, np.ndarray):
                assert arg.flags.aligned, f"argument {i} reached the core misaligned"
        return self.fn(*args)


@pytest.fixture
def aligned_core(monkeypatch):
    """The core's array-taking entry points, guarded: no misaligned array may reach them."""
    spies = {}
    for name in ("forward", "quantize_nf4", "dequantize_nf4"):
        spies[name] = _AlignedOnly(getattr(_core, name))
        monkeypatch.setattr(_core, name, spies[name])
    return spies


def test_unaligned_and_byte_swapped_arrays(isa, aligned_core):
    # A float32 view at an odd byte offset is C-contiguous but misaligned: it is copied at the
    # Python boundary like any other layout the core does not take, so the core only ever
    # reads aligned float*; the results equal the aligned ones. Byte-swapped arrays are
    # converted.
    rng = np.random.default_rng(8)
    w = rng.standard_normal((40, 70)).astype(np.float32)
    x = rng.standard_normal((5, 70)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    a = rng.standard_normal((2, 70)).astype(np.float32)
    b = rng.standard_normal((40, 2)).astype(np.float32)
    layer = build(w, rank=2, group_size=16, bias=bias)
    layer.set_lora(a, b, scaling=0.5)
    y = layer(x)
    assert_close(y, x, layer)
    np.testing.assert_array_equal(layer(unaligned(x)), y)
    np.testing.assert_array_equal(layer(unaligned(x[0])), layer(x[0]))  # batch 1 sums apart
    buf = np.zeros(x.nbytes + 1, np.uint8)
    buf[1:] = x.view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(layer(np.frombuffer(buf, np.float32, offset=1).reshape(5, 70)),
                                  y)
    np.testing.assert_array_equal(layer(x.astype(">f4")), y)
    for other in (unaligned(w), w.astype(">f4")):
        twin = QLoraLinear.from_weight(other, rank=2, group_size=16, bias=unaligned(bias))
        np.testing.assert_array_equal(twin._state.weight.codes, layer._state.weight.codes)
        np.testing.assert_array_equal(twin.scale, layer.scale)
        twin.set_lora(unaligned(a), unaligned(b), scaling=0.5)
        np.testing.assert_array_equal(twin(x), y)
        twin.set_lora_a(unaligned(a))
        twin.set_lora_b(unaligned(b))
        twin.set_bias(unaligned(bias))
        np.testing.assert_array_equal(twin(unaligned(x)), y)
    assert aligned_core["forward"].calls >= 8 and aligned_core["quantize_nf4"].calls >= 3


def test_misaligned_out_is_refused(aligned_core):
    rng = np.random.default_rng(8)
    layer = build(rng.standard_normal((40, 70)), rank=2, group_size=16)
    x = rng.standard_normal((5, 70)).astype(np.float32)
    y = layer(x)
    out = unaligned(np.full((5, 40), 7.0, np.float32))
    with pytest.raises(ValueError, match="out must be aligned"):
        layer(x, out=out)
    np.testing.assert_array_equal(out, 7.0)  # untouched
    deq = unaligned(np.zeros((40, 70), np.float32))
    with pytest.raises(ValueError, match="out must be aligned"):
        layer.dequantize_weight(out=deq)
    np.testing.assert_array_equal(layer(x), y)
    with pytest.raises(TypeError, match="out"):
        layer(x, out=np.zeros((5, 40), ">f4"))


@pytest.mark.parametrize("group_size", [64, 48])
def test_results_depend_on_the_chunk_size_as_the_readme_says(isa, group_size, restore_threads):
    # README "Determinism": a call is cut into 256-row chunks and each chunk's size picks the
    # kernel (1 row: batch-1; 2-8: small-batch on AVX-512 with aligned groups; else GEMM). A row
    # is bit-identical wherever its chunk has the same kernel, whatever the thread count.
    rng = np.random.default_rng(11)
    layer = make_layer(96, 256, rank=3, group_size=group_size)
    x = rng.standard_normal((300, 256)).astype(np.float32)
    one = layer(x[:1])[0]
    np.testing.assert_array_equal(layer(x[:257])[256], layer(x[256:257])[0])  # a 1-row chunk
    np.testing.assert_array_equal(layer(x[:9])[0], layer(x[:256])[0])  # GEMM both times
    np.testing.assert_array_equal(layer(x[:2])[0], layer(x[:8])[0])  # the same kernel
    if isa == "scalar":
        np.testing.assert_array_equal(layer(x[:32])[0], one)  # one order for every batch
    for b in (1, 2, 8, 9, 32):
        assert_close(layer(x[:b]), x[:b], layer)
    for threads in (1, 2, 3):
        qlora.set_num_threads(threads)
        np.testing.assert_array_equal(layer(x[:1])[0], one)
