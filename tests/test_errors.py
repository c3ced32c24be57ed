"""Every validation rule of the API: the exception type, and a message that names the argument
and the values involved. Failed setters leave the layer unchanged; a rejected ``out`` is left
untouched; the C++ core refuses bad sizes and dtypes on its own, without converting."""

from __future__ import annotations

import re

import numpy as np
import pytest

from qlora import QLoraLinear, _core, get_num_threads, set_num_threads


def W(out_f=4, in_f=8, seed=0):
    return np.random.default_rng(seed).standard_normal((out_f, in_f)).astype(np.float32)


def raises(exc, *fragments):
    """pytest.raises that also requires every fragment (literal text) in the message."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


@pytest.fixture
def layer():
    rng = np.random.default_rng(1)
    layer = QLoraLinear.from_weight(W(), rank=2, alpha=4.0, group_size=16,
                                    bias=rng.standard_normal(4).astype(np.float32))
    layer.set_lora_b(rng.standard_normal((4, 2)).astype(np.float32))
    return layer


X = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)


# ---------------------------------------------------------------- from_weight arguments
@pytest.mark.parametrize("rank", [0, -1, 5, 9])
def test_rank_out_of_range(rank):
    with raises(ValueError, "rank", "1", "4", str(rank)):
        QLoraLinear.from_weight(W(4, 8), rank=rank)


@pytest.mark.parametrize("rank", [1, 4])
def test_rank_bounds_inclusive(rank):
    assert QLoraLinear.from_weight(W(4, 8), rank=rank).rank == rank


@pytest.mark.parametrize("rank", [2.0, "2", True, None])
def test_rank_not_integer(rank):
    with raises(TypeError, "rank"):
        QLoraLinear.from_weight(W(), rank=rank)


@pytest.mark.parametrize("alpha, shown", [(0, "0"), (-1.5, "-1.5"), (float("nan"), "nan"),
                                          (float("inf"), "inf"), (-float("inf"), "-inf")])
def test_alpha_invalid(alpha, shown):
    with raises(ValueError, "alpha", shown):
        QLoraLinear.from_weight(W(), rank=2, alpha=alpha)


@pytest.mark.parametrize("alpha", ["16", None, 1j])
def test_alpha_not_real(alpha):
    with raises(TypeError, "alpha"):
        QLoraLinear.from_weight(W(), rank=2, alpha=alpha)


@pytest.mark.parametrize("group_size", [0, -64])
def test_group_size_invalid(group_size):
    with raises(ValueError, "group_size", str(group_size)):
        QLoraLinear.from_weight(W(), rank=2, group_size=group_size)


@pytest.mark.parametrize("w, shape", [(np.ones(8), "(8,)"), (np.ones((2, 3, 4)), "(2, 3, 4)"),
                                      (np.float32(1), "()")])
def test_weight_not_2d(w, shape):
    with raises(ValueError, "weight", "2-D", shape):
        QLoraLinear.from_weight(w, rank=1)


@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (0, 0)])
def test_weight_empty_dimension(shape):
    with raises(ValueError, "weight", str(shape)):
        QLoraLinear.from_weight(np.ones(shape, np.float32), rank=1)


@pytest.mark.parametrize("bad, label", [(np.nan, "NaN"), (np.inf, "infinite"),
                                        (-np.inf, "infinite")])
def test_weight_non_finite_says_where(bad, label):
    w = W(5, 9)
    w[3, 7] = bad
    with raises(ValueError, "weight", label, "(3, 7)"):
        QLoraLinear.from_weight(w, rank=1)


def test_weight_too_large_for_float32_is_reported():
    w = np.ones((2, 3))
    w[1, 2] = 1e39  # finite in float64, Inf in float32
    with pytest.warns(RuntimeWarning), raises(ValueError, "weight", "(1, 2)", "float32"):
        QLoraLinear.from_weight(w, rank=1)


@pytest.mark.parametrize("w, what", [
    (np.ones((2, 3), np.complex64), "complex"),
    (np.ones((2, 3), bool), "bool"),
    (np.ones((2, 3), object), "object"),
    (np.full((2, 3), "a"), "U1"),
    ([["a", "b"], ["c", "d"]], "U1"),
    ("weights", "U7"),
])
def test_weight_bad_dtype(w, what):
    with raises(TypeError, "weight", what):
        QLoraLinear.from_weight(w, rank=1)


def test_weight_ragged_list():
    with raises(TypeError, "weight"):
        QLoraLinear.from_weight([[1.0, 2.0], [3.0]], rank=1)


@pytest.mark.parametrize("convert", [
    lambda w: w.astype(np.float64), lambda w: w.astype(np.float16), lambda w: w.astype(np.int8),
    lambda w: w.astype(np.int16), lambda w: w.astype(np.int32), lambda w: w.astype(np.int64),
    lambda w: w.astype(np.uint8), lambda w: w.astype(np.longdouble), np.asfortranarray,
    lambda w: np.repeat(w, 2, axis=-1)[..., ::2], lambda w: w.tolist(),
    lambda w: w[::-1][::-1],
], ids=["f64", "f16", "i8", "i16", "i32", "i64", "u8", "longdouble", "fortran", "strided",
        "list", "negative-strides"])
def test_other_real_dtypes_and_layouts_match_float32(convert):
    # Small integers are exact in every dtype above, so every conversion means the same matrix.
    rng = np.random.default_rng(3)
    w32 = rng.integers(0, 100, size=(6, 40)).astype(np.float32)
    bias = rng.integers(0, 9, 6)
    base = QLoraLinear.from_weight(w32, rank=2, group_size=32, bias=bias.astype(np.float32))
    other = QLoraLinear.from_weight(convert(w32), rank=2, group_size=32, bias=convert(bias))
    np.testing.assert_array_equal(other._state.weight.codes, base._state.weight.codes)
    np.testing.assert_array_equal(other.scale, base.scale)
    np.testing.assert_array_equal(other.lora_a, base.lora_a)
    np.testing.assert_array_equal(other(X[:, :8].repeat(5, axis=1)),
                                  base(X[:, :8].repeat(5, axis=1)))


def test_bias_wrong_shape_and_values():
    with raises(ValueError, "bias", "(4,)", "(5,)"):
        QLoraLinear.from_weight(W(), rank=1, bias=np.zeros(5))
    with raises(ValueError, "bias", "NaN", "(2,)"):
        QLoraLinear.from_weight(W(), rank=1, bias=[0, 0, np.nan, 0])
    with raises(TypeError, "bias", "complex"):
        QLoraLinear.from_weight(W(), rank=1, bias=np.zeros(4, complex))


def test_seed_invalid():
    with raises(ValueError, "seed", "-1"):
        QLoraLinear.from_weight(W(), rank=1, seed=-1)
    with raises(TypeError, "seed"):
        QLoraLinear.from_weight(W(), rank=1, seed=1.5)


def test_direct_construction_refused():
    with raises(TypeError, "from_weight"):
        QLoraLinear()


# ---------------------------------------------------------------- forward arguments
@pytest.mark.parametrize("shape", [(3, 7), (7,), (9,), (2, 3, 4095), (8, 1)])
def test_x_wrong_last_dim(layer, shape):
    with raises(ValueError, "x must have shape (..., 8) to match in_features", f"got {shape}"):
        layer(np.ones(shape, np.float32))


def test_x_wrong_last_dim_big_layer():
    big = QLoraLinear.from_weight(np.ones((2, 4096), np.float32), rank=1)
    with raises(ValueError, "x must have shape (..., 4096) to match in_features, got (3, 4095)"):
        big(np.ones((3, 4095), np.float32))


@pytest.mark.parametrize("x", [np.array(1.0, np.float32), np.float32(1.0), 1.0])
def test_x_zero_d(x):
    # in_features == 1, so a 0-d x must not pass as a length-1 vector.
    one = QLoraLinear.from_weight(np.ones((3, 1), np.float32), rank=1)
    with raises(ValueError, "x", "0-d"):
        one(x)


@pytest.mark.parametrize("x, what", [(np.ones(8, complex), "complex"), (np.ones(8, bool), "bool"),
                                     (np.array(["a"] * 8), "U1")])
def test_x_bad_dtype(layer, x, what):
    with raises(TypeError, "x", what):
        layer(x)


def out_cases():
    good = (3, 4)
    ro = np.zeros(good, np.float32)
    ro.setflags(write=False)
    return [
        ("dtype", TypeError, lambda: np.zeros(good, np.float64), ("out", "float32", "float64")),
        ("dtype16", TypeError, lambda: np.zeros(good, np.float16), ("out", "float32", "float16")),
        ("shape", ValueError, lambda: np.zeros((3, 5), np.float32), ("out", "(3, 4)", "(3, 5)")),
        ("shape-flat", ValueError, lambda: np.zeros(12, np.float32), ("out", "(3, 4)", "(12,)")),
        ("noncontig", ValueError, lambda: np.zeros((3, 8), np.float32)[:, ::2],
         ("out", "C-contiguous")),
        ("fortran", ValueError, lambda: np.zeros((4, 3), np.float32).T, ("out", "C-contiguous")),
        ("readonly", ValueError, lambda: ro, ("out", "writ")),
        ("list", TypeError, lambda: [[0.0] * 4] * 3, ("out", "ndarray", "list")),
    ]


@pytest.mark.parametrize("name, exc, make, fragments", out_cases(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_forward_out_rejected_and_untouched(layer, name, exc, make, fragments):
    out = make()
    before = np.array(out, copy=True)
    with raises(exc, *fragments):
        layer.forward(X, out=out)
    np.testing.assert_array_equal(np.asarray(out), before)


def test_forward_out_overlapping_x():
    sq = QLoraLinear.from_weight(W(8, 8), rank=2)
    x = np.random.default_rng(4).standard_normal((3, 8)).astype(np.float32)
    before = x.copy()
    with raises(ValueError, "out", "overlap", "x"):
        sq.forward(x, out=x)
    np.testing.assert_array_equal(x, before)
    buf = np.zeros(8 * 4 + 4, np.float32)
    x2, out2 = buf[:24].reshape(3, 8), buf[4:28].reshape(3, 8)  # partial overlap
    with raises(ValueError, "out", "overlap"):
        sq.forward(x2, out=out2)
    assert (buf == 0).all()


@pytest.mark.parametrize("name, exc, make, fragments", out_cases()[:3] + out_cases()[4:],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_dequantize_out_rejected_and_untouched(name, exc, make, fragments):
    lay = QLoraLinear.from_weight(W(3, 4), rank=1)  # weight (3, 4): same shape as forward's out
    out = make()
    before = np.array(out, copy=True)
    with raises(exc, *fragments):
        lay.dequantize_weight(out=out)
    np.testing.assert_array_equal(np.asarray(out), before)


# ---------------------------------------------------------------- setters leave the layer intact
def snapshot(layer):
    return (layer(X), layer.lora_a, layer.lora_b, layer.bias)


def assert_same(layer, snap):
    now = snapshot(layer)
    for a, b in zip(now, snap):
        np.testing.assert_array_equal(a, b)


SETTER_CASES = [
    ("set_lora_a", np.ones((2, 7)), ValueError, ("a", "(2, 8)", "(2, 7)")),
    ("set_lora_a", np.ones((3, 8)), ValueError, ("a", "(2, 8)", "(3, 8)")),
    ("set_lora_a", np.ones(16), ValueError, ("a", "(2, 8)", "(16,)")),
    ("set_lora_a", np.ones((2, 8), complex), TypeError, ("a", "complex")),
    ("set_lora_a", np.ones((2, 8), bool), TypeError, ("a", "bool")),
    ("set_lora_a", np.full((2, 8), np.nan), ValueError, ("a", "NaN", "(0, 0)")),
    ("set_lora_b", np.ones((2, 4)), ValueError, ("b", "(4, 2)", "(2, 4)")),
    ("set_lora_b", np.ones((4, 2), object), TypeError, ("b", "object")),
    ("set_lora_b", [[0, 0], [0, np.inf], [0, 0], [0, 0]], ValueError, ("b", "infinite", "(1, 1)")),
    ("set_bias", np.ones(5), ValueError, ("bias", "(4,)", "(5,)")),
    ("set_bias", np.ones((4, 1)), ValueError, ("bias", "(4,)", "(4, 1)")),
    ("set_bias", np.ones(4, complex), TypeError, ("bias", "complex")),
    ("set_bias", [1, 2, -np.inf, 4], ValueError, ("bias", "infinite", "(2,)")),
    ("set_bias", 1.0, ValueError, ("bias", "(4,)", "()")),
]


@pytest.mark.parametrize("method, value, exc, fragments", SETTER_CASES)
def test_setter_rejects_and_layer_unchanged(layer, method, value, exc, fragments):
    snap = snapshot(layer)
    with raises(exc, *fragments):
        getattr(layer, method)(value)
    assert_same(layer, snap)


def test_setters_accept_and_copy(layer):
    a = np.ones((2, 8), np.float64)
    layer.set_lora_a(a)
    a[:] = 5  # the layer holds its own copy
    np.testing.assert_array_equal(layer.lora_a, np.ones((2, 8)))
    b32 = np.ones((4, 2), np.float32)
    layer.set_lora_b(b32)
    b32[:] = 7  # even a float32 C-contiguous array is copied
    np.testing.assert_array_equal(layer.lora_b, np.ones((4, 2)))


# ---------------------------------------------------------------- sizes and the C++ core
def test_packed_bytes_overflow():
    with raises(ValueError, "overflow"):
        _core.packed_bytes(2**62, 2**62)
    with raises(ValueError, "out_features", "in_features"):
        _core.packed_bytes(0, 5)


def test_nf4tensor_overflowing_shape():
    with raises(ValueError, "overflow"):
        _core.Nf4Tensor(np.zeros(16, np.uint8), np.ones(1, np.float32), None, None, None, 0.0,
                        2**40, 2**40, 64)


def make_tensor(codes=None, scales=None, out_f=4, in_f=8, group_size=16):
    codes = np.zeros(_core.packed_bytes(4, 8), np.uint8) if codes is None else codes
    scales = np.ones(2, np.float32) if scales is None else scales
    return _core.Nf4Tensor(codes, scales, None, None, None, 0.0, out_f, in_f, group_size)


def test_core_tensor_refuses_bad_sizes():
    n = _core.packed_bytes(4, 8)
    make_tensor()  # the good case builds
    with raises(ValueError, "codes", str(n), str(n - 1)):
        make_tensor(codes=np.zeros(n - 1, np.uint8))
    with raises(ValueError, "scales", "2", "1"):
        make_tensor(scales=np.ones(1, np.float32))
    with raises(ValueError, "group_size"):
        make_tensor(group_size=0)
    with raises(ValueError, "scales"):
        _core.Nf4Tensor(np.zeros(n, np.uint8), None, None, None, None, 0.0, 4, 8, 16)


def test_core_tensor_refuses_other_dtypes():
    n = _core.packed_bytes(4, 8)
    with pytest.raises(TypeError):
        make_tensor(codes=np.zeros(n, np.int8))
    with pytest.raises(TypeError):
        make_tensor(scales=np.ones(2, np.float64))


def core_args(layer, **over):
    args = dict(tensor=layer._state.tensor, x=X.copy(), lora_a=layer.lora_a, lora_b=layer.lora_b,
                scaling=layer.scaling, bias=layer.bias, out=np.zeros((3, 4), np.float32))
    args.update(over)
    return args


def test_core_forward_good_call_matches_layer(layer):
    args = core_args(layer)
    _core.forward(**args)
    np.testing.assert_array_equal(args["out"], layer(X))


@pytest.mark.parametrize("over, fragments", [
    (dict(x=np.zeros((3, 7), np.float32)), ("x", "8")),
    # The core takes any leading dimensions: a 1-D x is one row, so out (3, 4) is what's wrong.
    (dict(x=np.zeros(8, np.float32)), ("out", "(4,)", "(3, 4)")),
    (dict(lora_a=np.zeros((2, 7), np.float32)), ("lora_a", "8")),
    (dict(lora_b=np.zeros((4, 3), np.float32)), ("lora_b", "(4, 2)")),
    (dict(lora_b=np.zeros((3, 2), np.float32)), ("lora_b", "(4, 2)")),
    (dict(bias=np.zeros(5, np.float32)), ("bias", "4", "5")),
    (dict(out=np.zeros((3, 5), np.float32)), ("out", "(3, 4)")),
    (dict(out=np.zeros((2, 4), np.float32)), ("out", "(3, 4)")),
])
def test_core_forward_refuses_mismatched_shapes(layer, over, fragments):
    args = core_args(layer, **over)
    out_before = args["out"].copy()
    with raises(ValueError, *fragments):
        _core.forward(**args)
    np.testing.assert_array_equal(args["out"], out_before)


def test_core_forward_refuses_readonly_out(layer):
    out = np.zeros((3, 4), np.float32)
    out.setflags(write=False)
    with raises(ValueError, "out", "writable"):
        _core.forward(**core_args(layer, out=out))


@pytest.mark.parametrize("key, value", [
    ("x", X.astype(np.float64)),
    ("x", np.asfortranarray(np.zeros((3, 8), np.float32))),
    ("x", np.zeros((3, 16), np.float32)[:, ::2]),
    ("lora_a", np.zeros((2, 8), np.float64)),
    ("lora_b", np.zeros((4, 2), np.float16)),
    ("bias", np.zeros(4, np.int32)),
    ("out", np.zeros((3, 4), np.float64)),
    ("out", np.zeros((4, 3), np.float32).T),
])
def test_core_forward_never_converts(layer, key, value):
    # A converted copy would be computed on (or written to) silently: the core must refuse.
    with pytest.raises(TypeError):
        _core.forward(**core_args(layer, **{key: value}))


def test_core_quantize_refuses_bad_buffers():
    w = W(4, 8)
    n = _core.packed_bytes(4, 8)
    _core.quantize_nf4(w, 16, np.zeros(n, np.uint8), np.zeros(2, np.float32))
    with raises(ValueError, "codes"):
        _core.quantize_nf4(w, 16, np.zeros(n - 1, np.uint8), np.zeros(2, np.float32))
    with raises(ValueError, "absmax"):
        _core.quantize_nf4(w, 16, np.zeros(n, np.uint8), np.zeros(3, np.float32))
    with raises(ValueError, "group_size"):
        _core.quantize_nf4(w, 0, np.zeros(n, np.uint8), np.zeros(2, np.float32))
    with pytest.raises(TypeError):
        _core.quantize_nf4(w.astype(np.float64), 16, np.zeros(n, np.uint8),
                           np.zeros(2, np.float32))
    with raises(ValueError, "weight", "2-D"):
        _core.quantize_nf4(np.zeros(32, np.float32), 16, np.zeros(n, np.uint8),
                           np.zeros(2, np.float32))
    ro = np.zeros(n, np.uint8)
    ro.setflags(write=False)
    with raises(ValueError, "codes", "writable"):
        _core.quantize_nf4(w, 16, ro, np.zeros(2, np.float32))


def test_core_dequantize_refuses_bad_out():
    t = make_tensor()
    with raises(ValueError, "out", "32", "31"):
        _core.dequantize_nf4(t, np.zeros(31, np.float32))
    with pytest.raises(TypeError):
        _core.dequantize_nf4(t, np.zeros(32, np.float64))


def test_core_bnb_converters_refuse_bad_sizes():
    n = _core.packed_bytes(3, 5)
    with raises(ValueError, "8", "7"):
        _core.codes_from_bnb(np.zeros(7, np.uint8), 3, 5, np.zeros(n, np.uint8))
    with raises(ValueError, "codes"):
        _core.codes_to_bnb(np.zeros(n - 1, np.uint8), 3, 5, np.zeros(8, np.uint8))


def test_set_isa_unknown_name():
    before = _core.active_isa()
    with raises(ValueError, "bogus"):
        _core.set_isa("bogus")
    assert _core.active_isa() == before


@pytest.mark.parametrize("n, exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                    ("4", TypeError)])
def test_set_num_threads_invalid(n, exc):
    before = get_num_threads()
    with raises(exc, "n"):
        set_num_threads(n)
    assert get_num_threads() == before


@pytest.mark.parametrize("alpha, rank", [(1e39, 1), (3e39, 4), (1e-46, 1), (1e-40, 8)])
def test_alpha_over_rank_must_fit_float32(alpha, rank):
    # Finite and > 0, but alpha / rank overflows float32 (a fresh layer's output would be
    # inf * 0 = NaN) or underflows (the adapter would silently vanish).
    with raises(ValueError, "alpha", "rank", repr(alpha), str(rank)):
        QLoraLinear.from_weight(W(8, 8), rank=rank, alpha=alpha)


def test_alpha_extremes_that_fit():
    w = W(8, 8)
    assert QLoraLinear.from_weight(w, rank=1, alpha=3e38).scaling == 3e38
    assert QLoraLinear.from_weight(w, rank=2, alpha=1e-37).scaling == 5e-38


def test_huge_integer_arguments_are_value_errors():
    # Out of range, not of the wrong type: ValueError naming the argument (not an
    # OverflowError from float(), nor pybind11's "incompatible function arguments").
    with raises(ValueError, "alpha", "digits"):
        QLoraLinear.from_weight(W(), rank=1, alpha=10**400)
    with raises(ValueError, "group_size", str(2**63)):
        QLoraLinear.from_weight(W(), rank=1, group_size=2**63)
    assert QLoraLinear.from_weight(W(), rank=1, group_size=2**63 - 1).num_groups == 1


@pytest.mark.parametrize("shape", [(2**31, 2**31), (2**40, 2**20)])
def test_layer_too_large_is_an_error_not_a_crash(shape):
    # A broadcast uint8 view costs nothing; as float32 it would need 2**62..2**64 bytes.
    w = np.broadcast_to(np.uint8(1), shape)
    with pytest.raises((MemoryError, ValueError)):
        QLoraLinear.from_weight(w, rank=1)


@pytest.mark.parametrize("dtype, shape, exc", [
    (np.uint8, (2**31, 2**31), ValueError),     # as float32, more bytes than NumPy can address
    (np.float64, (2**20, 2**20), MemoryError),  # addressable, but 4 TiB
])
def test_weight_too_large_to_convert_names_the_argument(dtype, shape, exc):
    # A broadcast view costs nothing; converting it to a float32 array cannot be done.
    huge = np.broadcast_to(dtype(1), shape)
    with pytest.raises(exc, match=r"weight of shape"):
        QLoraLinear.from_weight(huge, rank=1)
