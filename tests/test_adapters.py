"""Named adapters on one layer and mixed-adapter batches: slots and the adapter table, every row
of a mixed batch against the same layer's single-adapter forward and against the float64
reference (hypothesis over random mixes, mixed ranks, empty segments, per-row scales, every
precision), and the errors of every new argument."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qlora
import reference as ref
from qlora import AdapterInfo, QLoraLinear, _core

OUT, IN, GS = 24, 64, 32  # whole 32-column groups, so the int8 kernels can serve this layer


def _layer(seed=0, bias=True):
    rng = np.random.default_rng(seed)
    layer = QLoraLinear.from_weight(rng.standard_normal((OUT, IN)) * 0.1, rank=4, alpha=8.0,
                                    group_size=GS,
                                    bias=rng.standard_normal(OUT) if bias else None)
    layer.set_lora_b(rng.standard_normal((OUT, 4)))
    return layer


def _adapter(rng, rank):
    return (rng.standard_normal((rank, IN)).astype(np.float32) * 0.3,
            rng.standard_normal((OUT, rank)).astype(np.float32) * 0.3)


def _single(layer, a, b, scaling, x, precision=None):
    """The same batch through an independent copy of the layer whose default adapter is
    (a, b, scaling): the single-adapter forward, same batch shape, so the same base kernel."""
    other = copy.copy(layer)
    other.set_lora(a, b, scaling=scaling)
    return other.forward(x, precision=precision)


def _lora_abs(x, a, b, s):
    x64 = np.abs(np.asarray(x, np.float64))
    return abs(s) * (x64 @ np.abs(a.astype(np.float64)).T) @ np.abs(b.astype(np.float64)).T


# ---------------------------------------------------------------------- slots and the table
def test_add_remove_slots_and_info():
    layer = _layer()
    rng = np.random.default_rng(1)
    assert dict(layer.adapters) == {}
    assert layer.add_adapter("fr", *_adapter(rng, 3), alpha=6.0) == 1
    assert layer.add_adapter("de", *_adapter(rng, 64), scaling=0.25) == 2
    info = layer.adapters["fr"]
    assert isinstance(info, AdapterInfo)
    assert (info.name, info.slot, info.rank, info.scaling) == ("fr", 1, 3, 2.0)
    assert info.nbytes == 4 * 3 * (IN + OUT)
    assert layer.adapters["de"].rank == 64 and layer.adapters["de"].scaling == 0.25
    with pytest.raises(TypeError):
        layer.adapters["x"] = info  # read-only mapping
    layer.remove_adapter("fr")
    assert list(layer.adapters) == ["de"]
    # A removed slot is never given again; a new name takes the next one.
    assert layer.add_adapter("fr", *_adapter(rng, 2), scaling=1.0) == 3
    # Replacing keeps the slot.
    assert layer.add_adapter("de", *_adapter(rng, 5), scaling=1.0, replace=True) == 2
    assert layer.adapters["de"].rank == 5
    assert list(layer.adapters) == ["de", "fr"]  # slot order
    # The default adapter API is untouched by all this.
    assert layer.rank == 4 and layer.scaling == 2.0 and layer.lora_a.shape == (4, IN)


def test_adapter_arrays_are_copied():
    layer = _layer()
    rng = np.random.default_rng(2)
    a, b = _adapter(rng, 4)
    layer.add_adapter("x", a, b, scaling=1.0)
    x = rng.standard_normal((3, IN)).astype(np.float32)
    before = layer.forward(x, adapters="x")
    a[:] = 0.0
    b[:] = 0.0
    np.testing.assert_array_equal(layer.forward(x, adapters="x"), before)


def test_copies_and_pickles_carry_adapters():
    import pickle

    layer = _layer()
    rng = np.random.default_rng(3)
    layer.add_adapter("a", *_adapter(rng, 2), scaling=1.5)
    layer.add_adapter("b", *_adapter(rng, 7), scaling=0.5)
    layer.remove_adapter("a")
    x = rng.standard_normal((4, IN)).astype(np.float32)
    want = layer.forward(x, adapters=["b", None, "default", 2])
    for other in (copy.copy(layer), copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert {n: (i.slot, i.rank, i.scaling) for n, i in other.adapters.items()} == {
            "b": (2, 7, 0.5)}
        np.testing.assert_array_equal(other.forward(x, adapters=["b", None, "default", 2]),
                                      want)
        assert other.add_adapter("c", *_adapter(rng, 1), scaling=1.0) == 3  # slot 1 stays used
    assert "c" not in layer.adapters  # copies are independent


# ---------------------------------------------------------------------- mixed batches
def _check_rows(layer, x, entries, scales, named, y, precision=None):
    """Each row of y against the single-adapter forward of its adapter (same batch) and, in
    fp32, the float64 reference."""
    deq = layer.dequantize_weight()
    bias = layer.bias
    zero_a, zero_b = np.zeros((1, IN), np.float32), np.zeros((OUT, 1), np.float32)
    for i, e in enumerate(entries):
        if e is None or e == -1:
            a, b, s = zero_a, zero_b, 1.0
        elif e in ("default", 0):
            a, b, s = layer.lora_a, layer.lora_b, layer.scaling
        else:
            name = e if isinstance(e, str) else next(n for n, v in named.items() if v[3] == e)
            a, b, s = named[name][:3]
        m = 1.0 if scales is None else float(scales[i])
        if m == 0.0:
            a, b, s, m = zero_a, zero_b, 1.0, 1.0
        # set_lora takes scaling > 0: a negative multiplier is the same as a negated B.
        sb = b if s * m > 0 else -b
        single = _single(layer, a, sb, float(np.float32(abs(s * m))), x, precision)[i]
        lora_abs = _lora_abs(x[i], a, b, s * m)
        tol = (IN + 70) * 2.0**-24 * 2.02 * lora_abs + 2.0**-23 * np.abs(single)
        assert np.all(np.abs(y[i] - single) <= tol), (i, e, np.abs(y[i] - single).max())
        if precision in (None, "fp32"):
            want = ref.forward(x[i], deq, a, b, s * m, bias)
            bound = ref.forward_bound(x[i], deq, a, b, s * m, bias) + 2.0**-23 * np.abs(want)
            assert np.all(np.abs(y[i] - want) <= bound), (i, e)


@st.composite
def mixes(draw):
    n_adapters = draw(st.integers(0, 4))
    ranks = [draw(st.integers(1, 64)) for _ in range(n_adapters)]
    batch = draw(st.integers(1, 40))
    choices = [None, "default", 0, -1] + [f"ad{i}" for i in range(n_adapters)] + [
        ("slot", i) for i in range(n_adapters)]
    entries = [draw(st.sampled_from(choices)) for _ in range(batch)]
    with_scales = draw(st.booleans())
    seed = draw(st.integers(0, 2**31))
    return ranks, entries, with_scales, seed


@given(mixes())
def test_mixed_batch_rows_match_single_forward_and_reference(mix):
    ranks, entries, with_scales, seed = mix
    rng = np.random.default_rng(seed)
    layer = _layer(seed % 7)
    named = {}
    for i, r in enumerate(ranks):
        a, b = _adapter(rng, r)
        s = float(rng.uniform(0.1, 3.0))
        named[f"ad{i}"] = (a, b, s, layer.add_adapter(f"ad{i}", a, b, scaling=s))
    entries = [named[f"ad{e[1]}"][3] if isinstance(e, tuple) else e for e in entries]
    x = rng.standard_normal((len(entries), IN)).astype(np.float32)
    scales = rng.uniform(-2.0, 2.0, len(entries)) if with_scales else None
    if scales is not None:
        scales[::5] = 0.0
    y = layer.forward(x, adapters=entries, adapter_scales=scales)
    _check_rows(layer, x, entries, scales, named, y)
    # The same batch as a NumPy array of slots (base-only rows as -1) gives the same bits.
    codes = np.array([-1 if e is None else 0 if e == "default" else
                      named[e][3] if isinstance(e, str) else e for e in entries])
    np.testing.assert_array_equal(layer.forward(x, adapters=codes, adapter_scales=scales), y)


@pytest.mark.parametrize("isa", ["active", "scalar"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_every_precision_row_by_row(precision, isa):
    # The scalar ISA has bf16 and int8 product kernels of its own; the active one may fall
    # back to fp32 for them (kernel_info). Either way each row must match its single forward.
    original = _core.active_isa()
    _core.set_isa(original if isa == "active" else "scalar")
    try:
        _every_precision(precision)
    finally:
        _core.set_isa(original)


def _every_precision(precision):
    layer = _layer(4)
    rng = np.random.default_rng(5)
    named = {}
    for i, r in enumerate((1, 8, 16, 64)):
        a, b = _adapter(rng, r)
        named[f"p{i}"] = (a, b, 0.5 + i, layer.add_adapter(f"p{i}", a, b, scaling=0.5 + i))
    entries = [None, "p0", "p1", "p2", "p3", "default"] * 11
    rng.shuffle(entries)
    x = rng.standard_normal((len(entries), IN)).astype(np.float32)
    scales = rng.uniform(0.0, 2.0, len(entries))
    y = layer.forward(x, adapters=entries, adapter_scales=scales, precision=precision)
    _check_rows(layer, x, entries, scales, named, y, precision)


def test_uniform_batches():
    layer = _layer(6)
    rng = np.random.default_rng(6)
    a, b = _adapter(rng, 9)
    layer.add_adapter("only", a, b, scaling=1.25)
    x = rng.standard_normal((10, IN)).astype(np.float32)
    single = _single(layer, a, b, 1.25, x)
    # All rows on one adapter: per-row list, one name, one slot, leading dimensions.
    np.testing.assert_array_equal(layer.forward(x, adapters=["only"] * 10), single)
    np.testing.assert_array_equal(layer.forward(x, adapters="only"), single)
    np.testing.assert_array_equal(layer.forward(x, adapters=1), single)
    np.testing.assert_array_equal(layer.forward(x.reshape(2, 5, IN), adapters="only"),
                                  single.reshape(2, 5, OUT))
    np.testing.assert_array_equal(layer.forward(x[3], adapters="only"), _single(
        layer, a, b, 1.25, x[3]))
    # All rows base-only equals a zero adapter; "default" everywhere equals the plain forward.
    base = _single(layer, np.zeros((1, IN)), np.zeros((OUT, 1)), 1.0, x)
    np.testing.assert_array_equal(layer.forward(x, adapters=[None] * 10), base)
    np.testing.assert_array_equal(layer.forward(x, adapters=np.full(10, -1)), base)
    np.testing.assert_array_equal(layer.forward(x, adapters="default"), layer.forward(x))
    # adapter_scales alone scales the default adapter on every row.
    half = _single(layer, layer.lora_a, layer.lora_b, layer.scaling * 0.5, x)
    np.testing.assert_array_equal(layer.forward(x, adapter_scales=0.5), half)
    # Empty batch, and out=.
    assert layer.forward(np.zeros((0, IN), np.float32), adapters=[]).shape == (0, OUT)
    out = np.empty((10, OUT), np.float32)
    assert layer.forward(x, out, adapters="only") is out
    np.testing.assert_array_equal(out, single)


def test_adapters_none_is_todays_forward():
    layer = _layer(7)
    layer.add_adapter("z", *_adapter(np.random.default_rng(7), 3), scaling=9.0)
    x = np.random.default_rng(8).standard_normal((5, IN)).astype(np.float32)
    want = ref.forward(x, layer.dequantize_weight(), layer.lora_a, layer.lora_b, layer.scaling,
                       layer.bias)
    y = layer.forward(x)
    assert np.all(np.abs(y - want) <= ref.forward_bound(x, layer.dequantize_weight(),
                                                        layer.lora_a, layer.lora_b,
                                                        layer.scaling, layer.bias) * 2)


# ---------------------------------------------------------------------- errors
def _state_of(layer):
    return ({n: (i.slot, i.rank, i.scaling) for n, i in layer.adapters.items()},
            layer.lora_a.tobytes(), layer.scaling)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(name=3), TypeError, "name must be a str"),
    (dict(name=""), ValueError, "non-empty"),
    (dict(name="default"), ValueError, "reserved"),
    (dict(name="taken"), ValueError, "already present.*replace=True"),
    (dict(a=np.zeros((0, IN))), ValueError, "at least one row"),
    (dict(a=np.ones((2, IN + 1))), ValueError, r"a must have shape \(2, 64\)"),
    (dict(b=np.ones((OUT, 3))), ValueError, r"b must have shape \(24, 2\)"),
    (dict(a=np.ones((2, IN), bool)), TypeError, "real numeric"),
    (dict(b=np.full((OUT, 2), np.nan)), ValueError, "b must be finite"),
    (dict(scaling=None), TypeError, "exactly one of alpha and scaling, got neither"),
    (dict(alpha=2.0), TypeError, "got both"),
    (dict(scaling=-1.0), ValueError, "scaling must be a finite number > 0"),
    (dict(scaling=1e39), ValueError, "float32"),
    (dict(scaling=None, alpha=1e-45), ValueError, "alpha / rank"),
    (dict(replace=1), TypeError, "replace must be a bool"),
])
def test_add_adapter_errors(kwargs, exc, match):
    layer = _layer()
    layer.add_adapter("taken", np.ones((2, IN)), np.ones((OUT, 2)), scaling=1.0)
    before = _state_of(layer)
    args = dict(name="new", a=np.ones((2, IN)), b=np.ones((OUT, 2)), scaling=1.0)
    args.update(kwargs)
    name, a, b = args.pop("name"), args.pop("a"), args.pop("b")
    with pytest.raises(exc, match=match):
        layer.add_adapter(name, a, b, **args)
    assert _state_of(layer) == before


def test_remove_adapter_errors():
    layer = _layer()
    layer.add_adapter("x", np.ones((2, IN)), np.ones((OUT, 2)), scaling=1.0)
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        layer.remove_adapter("nope")
    with pytest.raises(KeyError, match="no adapter 'default'"):
        layer.remove_adapter("default")
    with pytest.raises(TypeError, match="name must be a str"):
        layer.remove_adapter(1)
    assert list(layer.adapters) == ["x"]


@pytest.mark.parametrize("adapters, scales, exc, match", [
    (["a", "nope", None], None, KeyError, r"adapters\[1\]: no adapter 'nope'"),
    (["a", 7, None], None, KeyError, r"adapters\[1\]: no adapter 7"),
    (np.array([1, 9, -1]), None, KeyError, r"adapters\[1\]: no adapter 9"),
    (np.array([1, -5, -1]), None, KeyError, r"adapters\[1\]: no adapter -5"),
    (["a", None], None, ValueError, r"one entry per row of x \(3\), got 2"),
    (np.array([1, 1]), None, ValueError, r"shape \(3,\)"),
    (np.ones((3, 1), np.int64), None, ValueError, r"shape \(3,\)"),
    (["a", True, None], None, TypeError, r"adapters\[1\] must be a str, an int or None"),
    (["a", 1.0, None], None, TypeError, r"adapters\[1\]"),
    ({"a": 1}, None, TypeError, "adapters must be"),
    (np.array([1.0, 1.0, 1.0]), None, TypeError, "adapters must be"),
    ("nope", None, KeyError, "no adapter 'nope'"),
    (5, None, KeyError, "no adapter 5"),
    (True, None, TypeError, "adapters must be"),
    (["a", "a", "a"], [1.0, np.nan, 1.0], ValueError, r"adapter_scales\[1\] must be finite"),
    (["a", "a", "a"], [1.0, 1.0], ValueError, r"adapter_scales must .* shape \(3,\)"),
    (["a", "a", "a"], [1.0, 1e39, 1.0], ValueError, r"adapter_scales\[1\].*float32"),
    (["a", "a", "a"], [1.0, 1e-40, 1.0], ValueError, r"adapter_scales\[1\].*float32"),
    (["a", "a", "a"], ["x", "y", "z"], TypeError, "adapter_scales must be real"),
    (["a", "a", "a"], True, TypeError, "adapter_scales must be real"),
])
def test_forward_argument_errors(adapters, scales, exc, match):
    layer = _layer()
    layer.add_adapter("a", np.ones((2, IN)), np.ones((OUT, 2)), scaling=1.0)
    before = _state_of(layer)
    x = np.ones((3, IN), np.float32)
    with pytest.raises(exc, match=match):
        layer.forward(x, adapters=adapters, adapter_scales=scales)
    assert _state_of(layer) == before


def test_per_row_adapters_need_2d_x():
    layer = _layer()
    layer.add_adapter("a", np.ones((2, IN)), np.ones((OUT, 2)), scaling=1.0)
    with pytest.raises(ValueError, match=r"x must be 2-D .* got shape \(2, 3, 64\)"):
        layer.forward(np.ones((2, 3, IN), np.float32), adapters=["a", None])
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        layer.forward(np.ones(IN, np.float32), adapters=["a"])


def test_public_names():
    for name in ("AdapterInfo", "add_peft_adapter", "remove_peft_adapter"):
        assert name in qlora.__all__ and hasattr(qlora, name)


def test_bench_adapters_smoke(tmp_path, capsys):
    # The command runs and reports every case; no speed is asserted.
    import json

    from qlora.cli.main import main

    path = tmp_path / "b.json"
    assert main(["bench", "--adapters", "1,2", "--shape", "32x64", "--batch", "4",
                 "--min-reps", "1", "--min-time", "0", "--json", str(path)]) == 0
    figures = json.loads(path.read_text())["serving_adapters"]
    cases = [(r["adapters"], r["ranks"]) for r in figures["adapters"]]
    assert cases == [(1, "16"), (2, "16"), (2, "8..64")]
    assert all(r["mixed_ms"] > 0 and r["split_ms"] > 0 for r in figures["adapters"])
    assert "split differs" not in capsys.readouterr().out
    assert figures["add_remove"][0]["adapter_bytes"] == 4 * 16 * (32 + 64)
