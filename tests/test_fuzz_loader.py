"""Fuzz the layer loader: thousands of damaged variants of small valid files (random byte flips,
flips inside the header, truncations, appended bytes, edited header numbers and strings). The
loader may only raise ValueError or OSError; when it accepts a file, the layers must compute a
forward without crashing. Deterministic (fixed seeds); runs in a few seconds."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

import qlora
from qlora import QLoraLinear

CASES_PER_FILE = 700


def _files(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    specs = [((9, 40), 16, False, True), ((5, 33), 7, True, False), ((3, 64), 64, True, True)]
    for i, (shape, gs, dq, bias) in enumerate(specs):
        layer = QLoraLinear.from_weight(rng.standard_normal(shape), rank=2, group_size=gs,
                                        double_quant=dq,
                                        bias=rng.standard_normal(shape[0]) if bias else None)
        path = tmp_path / f"f{i}.safetensors"
        layer.save(path)
        out.append(path.read_bytes())
    path = tmp_path / "multi.safetensors"
    qlora.save_layers(path, {"a.b": QLoraLinear.from_weight(rng.standard_normal((4, 8)), rank=1),
                             "c": QLoraLinear.from_weight(rng.standard_normal((6, 3)), rank=1,
                                                          group_size=2, double_quant=True)})
    out.append(path.read_bytes())
    return out


_NUMBER = re.compile(rb"-?\d+(\.\d+)?(e-?\d+)?")
_INTERESTING = [b"0", b"-1", b"1", b"2", b"255", b"256", b"65", b"4294967296",
                b"18446744073709551616", b"9" * 40, b"1e308", b"-0.0", b"NaN", b"true",
                b"null", b"\"7\"", b"[]", b"{}", b"1.5"]


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    n = struct.unpack("<Q", data[:8])[0]
    kind = rng.integers(7)
    if kind == 0:  # random flips anywhere
        for _ in range(rng.integers(1, 9)):
            buf[rng.integers(len(buf))] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # flips inside the header (length field included)
        for _ in range(rng.integers(1, 4)):
            buf[rng.integers(8 + n)] = int(rng.integers(256))
    elif kind == 2:  # truncation
        del buf[rng.integers(len(buf)):]
    elif kind == 3:  # appended garbage
        buf += rng.bytes(int(rng.integers(1, 64)))
    elif kind == 4:  # replace one number of the header JSON, keeping the length field right
        header = bytes(buf[8:8 + n])
        nums = list(_NUMBER.finditer(header))
        m = nums[rng.integers(len(nums))]
        new = _INTERESTING[rng.integers(len(_INTERESTING))]
        header = header[:m.start()] + new + header[m.end():]
        buf = bytearray(struct.pack("<Q", len(header)) + header + data[8 + n:])
    elif kind == 5:  # edit the layers metadata (escaped JSON inside JSON) semantically
        h = json.loads(data[8:8 + n])
        layers = json.loads(h["__metadata__"]["layers"])
        name = list(layers)[rng.integers(len(layers))]
        key = list(layers[name])[rng.integers(len(layers[name]))]
        choices = [0, 1, -1, 2 ** 31, 2 ** 63, 2 ** 64 + 1, 3, 64, 0.5, True, None, "x",
                   float("inf"), [1], 1e300]
        layers[name][key] = choices[rng.integers(len(choices))]
        h["__metadata__"]["layers"] = json.dumps(layers)
        blob = json.dumps(h).encode()
        buf = bytearray(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
    else:  # set the header length to something else
        choices = [0, 1, n - 1, n + 1, len(data), 2 ** 32, 2 ** 63, 2 ** 64 - 1]
        buf[:8] = struct.pack("<Q", choices[rng.integers(len(choices))])
    return bytes(buf)


def test_fuzz_loader(tmp_path):
    rng = np.random.default_rng(12345)
    path = tmp_path / "fuzz.safetensors"
    accepted = rejected = 0
    for data in _files(tmp_path):
        for i in range(CASES_PER_FILE):
            path.write_bytes(_mutate(data, rng))
            try:
                layers = qlora.load_layers(path, mmap=bool(i % 2))
            except (ValueError, OSError):
                rejected += 1
                continue
            accepted += 1
            for layer in layers.values():
                x = rng.standard_normal((2, layer.in_features)).astype(np.float32)
                y = layer(x)
                assert y.shape == (2, layer.out_features)
                layer.dequantize_weight()
                repr(layer)
            del layers
    # Most mutations must be caught; flips in the code bytes are legitimately accepted.
    assert rejected > accepted > 0, (rejected, accepted)
    assert rejected + accepted == 4 * CASES_PER_FILE


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_are_rejected(tmp_path, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / "noise.safetensors"
    for _ in range(100):
        path.write_bytes(rng.bytes(int(rng.integers(0, 300))))
        with pytest.raises((ValueError, OSError)):
            qlora.load_layers(path)
