"""Named adapters in files and pickles, files and pickles written before named adapters, and
PEFT adapters loaded into a dict of layers (``qlora.add_peft_adapter`` /
``qlora.remove_peft_adapter``). No torch needed: PEFT folders are written by hand as in
test_peft_files.py."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

import qlora
import reference as ref
from qlora import QLoraLinear
from qlora.formats.safetensors import SafetensorsFile
from test_peft_files import write_peft

DATA = os.path.join(os.path.dirname(__file__), "data")


def _layers(seed=0):
    rng = np.random.default_rng(seed)
    up = QLoraLinear.from_weight(rng.standard_normal((40, 24)), rank=4, group_size=16,
                                 bias=rng.standard_normal(40))
    down = QLoraLinear.from_weight(rng.standard_normal((24, 40)), rank=2, group_size=16,
                                   double_quant=True)
    return {"model.up": up, "model.down": down}


def _describe(layers):
    return {m: {n: (i.slot, i.rank, i.scaling) for n, i in layer.adapters.items()}
            for m, layer in layers.items()}


def test_save_load_carries_named_adapters(tmp_path):
    layers = _layers()
    rng = np.random.default_rng(1)
    up = layers["model.up"]
    up.add_adapter("fr", rng.standard_normal((3, 24)), rng.standard_normal((40, 3)), alpha=6.0)
    up.add_adapter("gone", rng.standard_normal((1, 24)), rng.standard_normal((40, 1)),
                   scaling=1.0)
    up.add_adapter("de", rng.standard_normal((16, 24)), rng.standard_normal((40, 16)),
                   scaling=0.5)
    up.remove_adapter("gone")
    path = tmp_path / "m.qlora.safetensors"
    qlora.save_layers(path, layers)
    meta = SafetensorsFile(str(path), mmap=False).metadata
    assert meta["format_version"] == "2"
    info = json.loads(meta["layers"])["model.up"]
    assert info["next_slot"] == 4 and [a["slot"] for a in info["adapters"]] == [1, 3]
    for mmap in (True, False):
        loaded = qlora.load_layers(path, mmap=mmap)
        assert _describe(loaded) == _describe(layers)
        x = rng.standard_normal((5, 24)).astype(np.float32)
        entries = ["fr", "de", None, "default", 3]
        np.testing.assert_array_equal(loaded["model.up"].forward(x, adapters=entries),
                                      up.forward(x, adapters=entries))
        # The slot counter survives: slot 2 ("gone") is not given again.
        assert loaded["model.up"].add_adapter("new", np.ones((1, 24)), np.ones((40, 1)),
                                              scaling=1.0) == 4


def test_files_without_named_adapters_stay_version_1(tmp_path):
    path = tmp_path / "m.qlora.safetensors"
    qlora.save_layers(path, _layers())
    assert SafetensorsFile(str(path), mmap=False).metadata["format_version"] == "1"


def test_file_written_before_named_adapters_loads():
    # Written by the qlora of f695732 (tests/data/make_layers_v1_fixture.py).
    layers = qlora.load_layers(os.path.join(DATA, "layers_v1.qlora.safetensors"))
    xs = np.load(os.path.join(DATA, "layers_v1_x.npz"))
    expected = np.load(os.path.join(DATA, "layers_v1_expected.npz"))
    for name in ("up", "down"):
        layer = layers[name]
        assert dict(layer.adapters) == {}
        np.testing.assert_array_equal(layer.dequantize_weight(), expected[f"{name}_deq"])
        x = xs[name]
        bound = ref.forward_bound(x, expected[f"{name}_deq"], layer.lora_a, layer.lora_b,
                                  layer.scaling, layer.bias)
        assert np.all(np.abs(layer(x) - expected[name]) <= bound)
        assert layer.add_adapter("new", np.ones((1, layer.in_features)),
                                 np.ones((layer.out_features, 1)), scaling=1.0) == 1


def test_bad_adapter_metadata_is_refused(tmp_path):
    layers = _layers()
    layers["model.up"].add_adapter("fr", np.ones((2, 24)), np.ones((40, 2)), scaling=1.0)
    path = tmp_path / "m.qlora.safetensors"
    qlora.save_layers(path, layers)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for edit, match in (
        (lambda a: a[0].update(rank=3), "shape"),
        (lambda a: a[0].update(name="default"), "name"),
        (lambda a: a[0].update(scaling=-1), "scaling"),
        (lambda a: a.append(dict(a[0])), "repeats"),
    ):
        h = json.loads(json.dumps(header))
        layers_meta = json.loads(h["__metadata__"]["layers"])
        edit(layers_meta["model.up"]["adapters"])
        h["__metadata__"]["layers"] = json.dumps(layers_meta)
        body = json.dumps(h).encode()
        body += b" " * (-len(body) % 8)
        bad = tmp_path / "bad.qlora.safetensors"
        bad.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])
        with pytest.raises(ValueError, match=match):
            qlora.load_layers(bad)


def test_pickle_round_trip_and_old_pickle():
    layer = _layers()["model.up"]
    layer.add_adapter("x", np.ones((2, 24)), np.ones((40, 2)), scaling=2.0)
    state = layer.__getstate__()
    assert state["version"] == 2 and state["next_slot"] == 2
    again = pickle.loads(pickle.dumps(layer))
    assert {n: (i.slot, i.rank, i.scaling) for n, i in again.adapters.items()} == {
        "x": (1, 2, 2.0)}
    with open(os.path.join(DATA, "layer_v1.pkl"), "rb") as f:
        old = pickle.load(f)
    assert dict(old.adapters) == {}
    assert old.add_adapter("y", np.ones((1, old.in_features)),
                           np.ones((old.out_features, 1)), scaling=1.0) == 1
    state["adapters"] = "nope"
    with pytest.raises(ValueError, match="adapters"):
        QLoraLinear.__new__(QLoraLinear).__setstate__(state)


# ---------------------------------------------------------------------- PEFT into layers
def _peft_folder(tmp_path, name="fr", seed=3, modules=None):
    return write_peft(tmp_path / name, {"r": 2, "lora_alpha": 6},
                      modules or {"model.up": (2, 24, 40), "model.down": (2, 40, 24)})


def test_add_peft_adapter_into_layers(tmp_path):
    layers = _layers()
    arrays = _peft_folder(tmp_path, modules={"model.up": (2, 24, 40)})
    slots = qlora.add_peft_adapter(layers, "fr", tmp_path / "fr")
    assert slots == {"model.up": 1, "model.down": 1}
    assert layers["model.up"].adapters["fr"].rank == 2
    assert layers["model.up"].adapters["fr"].scaling == 3.0
    # The untargeted layer holds a rank-0 placeholder: rows naming "fr" get the base only.
    assert layers["model.down"].adapters["fr"].rank == 0
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 24)).astype(np.float32)
    up = layers["model.up"]
    a, b = arrays["model.up"]
    y = up.forward(x, adapters=["fr", None, "fr"])
    deq = up.dequantize_weight()
    for i, s in ((0, 3.0), (1, 0.0), (2, 3.0)):
        want = ref.forward(x[i], deq, a, b, s, up.bias)
        assert np.all(np.abs(y[i] - want) <= ref.forward_bound(x[i], deq, a, b, s, up.bias))
    x2 = rng.standard_normal((2, 40)).astype(np.float32)
    down = layers["model.down"]
    np.testing.assert_array_equal(down.forward(x2, adapters=["fr", "fr"]),
                                  down.forward(x2, adapters=[None, None]))
    # The model with its adapters saves and loads.
    qlora.save_layers(tmp_path / "m.safetensors", layers)
    assert _describe(qlora.load_layers(tmp_path / "m.safetensors")) == _describe(layers)
    # Removing by name takes it off every layer.
    assert sorted(qlora.remove_peft_adapter(layers, "fr")) == ["model.down", "model.up"]
    assert all(not layer.adapters for layer in layers.values())


def test_add_peft_adapter_is_all_or_nothing(tmp_path):
    layers = _layers()
    _peft_folder(tmp_path, modules={"model.up": (2, 24, 40), "model.mid": (2, 24, 24),
                                    "model.top": (2, 24, 24)})
    with pytest.raises(ValueError, match=r"\['model.mid', 'model.top'\]"):
        qlora.add_peft_adapter(layers, "fr", tmp_path / "fr")
    assert _describe(layers) == {"model.up": {}, "model.down": {}}
    _peft_folder(tmp_path, "bad", modules={"model.up": (2, 24, 40), "model.down": (2, 24, 40)})
    with pytest.raises(ValueError, match="model.down"):
        qlora.add_peft_adapter(layers, "bad", tmp_path / "bad")
    assert _describe(layers) == {"model.up": {}, "model.down": {}}
    _peft_folder(tmp_path)
    layers["model.down"].add_adapter("fr", np.ones((1, 40)), np.ones((24, 1)), scaling=1.0)
    with pytest.raises(ValueError, match="already has an adapter 'fr'.*replace=True"):
        qlora.add_peft_adapter(layers, "fr", tmp_path / "fr")
    assert layers["model.up"].adapters == {}
    slots = qlora.add_peft_adapter(layers, "fr", tmp_path / "fr", replace=True)
    assert slots == {"model.up": 1, "model.down": 1}
    assert layers["model.down"].adapters["fr"].rank == 2


def test_peft_helpers_argument_errors(tmp_path):
    layers = _layers()
    _peft_folder(tmp_path)
    with pytest.raises(TypeError, match="layers must be a mapping"):
        qlora.add_peft_adapter([1], "fr", tmp_path / "fr")
    with pytest.raises(TypeError, match="name must be a str"):
        qlora.add_peft_adapter(layers, 1, tmp_path / "fr")
    with pytest.raises(ValueError, match="reserved"):
        qlora.add_peft_adapter(layers, "default", tmp_path / "fr")
    with pytest.raises(FileNotFoundError):
        qlora.add_peft_adapter(layers, "fr", tmp_path / "missing")
    with pytest.raises(KeyError, match="no layer holds an adapter 'fr'"):
        qlora.remove_peft_adapter(layers, "fr")
    with pytest.raises(TypeError, match="name must be a str"):
        qlora.remove_peft_adapter(layers, None)
    assert _describe(layers) == {"model.up": {}, "model.down": {}}
