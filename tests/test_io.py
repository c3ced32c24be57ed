"""Saving and loading layers as safetensors: round trips, zero-copy mmap shared between
processes, interop with the official safetensors package, and clear errors for bad files."""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import qlora
from qlora import QLoraLinear
from qlora.formats.safetensors import SafetensorsFile, bf16_to_float32


def _layer(shape=(40, 100), group_size=64, dq=False, bias=True, rank=4, seed=0):
    rng = np.random.default_rng(seed)
    layer = QLoraLinear.from_weight(rng.standard_normal(shape), rank=rank, alpha=6.0,
                                    group_size=group_size, double_quant=dq, seed=seed,
                                    bias=rng.standard_normal(shape[0]) if bias else None)
    layer.set_lora_b(rng.standard_normal((shape[0], rank)))
    return layer


def _same(a, b):
    x = np.random.default_rng(9).standard_normal((3, a.in_features)).astype(np.float32)
    assert (a.out_features, a.in_features, a.rank, a.group_size, a.num_groups) == \
        (b.out_features, b.in_features, b.rank, b.group_size, b.num_groups)
    assert a.scaling == b.scaling and a.alpha == b.alpha
    np.testing.assert_array_equal(a.lora_a, b.lora_a)
    np.testing.assert_array_equal(a.lora_b, b.lora_b)
    assert (a.bias is None) == (b.bias is None)
    if a.bias is not None:
        np.testing.assert_array_equal(a.bias, b.bias)
    np.testing.assert_array_equal(a.scale.view(np.uint32), b.scale.view(np.uint32))
    np.testing.assert_array_equal(a.dequantize_weight(), b.dequantize_weight())
    np.testing.assert_array_equal(a(x), b(x))
    assert a.memory_saved_bytes() == b.memory_saved_bytes()


@pytest.mark.parametrize("mmap_", [True, False])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape, group_size, bias", [((40, 100), 64, True), ((1, 1), 1, False),
                                                     ((33, 65), 7, True), ((300, 64), 32, False)])
def test_round_trip(tmp_path, mmap_, dq, shape, group_size, bias):
    layer = _layer(shape, group_size, dq, bias, rank=1)
    path = tmp_path / "layer.safetensors"
    layer.save(path)
    back = QLoraLinear.load(path, mmap=mmap_)
    _same(layer, back)
    back2 = QLoraLinear.load(str(path), mmap=mmap_)  # str paths too
    _same(layer, back2)


def test_mmap_is_zero_copy(tmp_path):
    layer = _layer((64, 256))
    path = tmp_path / "l.safetensors"
    layer.save(path)
    back = QLoraLinear.load(path)
    for arr in (back._state.weight.codes, back._state.weight.scales):
        base = arr
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        assert isinstance(base, mmap.mmap)
        assert not arr.flags.writeable
    # A loaded layer stays usable after its file is unlinked (the mapping keeps the data).
    os.remove(path)
    _same(layer, back)
    # Setters replace pieces; they never write into the mapping.
    back.set_lora_b(np.zeros((64, 4)))
    back.set_bias(None)


def test_save_layers_load_layers(tmp_path):
    layers = {"model.layers.0.mlp.up_proj": _layer((48, 64), dq=True),
              "model.layers.0.mlp.down_proj": _layer((64, 48), seed=1),
              "x": _layer((5, 9), group_size=3, bias=False, rank=2)}
    path = tmp_path / "m.safetensors"
    qlora.save_layers(path, layers)
    for mm in (True, False):
        back = qlora.load_layers(path, mmap=mm)
        assert list(back) == list(layers)
        for name in layers:
            _same(layers[name], back[name])
    with pytest.raises(ValueError, match="holds 3 layers"):
        QLoraLinear.load(path)


def test_metadata_and_official_safetensors_interop(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    layer = _layer((48, 64), dq=True)
    path = tmp_path / "l.safetensors"
    layer.save(path)
    tensors = load_file(str(path))
    assert set(tensors) == {"layer." + s for s in
                            ("codes", "qscales", "nested_scales", "nested_map", "lora_a",
                             "lora_b", "bias")}
    np.testing.assert_array_equal(tensors["layer.lora_b"], layer.lora_b)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "qlora" and meta["format_version"] == "1"
    info = json.loads(meta["layers"])["layer"]
    assert info == {"out_features": 48, "in_features": 64, "group_size": 64, "rank": 4,
                    "alpha": 6.0, "scaling": 1.5, "double_quant": True,
                    "nested_offset": layer._state.weight.nested_offset, "bias": True}
    # Rewritten by the official writer (different layout order, same content): still loads.
    save_file(tensors, str(tmp_path / "official.safetensors"), metadata=meta)
    _same(layer, QLoraLinear.load(tmp_path / "official.safetensors"))


def test_reader_reads_official_files_and_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    t = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
         "c": torch.randn(2, 2).half(), "e": torch.zeros(0, 4)}
    save_file(t, str(tmp_path / "t.safetensors"))
    st = SafetensorsFile(tmp_path / "t.safetensors")
    assert st.tensors["a"].dtype == "BF16"
    np.testing.assert_array_equal(bf16_to_float32(st.array("a")), t["a"].float().numpy())
    np.testing.assert_array_equal(st.array("b"), t["b"].numpy())
    np.testing.assert_array_equal(st.array("c"), t["c"].numpy())
    assert st.array("e").shape == (0, 4)
    # Zero-size tensors cost nothing; one NumPy cannot describe is refused, not crashed on.
    for shape, ok in (([2 ** 20, 2 ** 20, 0], True), ([2 ** 62, 2 ** 62, 0], False)):
        blob = json.dumps({"z": {"dtype": "F32", "shape": shape,
                                 "data_offsets": [0, 0]}}).encode()
        (tmp_path / "z.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
        if ok:
            assert SafetensorsFile(tmp_path / "z.safetensors").array("z").shape == tuple(shape)
        else:
            with pytest.raises(ValueError, match="too large"):
                SafetensorsFile(tmp_path / "z.safetensors")
    with pytest.raises(ValueError, match="format"):
        qlora.load_layers(tmp_path / "t.safetensors")


def test_atomic_save(tmp_path, monkeypatch):
    from qlora.formats import safetensors as _safetensors

    path = tmp_path / "l.safetensors"
    _layer().save(path)
    before = path.read_bytes()

    def boom(arr, chunk=1 << 24):
        yield memoryview(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(_safetensors, "_chunks", boom)
    with pytest.raises(KeyboardInterrupt):
        _layer(seed=5).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["l.safetensors"]


def test_saved_file_mode(tmp_path):
    path = tmp_path / "l.safetensors"
    old = os.umask(0o022)
    try:
        _layer().save(path)
    finally:
        os.umask(old)
    assert (os.stat(path).st_mode & 0o777) == 0o644


def test_save_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        qlora.save_layers(tmp_path / "x", {})
    with pytest.raises(TypeError, match="QLoraLinear"):
        qlora.save_layers(tmp_path / "x", {"a": 1})
    with pytest.raises(ValueError, match="non-empty"):
        qlora.save_layers(tmp_path / "x", {"": _layer()})
    with pytest.raises(TypeError):
        qlora.save_layers(tmp_path / "x", [_layer()])
    with pytest.raises(OSError):
        _layer().save(tmp_path / "no" / "such" / "dir.safetensors")


# ---------------------------------------------------------------------- bad files
def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + body


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    _layer((40, 100), dq=False).save(path)
    return path.read_bytes()


def _meta_edit(header, **changes):
    info = json.loads(header["__metadata__"]["layers"])
    info["layer"].update(changes)
    header["__metadata__"]["layers"] = json.dumps(info)


def _cases():
    def trunc(d):
        return d[:-10]

    def tiny(d):
        return d[:5]

    def huge_len(d):
        return struct.pack("<Q", 2 ** 63) + d[8:]

    def long_len(d):
        return struct.pack("<Q", len(d)) + d[8:]

    def bad_json(d):
        n = struct.unpack("<Q", d[:8])[0]
        return d[:8] + b"{" * n + d[8 + n:]

    def hdr(fn):
        def f(d):
            h, body = _split(d)
            fn(h)
            return _join(h, body)
        return f

    return [
        ("truncated", trunc, "data"),
        ("shorter than 8 bytes", tiny, "header length"),
        ("absurd header length", huge_len, "header length"),
        ("header past end", long_len, "header length"),
        ("bad JSON", bad_json, "header"),
        ("wrong format", hdr(lambda h: h["__metadata__"].update(format="gguf")), "format"),
        ("no metadata", hdr(lambda h: h.pop("__metadata__")), "format"),
        ("future version", hdr(lambda h: h["__metadata__"].update(format_version="3")),
         "format_version"),
        ("other codes layout", hdr(lambda h: h["__metadata__"].update(codes_layout="x")),
         "codes_layout"),
        ("shape vs bytes", hdr(lambda h: h["layer.scales"].update(shape=[64])), "shape"),
        ("group size vs scales", hdr(lambda h: _meta_edit(h, group_size=32)), "layer.scales"),
        ("out_features vs codes", hdr(lambda h: _meta_edit(h, out_features=41)), "layer.codes"),
        ("absurd sizes", hdr(lambda h: _meta_edit(h, out_features=2 ** 40, in_features=2 ** 40)),
         "out_features"),
        ("overflowing shape", hdr(lambda h: h["layer.codes"].update(shape=[2 ** 62, 2 ** 62])),
         "shape"),
        ("negative offset", hdr(lambda h: h["layer.codes"].update(data_offsets=[-1, 5])),
         "data_offsets"),
        ("overlap", hdr(lambda h: h["layer.lora_a"].update(
            data_offsets=h["layer.lora_b"]["data_offsets"])), "data_offsets"),
        ("unknown dtype", hdr(lambda h: h["layer.codes"].update(dtype="Q4")), "dtype"),
        ("wrong dtype", hdr(lambda h: h["layer.scales"].update(dtype="I32")), "dtype"),
        ("tensor the metadata does not call for", hdr(lambda h: h["__metadata__"].update(
            layers=h["__metadata__"]["layers"].replace('"bias": true', '"bias": false'))),
         "layer.bias"),
        ("rank not int", hdr(lambda h: _meta_edit(h, rank="4")), "rank"),
        ("scaling nan", hdr(lambda h: _meta_edit(h, scaling=float("nan"))), "scaling"),
        ("no layers", hdr(lambda h: h["__metadata__"].update(layers="{}")), "layers"),
        ("layers not JSON", hdr(lambda h: h["__metadata__"].update(layers="[")), "layers"),
        ("metadata not strings", hdr(lambda h: h["__metadata__"].update(x=1)), "__metadata__"),
        ("entry extra field", hdr(lambda h: h["layer.codes"].update(x=1)), "layer.codes"),
    ]


@pytest.mark.parametrize("name, mutate, field", _cases(), ids=[c[0] for c in _cases()])
@pytest.mark.parametrize("mmap_", [True, False])
def test_bad_files(tmp_path, good, name, mutate, field, mmap_):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(mutate(good))
    with pytest.raises(ValueError) as info:
        qlora.load_layers(path, mmap=mmap_)
    msg = str(info.value)
    assert str(path) in msg and field in msg, msg


def test_non_finite_values_rejected(tmp_path, good):
    h, body = _split(good)
    begin = h["layer.lora_a"]["data_offsets"][0]
    body = body[:begin] + np.float32(np.nan).tobytes() + body[begin + 4:]
    (tmp_path / "nan.safetensors").write_bytes(_join(h, body))
    with pytest.raises(ValueError, match="lora_a.*NaN"):
        QLoraLinear.load(tmp_path / "nan.safetensors")


def test_missing_directory_empty(tmp_path):
    with pytest.raises(FileNotFoundError):
        QLoraLinear.load(tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError):
        QLoraLinear.load(tmp_path)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="header length"):
        QLoraLinear.load(tmp_path / "empty")
    with pytest.raises(TypeError):
        qlora.load_layers(tmp_path / "empty", mmap="yes")


# ---------------------------------------------------------------------- shared memory
_CHILD = textwrap.dedent("""
    import sys, numpy as np, qlora
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    path, mmap_, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    x = np.random.default_rng(0).standard_normal((2, 4096)).astype(np.float32)
    rss0, anon0 = status("VmRSS"), status("RssAnon")
    layer = qlora.QLoraLinear.load(path, mmap=mmap_)
    rss1 = status("VmRSS")
    y = layer(x)
    anon2 = status("RssAnon")
    np.save(out, y)
    print(rss1 - rss0, anon2 - anon0)
""")


def _child(path, mmap_, out):
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(path), "1" if mmap_ else "0",
                             str(out)], stdout=subprocess.PIPE, text=True)


def test_mmap_shares_pages_across_processes(tmp_path):
    """A 4096x4096 layer: loading with mmap does not grow resident memory by the codes' size,
    and a forward touches the codes only as shared file pages (anonymous memory does not grow
    by them either); two processes loading the same file at once compute identical outputs."""
    layer = QLoraLinear.from_weight(
        np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32) * 0.02,
        rank=8, group_size=64)
    path = tmp_path / "big.safetensors"
    layer.save(path)
    codes_bytes = layer._state.weight.codes.nbytes
    assert codes_bytes == 8 * 2 ** 20

    procs = [_child(path, True, tmp_path / f"y{i}.npy") for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for text in outs:
        rss_load, anon_forward = (int(v) for v in text.split())
        assert rss_load < codes_bytes // 2, (rss_load, codes_bytes)  # scales+LoRA ~1.3 MB
        assert anon_forward < codes_bytes // 2, (anon_forward, codes_bytes)
    y0, y1 = np.load(tmp_path / "y0.npy"), np.load(tmp_path / "y1.npy")
    np.testing.assert_array_equal(y0, y1)
    x = np.random.default_rng(0).standard_normal((2, 4096)).astype(np.float32)
    np.testing.assert_array_equal(y0, layer(x))

    # The measurement can see a copy: without mmap, loading does grow by the codes' size.
    p = _child(path, False, tmp_path / "y2.npy")
    rss_load = int(p.communicate(timeout=300)[0].split()[0])
    assert rss_load > codes_bytes
    np.testing.assert_array_equal(np.load(tmp_path / "y2.npy"), y0)


def test_overwrite_file_a_layer_is_mapped_from(tmp_path):
    """Saving over the file a live layer maps is safe: the rename leaves the old inode (and the
    mapping) intact, and the new file holds the new state."""
    path = tmp_path / "l.safetensors"
    original = _layer()
    original.save(path)
    mapped = QLoraLinear.load(path)
    mapped.set_lora_b(np.zeros((40, 4)))
    mapped.save(path)
    reloaded = QLoraLinear.load(path)
    np.testing.assert_array_equal(reloaded.lora_b, 0)
    np.testing.assert_array_equal(mapped.dequantize_weight(), original.dequantize_weight())
    np.testing.assert_array_equal(reloaded.dequantize_weight(), original.dequantize_weight())
