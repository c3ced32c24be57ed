"""Pickle, copy and deepcopy give equal, independent layers; a frozen version-1 pickle still
loads; a pickle of an unknown format version is refused."""

from __future__ import annotations

import copy
import os
import pickle

import numpy as np
import pytest

import reference as ref
from conftest import bits, bnb_codes
from qlora import QLoraLinear
from qlora import _layer

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture
def layer():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((19, 45)).astype(np.float32)
    layer = QLoraLinear.from_weight(w, rank=3, alpha=5.0, group_size=20,
                                    bias=rng.standard_normal(19))
    layer.set_lora_b(rng.standard_normal((19, 3)))
    return layer


X = np.random.default_rng(1).standard_normal((4, 45)).astype(np.float32)


def assert_equal_layers(a, b):
    for name in ("in_features", "out_features", "rank", "alpha", "scaling", "group_size",
                 "num_groups"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("scale", "zero_point", "lora_a", "lora_b", "bias"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(bnb_codes(a), bnb_codes(b))
    np.testing.assert_array_equal(bits(a(X)), bits(b(X)))
    np.testing.assert_array_equal(a.dequantize_weight(), b.dequantize_weight())
    assert repr(a) == repr(b)


def assert_independent(original, clone):
    y = original(X)
    clone.set_lora_b(np.zeros((clone.out_features, clone.rank)))
    clone.set_lora_a(np.ones((clone.rank, clone.in_features)))
    clone.set_bias(None)
    assert not np.array_equal(clone(X), y)  # the clone really changed ...
    np.testing.assert_array_equal(original(X), y)  # ... and the original did not
    assert original.bias is not None


def roundtrip(protocol):
    return lambda layer: pickle.loads(pickle.dumps(layer, protocol=protocol))


@pytest.mark.parametrize("make_copy", [roundtrip(2), roundtrip(pickle.HIGHEST_PROTOCOL),
                                       copy.copy, copy.deepcopy],
                         ids=["pickle2", "pickle-highest", "copy", "deepcopy"])
def test_copies_equal_and_independent(layer, make_copy):
    clone = make_copy(layer)
    assert clone is not layer and type(clone) is QLoraLinear
    assert_equal_layers(layer, clone)
    assert_independent(layer, clone)
    # ... and the other way round.
    clone2 = make_copy(layer)
    assert_independent(clone2, layer)


def test_pickle_without_bias_and_nested_containers(layer):
    layer.set_bias(None)
    obj = {"a": layer, "b": [layer]}
    back = pickle.loads(pickle.dumps(obj))
    assert back["a"] is back["b"][0]  # pickle's memo keeps identity
    assert back["a"].bias is None
    assert_equal_layers(layer, back["a"])


def test_deepcopy_owns_its_arrays(layer):
    clone = copy.deepcopy(layer)
    assert not np.shares_memory(clone._state.weight.codes, layer._state.weight.codes)
    assert not np.shares_memory(clone._state.weight.scales, layer._state.weight.scales)


def test_frozen_v1_fixture():
    with open(os.path.join(DATA, "layer_v1.pkl"), "rb") as f:
        layer = pickle.load(f)
    w = np.load(os.path.join(DATA, "layer_v1_weight.npy"))
    x = np.load(os.path.join(DATA, "layer_v1_x.npy"))
    expected = np.load(os.path.join(DATA, "layer_v1_expected.npy"))
    adapter = np.load(os.path.join(DATA, "layer_v1_adapter.npz"))
    group_size = int(adapter["group_size"])
    assert (layer.out_features, layer.in_features, layer.rank) == (24, 70, 3)
    assert layer.group_size == group_size
    assert layer.scaling == float(adapter["scaling"])
    np.testing.assert_array_equal(layer.lora_a, adapter["lora_a"])
    np.testing.assert_array_equal(layer.lora_b, adapter["lora_b"])
    np.testing.assert_array_equal(layer.bias, adapter["bias"])
    codes, absmax = ref.quantize(w, group_size)
    np.testing.assert_array_equal(bnb_codes(layer), ref.pack_bnb(codes))
    np.testing.assert_array_equal(bits(layer.scale), bits(absmax))
    y = layer(x)
    deq = ref.dequantize(codes, absmax, group_size)
    bound = ref.forward_bound(x, deq, adapter["lora_a"], adapter["lora_b"], adapter["scaling"],
                              adapter["bias"])
    assert (np.abs(y - expected) <= bound).all()
    # The loaded layer is a full layer: it pickles again and accepts new adapters.
    again = pickle.loads(pickle.dumps(layer))
    np.testing.assert_array_equal(again(x), y)
    again.set_lora_b(np.zeros((24, 3)))


class _Forged:
    """Pickles as a QLoraLinear state with a chosen version."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return _layer._unpickle, (self.state,)


@pytest.mark.parametrize("version", [0, 3, 99, None, "1"])
def test_unknown_version_refused(layer, version):
    state = layer.__getstate__()
    if version is None:
        del state["version"]
    else:
        state["version"] = version
    data = pickle.dumps(_Forged(state))
    with pytest.raises(ValueError, match=f"version {version!r}.*not supported") as info:
        pickle.loads(data)
    assert "1" in str(info.value)  # names the version it does read


def test_pickle_state_is_plain_data(layer):
    # The state holds only builtins and numpy arrays: no qlora._core object that could not be
    # rebuilt by a later version.
    state = layer.__getstate__()
    for key, value in state.items():
        assert value is None or isinstance(value, (int, float, np.ndarray)), key


@pytest.mark.parametrize("key, cut", [("codes", 1), ("scales", 1)])
def test_corrupt_state_refused(layer, key, cut):
    state = layer.__getstate__()
    state[key] = state[key][:-cut]
    with pytest.raises(ValueError, match=key):
        pickle.loads(pickle.dumps(_Forged(state)))
