"""Double quantization (from_weight(..., double_quant=True)): layout, exact-nearest codes, the
decoded scales used by forward/dequantize_weight, and the smaller storage. No torch needed."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from qlora import QLoraLinear, _core
from qlora._state import DYNAMIC_MAP, NF4_CODEBOOK, double_quantize


def _weight(shape, seed=0):
    rng = np.random.default_rng(seed)
    # Rows of very different magnitudes so the group scales spread widely.
    return (rng.standard_normal(shape) * rng.uniform(0.001, 2.0, (shape[0], 1))).astype(np.float32)


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def _decode(q, nested, offset):
    rep = np.repeat(nested, 256)[: q.size]
    return (DYNAMIC_MAP[q] * rep + np.float32(offset)).astype(np.float32)


@pytest.mark.parametrize("shape, group_size", [((64, 256), 64), ((300, 130), 64), ((5, 7), 3),
                                               ((1, 1), 1), ((129, 255), 32), ((17, 4096), 4096)])
def test_layout_and_decoding(shape, group_size):
    w = _weight(shape)
    plain = QLoraLinear.from_weight(w, rank=1, group_size=group_size)
    dq = QLoraLinear.from_weight(w, rank=1, group_size=group_size, double_quant=True)
    parts = dq._state.weight
    g = plain.num_groups
    assert parts.scales is None and parts.qscales.dtype == np.uint8 and parts.qscales.shape == (g,)
    assert parts.nested_scales.dtype == np.float32
    assert parts.nested_scales.shape == ((g + 255) // 256,)
    np.testing.assert_array_equal(_bits(parts.nested_map), _bits(DYNAMIC_MAP))
    # Codes are the same as without double quantization (quantized with the exact absmax).
    np.testing.assert_array_equal(parts.codes, plain._state.weight.codes)
    # offset = mean(absmax) in float32; nested = absmax of the centred scales per 256.
    absmax = plain.scale
    assert np.float32(parts.nested_offset) == np.float32(absmax.astype(np.float64).mean())
    centred = absmax - np.float32(parts.nested_offset)
    for j, ns in enumerate(parts.nested_scales):
        assert ns == np.abs(centred[j * 256:(j + 1) * 256]).max()
    # scale property = decoded scales, two float32 roundings.
    dec = _decode(parts.qscales, parts.nested_scales, parts.nested_offset)
    np.testing.assert_array_equal(_bits(dq.scale), _bits(dec))
    # dequantize_weight = NF4 value * decoded scale of its flat group.
    flat = np.empty((w.size + 1) // 2, np.uint8)
    _core.codes_to_bnb(parts.codes, shape[0], shape[1], flat)
    codes = np.empty(flat.size * 2, np.uint8)
    codes[0::2], codes[1::2] = flat >> 4, flat & 15
    want = NF4_CODEBOOK[codes[: w.size]] * np.repeat(dec, group_size)[: w.size]
    np.testing.assert_array_equal(_bits(dq.dequantize_weight().reshape(-1)), _bits(want))


def test_codes_are_exactly_nearest():
    w = _weight((512, 512), seed=1)
    plain = QLoraLinear.from_weight(w, rank=1, group_size=32)
    absmax = plain.scale
    q, nested, nmap, offset = double_quantize(absmax)
    rep = np.repeat(nested, 256)[: absmax.size]
    # Decoded value of every candidate code for every scale (brute force).
    cand = (nmap[None, :] * rep[:, None] + np.float32(offset)).astype(np.float32)
    err = np.abs(cand.astype(np.float64) - absmax[:, None].astype(np.float64))
    best = err.min(axis=1)
    chosen = err[np.arange(absmax.size), q]
    np.testing.assert_array_equal(chosen, best)


def test_degenerate_scales():
    # All groups equal: centred scales are 0, nested scale 0, decoded scale = offset exactly.
    dq = QLoraLinear.from_weight(np.ones((8, 64)), rank=1, group_size=16, double_quant=True)
    np.testing.assert_array_equal(dq.scale, np.ones(32, np.float32))
    np.testing.assert_array_equal(dq.dequantize_weight(), np.ones((8, 64), np.float32))
    # All-zero weight.
    z = QLoraLinear.from_weight(np.zeros((4, 32)), rank=1, group_size=8, double_quant=True)
    np.testing.assert_array_equal(z.dequantize_weight(), 0)


def test_forward_uses_decoded_scales():
    rng = np.random.default_rng(2)
    dq = QLoraLinear.from_weight(_weight((96, 160), 3), rank=4, group_size=64, double_quant=True,
                                 bias=rng.standard_normal(96))
    dq.set_lora_b(rng.standard_normal((96, 4)))
    x = rng.standard_normal((7, 160)).astype(np.float32)
    x64 = x.astype(np.float64)
    want = (x64 @ dq.dequantize_weight().T.astype(np.float64) + dq.bias
            + dq.scaling * (x64 @ dq.lora_a.T.astype(np.float64)) @ dq.lora_b.T.astype(np.float64))
    got = dq(x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_memory_bits_per_parameter():
    w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32) * 0.02
    n = w.size
    plain = QLoraLinear.from_weight(w, rank=8, group_size=64)
    dq = QLoraLinear.from_weight(w, rank=8, group_size=64, double_quant=True)
    bits_plain = 8 * (4 * n - plain.memory_saved_bytes()) / n
    bits_dq = 8 * (4 * n - dq.memory_saved_bytes()) / n
    assert bits_plain == pytest.approx(4.5)
    # 4 (codes) + 8/64 (qscales) + 32/(64*256) (nested) + tiny map/offset = 4.127
    assert 4.12 < bits_dq < 4.135
    assert dq.memory_saved_bytes() > plain.memory_saved_bytes()
    # Accuracy barely changes.
    e_plain = np.linalg.norm(plain.dequantize_weight() - w) / np.linalg.norm(w)
    e_dq = np.linalg.norm(dq.dequantize_weight() - w) / np.linalg.norm(w)
    assert e_dq < e_plain * 1.01


def test_copy_pickle_repr():
    dq = QLoraLinear.from_weight(_weight((40, 50)), rank=2, group_size=16, double_quant=True)
    assert "double_quant=True" in repr(dq)
    for other in (copy.copy(dq), copy.deepcopy(dq), pickle.loads(pickle.dumps(dq))):
        np.testing.assert_array_equal(_bits(other.dequantize_weight()),
                                      _bits(dq.dequantize_weight()))


def test_double_quant_argument_type():
    with pytest.raises(TypeError, match="double_quant"):
        QLoraLinear.from_weight(np.ones((4, 4)), rank=1, double_quant="yes")
