"""bitsandbytes Linear4bit state dicts without torch: built here by an independent NumPy writer of
the format (REFERENCE.md: flat high-nibble-first packing, absmax per flat block, the JSON quant
state; double quantization decoded as ``map[q] * nested[i // 256] + offset``), read by from_bnb
bit for bit, written back by to_bnb, and every malformed state refused naming the key.
test_bnb_interop.py compares with real bitsandbytes when it is installed."""

from __future__ import annotations

import json

import numpy as np
import pytest

import reference as ref
from qlora import QLoraLinear
from qlora._state import DYNAMIC_MAP, create_dynamic_map

QS = "weight.quant_state.bitsandbytes__nf4"


def bnb_sd(w, blocksize=64, bias=None, nested=False, prefix="", seed=0):
    """A Linear4bit state dict of ``w`` and the float32 weight it decodes to (independently)."""
    out_f, in_f = w.shape
    codes, absmax = ref.quantize(w.astype(np.float32), blocksize)
    qs = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float32",
          "shape": [out_f, in_f]}
    sd = {prefix + "weight": ref.pack_bnb(codes).reshape(-1, 1),
          prefix + "weight.quant_map": ref.NF4.copy()}
    if nested:
        # Any codes and nested scales are a valid state: decode them the documented way.
        rng = np.random.default_rng(seed)
        q = rng.integers(0, 256, absmax.size).astype(np.uint8)
        nested_absmax = rng.uniform(0.5, 1.0, -(-absmax.size // 256)).astype(np.float32)
        offset = float(np.float32(0.75))
        absmax = (DYNAMIC_MAP[q] * np.repeat(nested_absmax, 256)[: q.size]
                  + np.float32(offset)).astype(np.float32)
        sd.update({prefix + "weight.absmax": q, prefix + "weight.nested_absmax": nested_absmax,
                   prefix + "weight.nested_quant_map": DYNAMIC_MAP.copy()})
        qs.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": offset})
    else:
        sd[prefix + "weight.absmax"] = absmax
    sd[prefix + QS] = np.frombuffer(json.dumps(qs).encode(), np.uint8).copy()
    if bias is not None:
        sd[prefix + "bias"] = np.asarray(bias, np.float32)
    return sd, ref.dequantize(codes, absmax, blocksize)


@pytest.mark.parametrize("shape", [(8, 64), (7, 33), (3, 1000), (1, 1), (600, 64)])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("nested", [False, True])
def test_from_bnb_decodes_the_format_bit_exactly(shape, blocksize, nested):
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_normal(shape)
    bias = rng.standard_normal(shape[0])
    sd, want = bnb_sd(w, blocksize, bias, nested)
    layer = QLoraLinear.from_bnb(sd, rank=1, alpha=3.0, seed=5)
    np.testing.assert_array_equal(layer.dequantize_weight().view(np.uint32),
                                  want.view(np.uint32))
    np.testing.assert_array_equal(layer.bias, bias.astype(np.float32))
    assert (layer.group_size, layer.rank, layer.alpha) == (blocksize, 1, 3.0)
    # The fresh adapter is the one from_weight makes with the same seed.
    twin = QLoraLinear.from_weight(w, rank=1, alpha=3.0, seed=5)
    np.testing.assert_array_equal(layer.lora_a, twin.lora_a)
    np.testing.assert_array_equal(layer.lora_b, np.zeros((shape[0], 1), np.float32))
    # to_bnb gives back the same state (keys, dtypes, shapes, bytes).
    back = layer.to_bnb()
    assert set(back) == set(sd)
    for key in sd:
        if key != QS:
            assert back[key].dtype == sd[key].dtype, key
            np.testing.assert_array_equal(back[key].reshape(-1), sd[key].reshape(-1))
    assert json.loads(back[QS].tobytes()) == json.loads(sd[QS].tobytes())


def test_prefix_other_keys_and_storage_dtype():
    rng = np.random.default_rng(1)
    sd, want = bnb_sd(rng.standard_normal((16, 64)), prefix="model.up.")
    sd["model.down.weight"] = np.zeros(3)  # ignored
    sd["model.up.weight"] = sd["model.up.weight"].view(np.int8)  # quant_storage int8
    layer = QLoraLinear.from_bnb(sd, "model.up.")
    np.testing.assert_array_equal(layer.dequantize_weight(), want)
    assert "model.up.weight" in layer.to_bnb("model.up.")


def test_round_trip_of_double_quantized_layers():
    rng = np.random.default_rng(2)
    layer = QLoraLinear.from_weight(rng.standard_normal((37, 90)), group_size=128,
                                    bias=np.arange(37.0), double_quant=True)
    back = QLoraLinear.from_bnb(layer.to_bnb("p."), "p.")
    np.testing.assert_array_equal(back.dequantize_weight(), layer.dequantize_weight())
    np.testing.assert_array_equal(back.scale, layer.scale)
    np.testing.assert_array_equal(back.bias, layer.bias)


def _edit(sd, **changes):
    qs = json.loads(sd[QS].tobytes())
    qs.update(changes)
    qs = {k: v for k, v in qs.items() if v is not ...}
    return {**sd, QS: np.frombuffer(json.dumps(qs).encode(), np.uint8).copy()}


def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


GOOD, _ = bnb_sd(np.random.default_rng(4).standard_normal((8, 64)), nested=True)
PLAIN, _ = bnb_sd(np.random.default_rng(4).standard_normal((8, 64)))


@pytest.mark.parametrize("sd, match", [
    ({k.replace("__nf4", "__int3"): v for k, v in GOOD.items()}, "unknown quant type 'int3'"),
    ({k.replace("__nf4", "__fp4"): v for k, v in GOOD.items()}, "FP4 states are not supported"),
    ({**GOOD, "weight.quant_state.bitsandbytes__fp4": GOOD[QS]}, "several quant states"),
    (_without(GOOD, QS), "bitsandbytes__nf4: missing"),
    (_edit(GOOD, quant_type="fp4"), r"quant_state\['quant_type'\]: only 'nf4'.*'fp4'"),
    (_without(GOOD, "weight.absmax"), "weight.absmax: missing"),
    (_without(GOOD, "weight"), "weight: missing"),
    (_without(GOOD, "weight.quant_map"), "weight.quant_map: missing"),
    (_without(GOOD, "weight.nested_absmax"), "nested_absmax: missing"),
    (_without(GOOD, "weight.nested_quant_map"), "nested_quant_map: missing"),
    (_edit(GOOD, shape=[8, 65]), r"weight: must hold 260 elements, got shape \(256, 1\)"),
    (_edit(GOOD, shape=[8]), r"quant_state\['shape'\]: must be \[out_features, in_features\]"),
    (_edit(GOOD, shape=[8, 0]), r"quant_state\['shape'\]"),
    (_edit(GOOD, shape=[2 ** 31, 2 ** 31]), "too large"),
    (_edit(GOOD, blocksize=0), r"quant_state\['blocksize'\]: must be a positive integer below "
     r"2\*\*62, got 0"),
    (_edit(GOOD, blocksize=2 ** 63), r"quant_state\['blocksize'\]: .* got 9223372036854775808"),
    (_edit(GOOD, blocksize="64"), r"quant_state\['blocksize'\]"),
    (_edit(GOOD, blocksize=32), "weight.absmax: must hold 16 elements"),
    (_edit(GOOD, nested_blocksize=128), r"nested_blocksize'\]: must be 256, got 128"),
    (_edit(GOOD, nested_dtype="float16"), r"nested_dtype'\]: must be 'float32'"),
    (_edit(GOOD, nested_offset="x"), r"nested_offset'\]: must be a finite number, got 'x'"),
    (_edit(GOOD, nested_offset=True), r"nested_offset'\]: must be a finite number"),
    (_edit(GOOD, nested_offset=10 ** 400), r"nested_offset'\]"),
    (_edit(PLAIN, nested_offset=0.5), "nested_blocksize"),
    ({**GOOD, "weight.absmax": GOOD["weight.absmax"].astype(np.float32)},
     "weight.absmax: must have dtype uint8, got float32"),
    ({**PLAIN, "weight.absmax": PLAIN["weight.absmax"].astype(np.float64)},
     "weight.absmax: must have dtype float32, got float64"),
    ({**GOOD, "weight.quant_map": GOOD["weight.quant_map"][::-1].copy()}, "NF4 table"),
    ({**GOOD, "weight.nested_quant_map": np.zeros(255, np.float32)}, "must hold 256"),
    ({**GOOD, "weight.nested_absmax": np.full(1, np.inf, np.float32)},
     "nested_absmax: holds NaN or Inf"),
    ({**PLAIN, "weight.absmax": np.full(8, np.nan, np.float32)}, "weight.absmax: holds NaN"),
    ({**GOOD, QS: np.frombuffer(b"{oops", np.uint8)}, "not valid UTF-8 JSON"),
    ({**GOOD, QS: np.frombuffer(b"[1]", np.uint8)}, "must hold a JSON object"),
    ({**GOOD, QS: np.zeros((2, 2), np.uint8)}, "must be a 1-D uint8 array"),
    ({**GOOD, "weight": object()}, "weight: must be packed 4-bit codes .uint8., got dtype object"),
    ({**GOOD, "bias": np.zeros(7, np.float32)}, r"bias must have shape \(8,\), got \(7,\)"),
    ({**GOOD, "bias": np.full(8, np.nan, np.float32)}, "bias must be finite"),
    ({**GOOD, "bias": np.ones(8, bool)}, "bias: bias must have a real numeric dtype .*got bool"),
    ({**GOOD, "weight.nested_quant_map": np.full(256, 3e38, np.float32),
      "weight.nested_absmax": np.full(1, 10.0, np.float32)},
     "nested_quant_map: .* overflows float32"),
])
def test_bad_states_raise_clear_errors(sd, match):
    with pytest.raises(ValueError, match=match):
        QLoraLinear.from_bnb(sd)


def test_from_bnb_argument_errors():
    with pytest.raises(TypeError, match="state_dict must be a mapping of names to arrays, got "
                       "list"):
        QLoraLinear.from_bnb([1, 2])
    with pytest.raises(TypeError, match="prefix must be a str, got int"):
        QLoraLinear.from_bnb(GOOD, prefix=3)
    with pytest.raises(ValueError, match=r"rank must be between 1 and 8, got 9"):
        QLoraLinear.from_bnb(GOOD, rank=9)  # > min(8, 64)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got -1.0"):
        QLoraLinear.from_bnb(GOOD, alpha=-1.0)
    with pytest.raises(TypeError, match="seed must be an integer, got float"):
        QLoraLinear.from_bnb(GOOD, seed=1.5)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        QLoraLinear.from_bnb(GOOD, seed=-1)


def test_to_bnb_errors():
    layer = QLoraLinear.from_weight(np.ones((4, 50)), rank=1, group_size=50)
    with pytest.raises(ValueError, match=r"group_size 50 cannot be exported: bitsandbytes "
                       r"accepts block sizes \(32, 64"):
        layer.to_bnb()
    layer = QLoraLinear.from_weight(np.ones((4, 64)), rank=1)
    with pytest.raises(TypeError, match="prefix must be a str, got bytes"):
        layer.to_bnb(b"p.")


def test_dynamic_map_properties():
    # bitsandbytes' signed dynamic map: 256 ascending values from about -0.99297 to 1.0,
    # including 0 (REFERENCE.md).
    m = create_dynamic_map()
    assert m.shape == (256,) and m.dtype == np.float32
    assert np.all(np.diff(m) >= 0) and m[-1] == 1.0 and 0.0 in m
    assert m[0] == pytest.approx(-0.99297, abs=1e-5)
    np.testing.assert_array_equal(m, DYNAMIC_MAP)
    assert create_dynamic_map(signed=False).min() == 0.0
    with pytest.raises(ValueError, match="dynamic map has .* entries, expected 256"):
        create_dynamic_map(signed=False, max_exponent_bits=4)
