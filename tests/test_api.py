"""The public surface of QLoraLinear: properties, accounting, repr, PEFT-style init, and that
nothing handed out can be used to change the layer."""

from __future__ import annotations

import importlib.metadata
import math

import numpy as np
import pytest

import qlora
import reference as ref
from conftest import bits
from qlora import QLoraLinear


def W(out_f, in_f, seed=0):
    return np.random.default_rng(seed).standard_normal((out_f, in_f)).astype(np.float32)


@pytest.mark.parametrize("out_f, in_f, rank, alpha, group_size", [
    (48, 80, 8, 16.0, 64), (1, 1, 1, 1.0, 1), (7, 33, 3, 1.0, 5), (300, 17, 17, 0.5, 4096),
])
def test_properties(out_f, in_f, rank, alpha, group_size):
    w = W(out_f, in_f)
    layer = QLoraLinear.from_weight(w, rank=rank, alpha=alpha, group_size=group_size)
    assert (layer.out_features, layer.in_features) == (out_f, in_f)
    assert layer.rank == rank
    assert layer.scaling == alpha / rank
    assert math.isclose(layer.alpha, alpha, rel_tol=1e-15)
    assert layer.group_size == group_size
    assert layer.num_groups == -(-out_f * in_f // group_size)
    _, absmax = ref.quantize(w, group_size)
    scale = layer.scale
    assert scale.dtype == np.float32 and scale.shape == (layer.num_groups,)
    np.testing.assert_array_equal(bits(scale), bits(absmax))
    zp = layer.zero_point
    assert zp.dtype == np.float32 and zp.shape == (layer.num_groups,)
    assert not zp.any()
    assert layer.lora_a.shape == (rank, in_f) and layer.lora_a.dtype == np.float32
    assert layer.lora_b.shape == (out_f, rank) and layer.lora_b.dtype == np.float32
    assert layer.bias is None
    assert isinstance(layer.num_groups, int) and isinstance(layer.rank, int)


def test_public_names():
    assert set(qlora.__all__) >= {"QLoraLinear", "__version__", "active_isa", "available_isas",
                                  "get_num_threads", "set_num_threads"}
    # The distribution is "qlora-cpu" ("qlora" on PyPI is another project); the import is qlora.
    assert qlora.__version__ == importlib.metadata.version("qlora-cpu")
    assert importlib.metadata.distribution("qlora-cpu").entry_points.select(
        group="console_scripts", name="qlora")
    assert qlora.active_isa() in qlora.available_isas()
    assert "scalar" in qlora.available_isas()


def test_handed_out_arrays_cannot_change_the_layer():
    rng = np.random.default_rng(5)
    layer = QLoraLinear.from_weight(W(12, 40), rank=4, group_size=16,
                                    bias=rng.standard_normal(12))
    layer.set_lora_b(rng.standard_normal((12, 4)))
    x = rng.standard_normal((3, 40)).astype(np.float32)
    y = layer(x)
    saved = {name: getattr(layer, name).copy() for name in
             ("scale", "zero_point", "lora_a", "lora_b", "bias")}
    for name in saved:
        arr = getattr(layer, name)
        try:
            arr[...] = 123.0  # a copy: writing succeeds but must not reach the layer
        except ValueError:
            assert not arr.flags.writeable  # or a read-only view
        with pytest.raises(AttributeError):
            setattr(layer, name, arr)
    for name, value in saved.items():
        np.testing.assert_array_equal(getattr(layer, name), value)
    np.testing.assert_array_equal(layer(x), y)
    d = layer.dequantize_weight()
    d[:] = 0
    np.testing.assert_array_equal(layer(x), y)


def test_dequantize_returns_a_new_array_each_time():
    layer = QLoraLinear.from_weight(W(6, 10), rank=2)
    a, b = layer.dequantize_weight(), layer.dequantize_weight()
    assert a is not b and not np.shares_memory(a, b)
    assert a.flags.writeable and a.flags.c_contiguous and a.dtype == np.float32
    assert a.shape == (6, 10)
    np.testing.assert_array_equal(a, b)


def test_inputs_are_not_aliased():
    w = W(8, 16)
    bias = np.ones(8, np.float32)
    layer = QLoraLinear.from_weight(w, rank=2, bias=bias)
    x = np.ones(16, np.float32)
    y = layer(x)
    w[:] = 0
    bias[:] = 0
    np.testing.assert_array_equal(layer(x), y)
    np.testing.assert_array_equal(layer.bias, np.ones(8))


@pytest.mark.parametrize("out_f, in_f, rank", [(10, 20, 2), (1, 1, 1), (4096, 11008, 16)])
def test_trainable_params(out_f, in_f, rank):
    if out_f * in_f > 10**6:
        w = np.ones((out_f, in_f), np.float32)
    else:
        w = W(out_f, in_f)
    layer = QLoraLinear.from_weight(w, rank=rank)
    assert layer.trainable_params() == rank * (in_f + out_f)
    assert layer.trainable_params() == layer.lora_a.size + layer.lora_b.size


def stored_bytes(out_f, in_f, group_size):
    # nf4.h: each row padded to whole 32-column blocks of 16 bytes; one float32 per group.
    return out_f * (-(-in_f // 32)) * 16 + 4 * (-(-out_f * in_f // group_size))


@pytest.mark.parametrize("out_f, in_f, group_size", [
    (64, 64, 64), (256, 128, 32), (3, 33, 7), (100, 1, 1), (1, 1, 64), (1, 1, 1), (2, 3, 1),
])
def test_memory_saved_bytes(out_f, in_f, group_size):
    layer = QLoraLinear.from_weight(W(out_f, in_f), rank=1, group_size=group_size)
    saved = layer.memory_saved_bytes()
    assert isinstance(saved, int)
    assert saved == max(0, 4 * out_f * in_f - stored_bytes(out_f, in_f, group_size))
    assert saved >= 0


def test_memory_saved_tiny_layer_is_zero_and_large_layer_near_87_percent():
    assert QLoraLinear.from_weight(np.ones((1, 1), np.float32), rank=1).memory_saved_bytes() == 0
    layer = QLoraLinear.from_weight(W(512, 512), rank=1, group_size=64)
    fp32 = 4 * 512 * 512
    # 4 bits + 32/64 bits of scale per weight: 4.5 of 32 bits stored.
    assert layer.memory_saved_bytes() == fp32 - fp32 * 4.5 // 32


def test_repr():
    layer = QLoraLinear.from_weight(W(48, 80), rank=8, alpha=16.0, group_size=32,
                                    bias=np.zeros(48))
    r = repr(layer)
    for text in ("QLoraLinear", "in_features=80", "out_features=48", "rank=8", "alpha=16",
                 "group_size=32", f"nf4_bytes={stored_bytes(48, 80, 32)}",
                 f"fp32_bytes={4 * 48 * 80}", "bias=True"):
        assert text in r, (text, r)


def test_peft_init_bounds_and_uniformity():
    in_f, rank = 1024, 64
    layer = QLoraLinear.from_weight(W(rank, in_f), rank=rank, seed=7)
    a = layer.lora_a.astype(np.float64)
    bound = 1.0 / math.sqrt(in_f)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.99 * bound  # the whole range is used
    assert not layer.lora_b.any()  # B starts at zero
    # U(-b, b): mean 0, variance b^2 / 3. n = 65536 samples; 6-sigma windows.
    n = a.size
    assert abs(a.mean()) < 6 * bound / math.sqrt(3 * n)
    var_sd = bound**2 * math.sqrt(4 / 45 / n)  # sd of the sample variance of U(-b, b)
    assert abs(a.var() - bound**2 / 3) < 6 * var_sd
    # Flat histogram: 16 equal bins, each count binomial(n, 1/16), within 6 sigma.
    counts, _ = np.histogram(a, bins=16, range=(-bound, bound))
    p = 1 / 16
    assert (np.abs(counts - n * p) < 6 * math.sqrt(n * p * (1 - p))).all(), counts


def test_peft_init_reproducible_and_seed_dependent():
    w = W(30, 50)
    a0 = QLoraLinear.from_weight(w, rank=4, seed=0).lora_a
    np.testing.assert_array_equal(QLoraLinear.from_weight(w, rank=4, seed=0).lora_a, a0)
    np.testing.assert_array_equal(QLoraLinear.from_weight(w.copy(), rank=4).lora_a, a0)  # default 0
    a1 = QLoraLinear.from_weight(w, rank=4, seed=1).lora_a
    assert not np.array_equal(a0, a1)
    assert (a0 != a1).mean() > 0.99
    big = QLoraLinear.from_weight(w, rank=4, seed=2**63 + 5).lora_a
    assert big.shape == (4, 50) and np.isfinite(big).all()


def test_fresh_layer_forward_is_the_quantized_linear():
    # With B == 0 the adapter contributes nothing: forward == x @ deq(W).T (+ bias).
    w = W(20, 30)
    bias = np.arange(20, dtype=np.float32)
    layer = QLoraLinear.from_weight(w, rank=3, bias=bias, group_size=16)
    x = np.random.default_rng(9).standard_normal((4, 30)).astype(np.float32)
    codes, absmax = ref.quantize(w, 16)
    deq = ref.dequantize(codes, absmax, 16)
    want = x.astype(np.float64) @ deq.T.astype(np.float64) + bias
    bound = 34 * 2.0**-24 * (np.abs(x) @ np.abs(deq).T + np.abs(bias)) * 1.01
    assert (np.abs(layer(x) - want) <= bound).all()


def test_every_public_name_is_documented():
    import inspect

    names = [getattr(qlora, n) for n in qlora.__all__ if n != "__version__"]
    members = [m for n, m in inspect.getmembers(QLoraLinear) if not n.startswith("_")]
    undocumented = [getattr(o, "__name__", getattr(getattr(o, "fget", None), "__name__", o))
                    for o in names + members if not (inspect.getdoc(o) or "").strip()]
    assert not undocumented
    for fn in (QLoraLinear.from_weight, QLoraLinear.forward, QLoraLinear.dequantize_weight):
        doc = inspect.getdoc(fn)
        assert "Parameters" in doc and "Returns" in doc and "Raises" in doc, fn.__name__


class _ArrayLike:
    """Hands out its own buffer through __array__, as many array libraries do."""

    def __init__(self, data):
        self.data = data

    def __array__(self, dtype=None, copy=None):
        return self.data


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
@pytest.mark.parametrize("wrap", [np.asmatrix, _ArrayLike, lambda a: a.view(np.memmap)],
                         ids=["matrix", "__array__", "subclass-view"])
def test_setters_never_alias_caller_memory(wrap):
    layer = QLoraLinear.from_weight(W(4, 8), rank=2, bias=np.zeros(4))
    b = np.zeros((4, 2), np.float32)
    a = np.zeros((2, 8), np.float32)
    bias = np.zeros((1, 4), np.float32)  # 2-D so np.asmatrix keeps its shape ...
    layer.set_lora_b(wrap(b))
    layer.set_lora_a(wrap(a))
    b[:] = 5
    a[:] = 5
    assert not layer.lora_b.any() and not layer.lora_a.any()
    if wrap is not np.asmatrix:  # ... but bias must be 1-D
        layer.set_bias(wrap(bias[0]))
        bias[:] = 5
        assert not layer.bias.any()
        other = QLoraLinear.from_weight(W(4, 8), rank=2, bias=wrap(bias[0].copy() * 0))
        assert not other.bias.any()


def test_setters_never_alias_torch_tensors():
    torch = pytest.importorskip("torch")
    layer = QLoraLinear.from_weight(W(4, 8), rank=2)
    b, bias = torch.zeros(4, 2), torch.zeros(4)
    layer.set_lora_b(b)
    layer.set_bias(bias)
    b += 5  # in place, as an optimizer step would
    bias += 5
    assert not layer.lora_b.any() and not layer.bias.any()
    bias2 = torch.zeros(4)
    other = QLoraLinear.from_weight(W(4, 8), rank=2, bias=bias2)
    bias2 += 1
    assert not other.bias.any()
