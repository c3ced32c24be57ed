"""Every float that becomes a float32 in the core is checked against what float32 represents:
a scaling or offset that overflows float32 (every output would be non-finite) or underflows it
(1e-46 becomes 0 and the adapter silently vanishes) raises ValueError naming the argument, from
every door: set_lora, load_adapter, from_weight/from_bnb alpha, PEFT configs, qlora file
metadata, bitsandbytes' nested offset and pickles. No torch needed."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import qlora
from qlora import LoraWeights, QLoraLinear
from qlora.formats.safetensors import SafetensorsFile, write_safetensors

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)
# Too large, below the smallest normal number (a subnormal in float32), and below even the
# smallest subnormal (0 in float32).
BAD_SCALINGS = [1e39, 3.5e38, 1e-40, 1e-46, 2.0 ** -150]


def _layer(dq=False):
    rng = np.random.default_rng(0)
    layer = QLoraLinear.from_weight(rng.standard_normal((12, 32)), rank=2, alpha=4.0,
                                    group_size=32, double_quant=dq)
    layer.set_lora_b(rng.standard_normal((12, 2)))
    return layer


def _snapshot(layer):
    x = np.linspace(-1, 1, layer.in_features, dtype=np.float32)
    return (layer.lora_a, layer.lora_b, layer.scaling, layer.rank, layer(x))


def _assert_unchanged(layer, snap):
    for before, after in zip(snap, _snapshot(layer)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("scaling", BAD_SCALINGS)
def test_set_lora_rejects_scalings_float32_cannot_hold(scaling):
    layer = _layer()
    snap = _snapshot(layer)
    a, b = np.ones((3, 32)), np.ones((12, 3))
    with pytest.raises(ValueError, match=r"scaling must be .*float32") as info:
        layer.set_lora(a, b, scaling=scaling)
    assert f"got {scaling!r}" in str(info.value)
    _assert_unchanged(layer, snap)


@pytest.mark.parametrize("scaling", [F32_TINY, F32_MAX, 1e-30, 1e30, 0.5])
def test_set_lora_accepts_the_float32_normal_range(scaling):
    layer = _layer()
    a = np.zeros((1, 32))
    a[0, 0] = 1.0
    b = np.zeros((12, 1))
    b[0, 0] = 1.0
    layer.set_lora(a, b, scaling=scaling)
    assert layer.scaling == scaling
    x = np.zeros(32, np.float32)
    x[0] = 1.0
    # The LoRA term of output 0 is scaling * 1 * 1; with a tiny scaling it is still there.
    expected = layer.dequantize_weight()[0, 0] + np.float32(scaling)
    np.testing.assert_allclose(layer(x)[0], expected, rtol=1e-6)


@pytest.mark.parametrize("scaling", [1e39, 1e-46])
def test_load_adapter_rejects_such_a_scaling(scaling):
    layer = _layer()
    snap = _snapshot(layer)
    lw = LoraWeights("fc", np.ones((2, 32), np.float32), np.ones((12, 2), np.float32),
                     scaling, 2)
    with pytest.raises(ValueError, match="'fc'.*scaling.*float32"):
        layer.load_adapter(lw)
    _assert_unchanged(layer, snap)


@pytest.mark.parametrize("alpha, rank", [(1e39, 1), (1e-40, 1), (3e-38, 4)])
def test_from_weight_and_from_bnb_reject_alpha_over_rank(alpha, rank):
    w = np.random.default_rng(1).standard_normal((8, 64))
    with pytest.raises(ValueError, match="alpha / rank"):
        QLoraLinear.from_weight(w, rank=rank, alpha=alpha)
    sd = QLoraLinear.from_weight(w, rank=1).to_bnb()
    with pytest.raises(ValueError, match="alpha / rank"):
        QLoraLinear.from_bnb(sd, rank=rank, alpha=alpha)


# ---------------------------------------------------------------------- PEFT configs
def write_peft(folder, config, modules=(("fc", 2, 32, 12),), dtype=np.float32):
    """A PEFT adapter folder written by hand: the config as given, tensors by qlora's writer."""
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(3)
    tensors = []
    for name, r, n_in, n_out in modules:
        tensors.append((f"base_model.model.{name}.lora_A.weight",
                        rng.standard_normal((r, n_in)).astype(dtype), None))
        tensors.append((f"base_model.model.{name}.lora_B.weight",
                        rng.standard_normal((n_out, r)).astype(dtype), None))
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    return folder


@pytest.mark.parametrize("extra, what", [
    ({"lora_alpha": 1e39}, "lora_alpha / r"),
    ({"lora_alpha": 1e-40}, "lora_alpha / r"),
    ({"lora_alpha": 1e-45, "use_rslora": True}, r"lora_alpha / sqrt\(r\)"),
    ({"lora_alpha": 4, "alpha_pattern": {"fc": 1e39}}, "lora_alpha / r"),
])
def test_peft_config_scaling_out_of_float32_range(tmp_path, extra, what):
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **extra}
    folder = write_peft(tmp_path / "a", config)
    with pytest.raises(ValueError, match=f"adapter_config.json: lora_alpha: module 'fc': {what}"
                       ".*float32"):
        qlora.load_peft_adapter(folder)


def test_peft_alpha_too_large_for_a_float_is_refused(tmp_path):
    folder = write_peft(tmp_path / "a", {"peft_type": "LORA", "r": 2, "lora_alpha": 10 ** 400})
    with pytest.raises(ValueError, match="lora_alpha: must be a finite number"):
        qlora.load_peft_adapter(folder)


# ---------------------------------------------------------------------- qlora file metadata
def rewrite_metadata(path, change):
    st = SafetensorsFile(path, mmap=False)
    meta = dict(st.metadata)
    layers = json.loads(meta["layers"])
    change(layers["layer"])
    meta["layers"] = json.dumps(layers)
    tensors = [(k, st.raw(k), info.dtype, info.shape) for k, info in st.tensors.items()]
    write_safetensors(path, tensors, meta)


@pytest.mark.parametrize("key, value", [("scaling", 1e39), ("scaling", 1e-46),
                                        ("scaling", 1e-40), ("alpha", 1e39),
                                        ("alpha", 1e-46), ("nested_offset", 1e39),
                                        ("nested_offset", -1e39), ("nested_offset", 1e-45)])
def test_file_metadata_out_of_float32_range(tmp_path, key, value):
    path = tmp_path / "l.safetensors"
    _layer(dq=True).save(path)
    rewrite_metadata(path, lambda info: info.__setitem__(key, value))
    with pytest.raises(ValueError, match=rf"layers\['layer'\]\.{key}: .*float32"):
        QLoraLinear.load(path)


@pytest.mark.parametrize("key", ["scaling", "nested_offset", "alpha"])
def test_file_metadata_integer_too_large_for_a_float(tmp_path, key):
    path = tmp_path / "l.safetensors"
    _layer(dq=True).save(path)
    rewrite_metadata(path, lambda info: info.__setitem__(key, 10 ** 400))
    with pytest.raises(ValueError, match=rf"layers\['layer'\]\.{key}: must be a finite float32"):
        QLoraLinear.load(path)


def test_file_nested_map_that_overflows_the_decoded_scales(tmp_path):
    path = tmp_path / "l.safetensors"
    _layer(dq=True).save(path)
    st = SafetensorsFile(path, mmap=False)
    tensors = [(k, st.raw(k), info.dtype, info.shape) for k, info in st.tensors.items()
               if k != "layer.nested_map"]
    tensors.append(("layer.nested_map", np.full(256, 3e38, np.float32), None))
    write_safetensors(path, tensors, st.metadata)
    with pytest.raises(ValueError, match="'layer.nested_map': .* overflows float32"):
        QLoraLinear.load(path)


def test_file_metadata_zero_offset_is_fine(tmp_path):
    path = tmp_path / "l.safetensors"
    layer = _layer(dq=True)
    layer.save(path)
    rewrite_metadata(path, lambda info: info.__setitem__("nested_offset", 0.0))
    back = QLoraLinear.load(path)
    assert back.rank == layer.rank and back.scaling == layer.scaling


# ---------------------------------------------------------------------- bitsandbytes offset
@pytest.mark.parametrize("offset", [1e39, -1e39, 1e-45, 1e-300])
def test_bnb_nested_offset_out_of_float32_range(offset):
    sd = _layer(dq=True).to_bnb()
    key = "weight.quant_state.bitsandbytes__nf4"
    qs = json.loads(sd[key].tobytes())
    qs["nested_offset"] = offset
    sd[key] = np.frombuffer(json.dumps(qs).encode(), np.uint8).copy()
    with pytest.raises(ValueError, match=r"quant_state\['nested_offset'\].*float32"):
        QLoraLinear.from_bnb(sd)


def test_bnb_nested_offset_zero_and_normal_are_fine():
    layer = _layer(dq=True)
    sd = layer.to_bnb()
    back = QLoraLinear.from_bnb(sd)
    np.testing.assert_array_equal(back.dequantize_weight(), layer.dequantize_weight())


# ---------------------------------------------------------------------- pickles
class _Forged:
    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        from qlora import _layer

        return _layer._unpickle, (self.state,)


@pytest.mark.parametrize("key, value", [("scaling", 1e39), ("scaling", 1e-46),
                                        ("nested_offset", 1e39)])
def test_pickle_out_of_float32_range(key, value):
    state = _layer(dq=True).__getstate__()
    state[key] = value
    with pytest.raises(ValueError, match=f"{key}.*float32"):
        pickle.loads(pickle.dumps(_Forged(state)))
