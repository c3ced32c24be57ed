"""Every dtype of the safetensors format is read, measured and carried byte-exact, sub-byte ones
included (``ceil(bits * elements / 8)`` bytes), by the reader, ``qlora quantize`` and
``qlora inspect``; a dtype name the format does not define is refused naming the tensor and the
dtype, because its size (and thus every offset) could not be checked. Files are built byte by
byte here, independent of qlora's writer."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import qlora
from qlora.cli import main
from qlora.formats.safetensors import SafetensorsFile, write_safetensors

# dtype -> bits per element, as the safetensors format defines them.
FORMAT_DTYPES = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def raw_file(path, entries, metadata=None, offsets=None):
    """Write a safetensors file from (name, dtype, shape, bytes) in order; `offsets` overrides
    a tensor's data_offsets."""
    header, pos, blob = {}, 0, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": (offsets or {}).get(name, [pos, pos + len(data)])}
        pos += len(data)
        blob += data
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob)


def nbytes(dtype, shape):
    return -(-int(np.prod(shape, dtype=np.int64)) * FORMAT_DTYPES[dtype] // 8)


def exotic_entries():
    rng = np.random.default_rng(0)
    out = []
    for dtype, shape in (("F4", (3, 5)), ("F4", (1,)), ("F6_E2M3", (7,)), ("F6_E3M2", (2, 2)),
                         ("F8_E4M3FNUZ", (4, 3)), ("F8_E5M2FNUZ", (5,)), ("F8_E8M0", (3,)),
                         ("F8_E4M3", (2, 3)), ("C64", (2, 3)), ("F4", (0, 4))):
        out.append((f"t.{dtype}.{'x'.join(map(str, shape))}", dtype, shape,
                    rng.integers(0, 256, nbytes(dtype, shape), dtype=np.uint8).tobytes()))
    return out


def test_reader_measures_every_format_dtype(tmp_path):
    entries = [(f"t.{d}", d, (3, 5), bytes(range(nbytes(d, (3, 5)))))
               for d in FORMAT_DTYPES]
    raw_file(tmp_path / "all.safetensors", entries)
    st = SafetensorsFile(tmp_path / "all.safetensors")
    for name, dtype, shape, data in entries:
        info = st.tensors[name]
        assert (info.dtype, info.shape, info.nbytes) == (dtype, shape, len(data))
        assert st.raw(name).tobytes() == data
    # 15 elements of 4 bits are 60 bits: 8 bytes, the last half-byte padding.
    assert st.tensors["t.F4"].nbytes == 8 and st.tensors["t.F6_E2M3"].nbytes == 12


@pytest.mark.parametrize("dtype, shape, size", [("F4", (3, 5), 7), ("F4", (3, 5), 9),
                                                ("F6_E3M2", (7,), 5), ("C64", (2,), 8),
                                                ("F8_E8M0", (3,), 4)])
def test_reader_checks_sub_byte_and_new_sizes(tmp_path, dtype, shape, size):
    raw_file(tmp_path / "bad.safetensors", [("t", dtype, shape, b"\0" * size)])
    with pytest.raises(ValueError, match=rf"tensor 't' shape: shape \[.*\] of {dtype} needs "
                       rf"{nbytes(dtype, shape)} bytes, but data_offsets give {size}"):
        SafetensorsFile(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("dtype", ["F3", "U4", "Q4_K", "f32", ""])
def test_unknown_dtype_is_refused_by_name(tmp_path, dtype):
    raw_file(tmp_path / "bad.safetensors", [("odd.tensor", dtype, (4,), b"\0" * 4)])
    with pytest.raises(ValueError, match=rf"tensor 'odd.tensor' dtype: unknown dtype "
                       rf"'{dtype}': its element size is unknown"):
        SafetensorsFile(tmp_path / "bad.safetensors")
    assert main(["inspect", str(tmp_path / "bad.safetensors")]) == 2


def test_offsets_of_sub_byte_tensors_are_checked(tmp_path):
    entries = [("a", "F4", (3,), b"\x12\x34"), ("b", "F6_E2M3", (4,), b"\x01\x02\x03")]
    raw_file(tmp_path / "gap.safetensors", entries, offsets={"b": [3, 6]})
    with pytest.raises(ValueError, match="tensor 'b' data_offsets"):
        SafetensorsFile(tmp_path / "gap.safetensors")
    raw_file(tmp_path / "overlap.safetensors", entries, offsets={"b": [1, 4]})
    with pytest.raises(ValueError, match="tensor 'b' data_offsets: begins at 1, expected 2 "
                       r"\(overlaps"):
        SafetensorsFile(tmp_path / "overlap.safetensors")


def test_quantize_and_inspect_carry_exotic_tensors_byte_exact(tmp_path, capsys):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    exotic = exotic_entries()
    src = tmp_path / "in.safetensors"
    raw_file(src, [("fc.weight", "F32", w.shape, w.tobytes())] + exotic, {"format": "pt"})
    dst = tmp_path / "out.safetensors"
    assert main(["quantize", str(src), str(dst), "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert f"carried over {len(exotic)} tensors unchanged" in out
    st = SafetensorsFile(dst)
    for name, dtype, shape, data in exotic:
        info = st.tensors[name]
        assert (info.dtype, info.shape) == (dtype, shape)
        assert st.raw(name).tobytes() == data
    layers = qlora.load_layers(dst)
    assert list(layers) == ["fc"]
    assert main(["inspect", str(dst)]) == 0
    text = capsys.readouterr().out
    assert f"other tensors: {len(exotic)}" in text
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    for dtype in ("F4", "F6_E2M3", "F6_E3M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"):
        assert dtype in text
    assert "would quantize 1 matrices" in text


def test_writer_lays_out_sub_byte_tensors(tmp_path):
    # The writer takes raw bytes under any format dtype and checks their size.
    write_safetensors(tmp_path / "w.safetensors",
                      [("a", np.frombuffer(b"\xab\xcd", np.uint8), "F4", (3,)),
                       ("b", np.zeros(3, np.float32), None)])
    st = SafetensorsFile(tmp_path / "w.safetensors")
    assert st.raw("a").tobytes() == b"\xab\xcd" and st.tensors["a"].shape == (3,)
    np.testing.assert_array_equal(st.array("b"), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"tensor 'a': 3 bytes do not make F4 \(3,\)"):
        write_safetensors(tmp_path / "x.safetensors",
                          [("a", np.zeros(3, np.uint8), "F4", (3,))])
    with pytest.raises(ValueError, match="do not make Q4"):
        write_safetensors(tmp_path / "x.safetensors", [("a", np.zeros(3, np.uint8), "Q4", (3,))])
    with pytest.raises(ValueError, match="cannot be read as NumPy"):
        SafetensorsFile(tmp_path / "w.safetensors").array("a")
