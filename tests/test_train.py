"""The NumPy training API (layer.forward_train / layer.backward) against independent float64
references: the closed-form gradients, central finite differences of a float64 loss, and a
NumPy reimplementation of the documented dropout hash (csrc/include/qlora/train.h).

Tolerances: every float32 result is compared with its float64 reference element by element
within ``8 * K * eps32 * (|terms| summed)`` where K is the length of the sum, a bound on float32
accumulation error in any order (``K eps`` per sum, doubled twice for the chained products).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora import QLoraLinear

EPS32 = float(np.finfo(np.float32).eps)
M64 = (1 << 64) - 1


# ---------------------------------------------------------------------- references
def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z ^ (z >> np.uint64(30))
        z = z * np.uint64(0xBF58476D1CE4E5B9)
        z = z ^ (z >> np.uint64(27))
        z = z * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def ref_mask(p: float, seed: int, batch: int, in_features: int) -> np.ndarray:
    """float64 multipliers (1/(1-p) where kept, 0 elsewhere) from the hash train.h documents."""
    p64 = float(np.float32(p))
    if p64 == 0.0:
        return np.ones((batch, in_features))
    threshold = int(np.floor((1.0 - p64) * 16777216.0 + 0.5))
    key = _splitmix64(np.array([seed], dtype=np.uint64))[0]
    idx = np.arange(batch * in_features, dtype=np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        z = key + idx * np.uint64(0x9E3779B97F4A7C15)
    keep = (_splitmix64(z) >> np.uint64(40)) < np.uint64(threshold)
    scale = float(np.float32(1.0 / (1.0 - p64)))
    return np.where(keep, scale, 0.0).reshape(batch, in_features)


def ref_forward(w, a, b, s, bias, x, m):
    y = x @ w.T + s * ((x * m) @ a.T) @ b.T
    return y if bias is None else y + bias


def ref_grads(w, a, b, s, x, m, g):
    """Closed-form float64 gradients of sum(g * y) and their error scales (|terms| summed)."""
    xt = x * m
    gb = g @ b
    ref = {"lora_b": s * g.T @ (xt @ a.T), "lora_a": s * gb.T @ xt,
           "input": g @ w + s * m * (gb @ a), "bias": g.sum(axis=0)}
    ag, ab, aa, ax, aw = np.abs(g), np.abs(b), np.abs(a), np.abs(xt), np.abs(w)
    agb = ag @ ab
    scale = {"lora_b": s * ag.T @ (ax @ aa.T), "lora_a": s * agb.T @ ax,
             "input": ag @ aw + s * np.abs(m) * (agb @ aa), "bias": ag.sum(axis=0)}
    return ref, scale


def _setup(out_f, in_f, rank, group, batch, seed, bias=True, lead=None):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    b0 = rng.standard_normal(out_f).astype(np.float32) if bias else None
    layer = QLoraLinear.from_weight(w, rank=rank, alpha=2.0 * rank, group_size=group, bias=b0)
    layer.set_lora_b(rng.standard_normal((out_f, rank)).astype(np.float32) * 0.1)
    shape = (lead or (batch,)) + (in_f,)
    x = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape[:-1] + (out_f,)).astype(np.float32)
    return layer, x, g


def _f64(layer):
    return (layer.dequantize_weight().astype(np.float64), layer.lora_a.astype(np.float64),
            layer.lora_b.astype(np.float64), layer.scaling,
            None if layer.bias is None else layer.bias.astype(np.float64))


def _check(got, ref, scale, k):
    bound = 8.0 * (k + 2) * EPS32 * scale + 1e-30
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= bound), f"max error/bound {np.max(err / bound):.3g}"


# ---------------------------------------------------------------------- gradients
@settings(max_examples=40, deadline=None)
@given(out_f=st.integers(1, 40), in_f=st.integers(1, 70), rank=st.integers(1, 8),
       group=st.sampled_from([1, 7, 32, 64, 100]), batch=st.integers(1, 20),
       p=st.sampled_from([0.0, 0.1, 0.5]), seed=st.integers(0, 2**64 - 1),
       data_seed=st.integers(0, 1000))
def test_gradients_match_float64_formulas(out_f, in_f, rank, group, batch, p, seed, data_seed):
    rank = min(rank, out_f, in_f)
    layer, x, g = _setup(out_f, in_f, rank, group, batch, data_seed)
    w, a, b, s, bias = _f64(layer)
    m = ref_mask(p, seed, batch, in_f)
    y, saved = layer.forward_train(x, dropout=p, seed=seed)
    y_ref = ref_forward(w, a, b, s, bias, x.astype(np.float64), m)
    y_scale = np.abs(x) @ np.abs(w).T + s * (np.abs(x * m) @ np.abs(a).T) @ np.abs(b).T
    _check(y, y_ref, y_scale + np.abs(bias), in_f + rank)
    grads = layer.backward(saved, g)
    ref, scale = ref_grads(w, a, b, s, x.astype(np.float64), m, g.astype(np.float64))
    _check(grads.lora_b, ref["lora_b"], scale["lora_b"], batch + in_f)
    _check(grads.lora_a, ref["lora_a"], scale["lora_a"], batch + out_f)
    _check(grads.input, ref["input"], scale["input"], out_f + rank)
    _check(grads.bias, ref["bias"], scale["bias"], batch)


@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(1, 24), in_f=st.integers(1, 48), rank=st.integers(1, 6),
       group=st.sampled_from([1, 16, 64]), batch=st.integers(1, 9),
       p=st.sampled_from([0.0, 0.3]), data_seed=st.integers(0, 1000))
def test_gradients_match_finite_differences(out_f, in_f, rank, group, batch, p, data_seed):
    """Directional central differences of the float64 loss sum(g * y) in random directions;
    with dropout the mask is a fixed function of the seed, so the loss is smooth in every
    argument. The loss is linear in x, A, B and bias separately, so a central difference is
    exact up to float64 rounding (relative 1e-9 here)."""
    rank = min(rank, out_f, in_f)
    layer, x, g = _setup(out_f, in_f, rank, group, batch, data_seed)
    w, a, b, s, bias = _f64(layer)
    m = ref_mask(p, 1234, batch, in_f)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    _, saved = layer.forward_train(x, dropout=p, seed=1234)
    grads = layer.backward(saved, g)

    def loss(xx=x64, aa=a, bb=b, bias_=bias):
        return float(np.sum(g64 * ref_forward(w, aa, bb, s, bias_, xx, m)))

    rng = np.random.default_rng(data_seed + 1)
    h = 1e-3
    for name, arg, got in (("xx", x64, grads.input), ("aa", a, grads.lora_a),
                           ("bb", b, grads.lora_b), ("bias_", bias, grads.bias)):
        d = rng.standard_normal(arg.shape)
        fd = (loss(**{name: arg + h * d}) - loss(**{name: arg - h * d})) / (2 * h)
        an = float(np.sum(got.astype(np.float64) * d))
        tol = 1e-4 * float(np.sum(np.abs(got) * np.abs(d))) + 1e-6
        assert abs(fd - an) <= tol, (name, fd, an)


def test_mask_from_seed_matches_documented_hash():
    """A layer with W = 0, A = I (rank = in) and B = I shows the mask: y = s * dropout(x)."""
    n, batch, p, seed = 16, 64, 0.25, 987654321
    layer = QLoraLinear.from_weight(np.zeros((n, n), np.float32), rank=n, alpha=float(n))
    eye = np.eye(n, dtype=np.float32)
    layer.set_lora(eye, eye, scaling=1.0)
    x = np.ones((batch, n), np.float32)
    y, _ = layer.forward_train(x, dropout=p, seed=seed)
    np.testing.assert_array_equal(y, ref_mask(p, seed, batch, n).astype(np.float32))
    kept = (y > 0).mean()
    assert 0.65 < kept < 0.85  # 1 - p = 0.75, 1024 elements
    y2, _ = layer.forward_train(x, dropout=p, seed=seed + 1)
    assert not np.array_equal(y, y2)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_no_dropout_equals_forward(precision):
    layer, x, _ = _setup(48, 64, 4, 32, 5, 3)
    y, saved = layer.forward_train(x, precision=precision)
    np.testing.assert_array_equal(y, layer.forward(x, precision=precision))
    assert saved.precision == precision


def test_leading_dims_and_1d():
    layer, x, g = _setup(12, 20, 3, 16, 0, 5, lead=(2, 3))
    y, saved = layer.forward_train(x)
    assert y.shape == (2, 3, 12)
    grads = layer.backward(saved, g)
    flat, sflat = layer.forward_train(x.reshape(6, 20))
    gflat = layer.backward(sflat, g.reshape(6, 12))
    np.testing.assert_array_equal(grads.input.reshape(6, 20), gflat.input)
    np.testing.assert_array_equal(grads.lora_a, gflat.lora_a)
    y1, s1 = layer.forward_train(x[0, 0])
    g1 = layer.backward(s1, g[0, 0])
    assert y1.shape == (12,) and g1.input.shape == (20,)
    w, a, b, s, _ = _f64(layer)
    ref, scale = ref_grads(w, a, b, s, x[0, :1].astype(np.float64), np.ones((1, 20)),
                           g[0, :1].astype(np.float64))
    _check(g1.lora_a, ref["lora_a"], scale["lora_a"], 12)


def test_empty_batch():
    layer, _, _ = _setup(8, 10, 2, 8, 1, 0)
    y, saved = layer.forward_train(np.zeros((0, 10), np.float32))
    grads = layer.backward(saved, np.zeros((0, 8), np.float32))
    assert y.shape == (0, 8) and grads.input.shape == (0, 10)
    assert not grads.lora_a.any() and not grads.lora_b.any() and not grads.bias.any()


def test_fields_none_when_not_asked():
    layer, x, g = _setup(8, 10, 2, 8, 4, 0, bias=False)
    _, saved = layer.forward_train(x)
    grads = layer.backward(saved, g, input_grad=False)
    assert grads.input is None and grads.bias is None
    assert grads._fields == ("input", "lora_a", "lora_b", "bias")
    full = layer.backward(saved, g, bias_grad=True)
    np.testing.assert_allclose(full.bias, g.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(full.lora_a, grads.lora_a)
    layer2, x2, g2 = _setup(8, 10, 2, 8, 4, 0, bias=True)
    _, saved2 = layer2.forward_train(x2)
    assert layer2.backward(saved2, g2).bias is not None
    assert layer2.backward(saved2, g2, bias_grad=False).bias is None


def test_saved_keeps_the_forward_state():
    """A set_lora between forward_train and backward does not change the gradients."""
    layer, x, g = _setup(16, 24, 4, 16, 3, 9)
    _, saved = layer.forward_train(x)
    before = layer.backward(saved, g)
    layer.set_lora(np.ones((2, 24)), np.ones((16, 2)), scaling=3.0)
    after = layer.backward(saved, g)
    for f in ("input", "lora_a", "lora_b", "bias"):
        np.testing.assert_array_equal(getattr(before, f), getattr(after, f))
    assert after.lora_a.shape == (4, 24)


def test_saved_references_x_without_copy():
    layer, x, _ = _setup(8, 16, 2, 16, 3, 1)
    _, saved = layer.forward_train(x)
    assert saved.x is x
    _, saved64 = layer.forward_train(x.astype(np.float64))
    assert saved64.x.dtype == np.float32 and saved64.u.shape == (3, 2)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\).*1\.0"),
    ({"dropout": -0.1}, ValueError, "dropout must be in"),
    ({"dropout": 0.99999999}, ValueError, "as a float32"),
    ({"dropout": float("nan")}, ValueError, "dropout"),
    ({"dropout": "0.1"}, TypeError, "dropout must be a real number.*str"),
    ({"dropout": True}, TypeError, "dropout"),
    ({"seed": -1}, ValueError, "seed must be between 0 and"),
    ({"seed": 2**64}, ValueError, "seed must be between 0 and"),
    ({"seed": 1.5}, TypeError, "seed must be an integer, got float"),
    ({"precision": "fp16"}, ValueError, "precision must be one of"),
    ({"precision": 3}, TypeError, "precision must be a str"),
])
def test_forward_train_errors(kwargs, exc, match):
    layer, x, _ = _setup(8, 16, 2, 16, 3, 1)
    with pytest.raises(exc, match=match):
        layer.forward_train(x, **kwargs)


def test_forward_train_bad_x():
    layer, x, _ = _setup(8, 16, 2, 16, 3, 1)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 16\).*\(3, 15\)"):
        layer.forward_train(x[:, :15])
    with pytest.raises(TypeError, match="x must have a real numeric dtype"):
        layer.forward_train(x.astype(complex))


def test_backward_errors():
    layer, x, g = _setup(8, 16, 2, 16, 3, 1)
    other, _, _ = _setup(8, 16, 2, 16, 3, 1)
    _, saved = layer.forward_train(x)
    with pytest.raises(ValueError, match=r"grad_y must have the forward output's shape "
                                         r"\(3, 8\), got \(3, 7\)"):
        layer.backward(saved, g[:, :7])
    with pytest.raises(ValueError, match="grad_y"):
        layer.backward(saved, g[:2])
    with pytest.raises(TypeError, match="grad_y must have a real numeric dtype"):
        layer.backward(saved, g.astype(bool))
    with pytest.raises(ValueError, match="saved must come from this layer"):
        other.backward(saved, g)
    with pytest.raises(TypeError, match="saved must be the SavedForBackward.*tuple"):
        layer.backward(tuple(saved), g)
    with pytest.raises(TypeError, match="input_grad must be a bool, got int"):
        layer.backward(saved, g, input_grad=1)
    with pytest.raises(TypeError, match="bias_grad must be a bool"):
        layer.backward(saved, g, bias_grad="yes")


def test_backward_converts_grad_y():
    layer, x, g = _setup(8, 16, 2, 16, 3, 1)
    _, saved = layer.forward_train(x)
    a = layer.backward(saved, g)
    b = layer.backward(saved, np.asfortranarray(g.astype(np.float64)))
    np.testing.assert_array_equal(a.input, b.input)


def test_bit_identical_across_thread_counts():
    import qlora

    layer, x, g = _setup(70, 300, 8, 64, 37, 11)
    before = qlora.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            qlora.set_num_threads(n)
            y, saved = layer.forward_train(x, dropout=0.2, seed=5)
            results.append((y,) + tuple(layer.backward(saved, g)))
    finally:
        qlora.set_num_threads(before)
    for other in results[1:]:
        for got, ref in zip(other, results[0]):
            np.testing.assert_array_equal(got, ref)
