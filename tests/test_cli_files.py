"""``qlora quantize`` and ``qlora inspect``: what is quantized, what is carried over, the output
file, progress and summary, and the errors (exit status 2 with a message)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qlora
from qlora import QLoraLinear
from qlora.formats.safetensors import SafetensorsFile, bf16_to_float32, write_safetensors
from qlora.cli import main


def _bf16(a):
    """float32 -> raw bf16 bits (round to nearest even)."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.fixture
def checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    t = {
        "model.embed_tokens.weight": (_bf16(rng.standard_normal((50, 64))), "BF16"),
        "model.layers.0.self_attn.q_proj.weight": (_bf16(rng.standard_normal((64, 64))), "BF16"),
        "model.layers.0.mlp.up_proj.weight": (rng.standard_normal((96, 64)).astype(np.float32),
                                              None),
        "model.layers.0.mlp.up_proj.bias": (rng.standard_normal(96).astype(np.float32), None),
        "model.layers.0.mlp.down_proj.weight": (rng.standard_normal((64, 96)).astype(np.float16),
                                                None),
        "model.layers.0.input_layernorm.weight": (np.ones(64, np.float32), None),
        "model.norm.weight": (np.ones(64, np.float32), None),
        "lm_head.weight": (rng.standard_normal((50, 64)).astype(np.float32), None),
        "rotary.inv_freq": (np.arange(8, dtype=np.float64), None),
        "steps": (np.array([3], np.int64), None),
        "mask": (np.zeros((2, 3), np.bool_), None),
        "w1": (rng.standard_normal((3, 5)).astype(np.float32), None),
    }
    path = tmp_path / "in.safetensors"
    write_safetensors(path, [(k, a, d) for k, (a, d) in t.items()], {"format": "pt"})
    return path, t


def _f32(arr, dtype):
    return bf16_to_float32(arr) if dtype == "BF16" else arr.astype(np.float32)


def test_quantize_default(tmp_path, checkpoint, capsys):
    src, t = checkpoint
    out = tmp_path / "out.safetensors"
    assert main(["quantize", str(src), str(out)]) == 0
    cap = capsys.readouterr()
    layers = qlora.load_layers(out)
    want = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
            "model.layers.0.mlp.down_proj", "w1"]
    assert sorted(layers) == sorted(want)
    for name in want:
        key = name + ".weight" if name != "w1" else name
        arr, dtype = t[key]
        ref = QLoraLinear.from_weight(_f32(arr, dtype), rank=min(8, *arr.shape), alpha=16.0)
        got = layers[name]
        np.testing.assert_array_equal(got.dequantize_weight(), ref.dequantize_weight())
        np.testing.assert_array_equal(got.lora_a, ref.lora_a)
        assert got.rank == min(8, *arr.shape) and got.group_size == 64
    np.testing.assert_array_equal(layers["model.layers.0.mlp.up_proj"].bias,
                                  t["model.layers.0.mlp.up_proj.bias"][0])
    assert layers["model.layers.0.mlp.down_proj"].bias is None
    # Everything else is carried over byte for byte, dtype and shape included.
    st = SafetensorsFile(out)
    carried = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
               "model.norm.weight", "lm_head.weight", "rotary.inv_freq", "steps", "mask"]
    for name in carried:
        arr, dtype = t[name]
        info = st.tensors[name]
        assert info.shape == arr.shape
        assert info.dtype == (dtype or SafetensorsFile(src).tensors[name].dtype)
        np.testing.assert_array_equal(st.array(name), arr)
    # The bias became the layer's bias, which keeps the same key (as float32).
    assert st.tensors["model.layers.0.mlp.up_proj.bias"].dtype == "F32"
    assert json.loads(st.metadata["source_metadata"]) == {"format": "pt"}
    # Progress on stderr (layers and bytes), summary table on stdout.
    assert "[4/4] 100.0%" in cap.err and "KB" in cap.err
    assert "rel.err" in cap.out and "quantized 4 matrices" in cap.out
    assert "carried over 7 tensors" in cap.out
    for line in cap.out.splitlines():
        if line.startswith("model.layers.0.mlp.up_proj"):
            assert 0.05 < float(line.split()[3]) < 0.15  # NF4 relative error


def test_official_reader_reads_output_with_bf16(tmp_path, checkpoint):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    src, t = checkpoint
    out = tmp_path / "out.safetensors"
    assert main(["quantize", str(src), str(out), "--double-quant"]) == 0
    tensors = load_file(str(out))
    emb = tensors["model.embed_tokens.weight"]
    assert emb.dtype == torch.bfloat16
    np.testing.assert_array_equal(emb.float().numpy(),
                                  bf16_to_float32(t["model.embed_tokens.weight"][0]))


def test_options(tmp_path, checkpoint, capsys):
    src, t = checkpoint
    out = tmp_path / "o.safetensors"
    assert main(["quantize", str(src), str(out), "--include", r"mlp\.", "--exclude", "down",
                 "--group-size", "32", "--double-quant", "--rank", "4", "--alpha", "2",
                 "--seed", "5"]) == 0
    layers = qlora.load_layers(out)
    assert list(layers) == ["model.layers.0.mlp.up_proj"]
    layer = layers["model.layers.0.mlp.up_proj"]
    assert (layer.rank, layer.alpha, layer.group_size) == (4, 2.0, 32)
    assert "double_quant=True" in repr(layer)
    ref = QLoraLinear.from_weight(t["model.layers.0.mlp.up_proj.weight"][0], rank=4, seed=5)
    np.testing.assert_array_equal(layer.lora_a, ref.lora_a)
    # --all-matrices also takes embeddings and lm_head.
    assert main(["quantize", str(src), str(out), "--all-matrices", "--force"]) == 0
    assert {"model.embed_tokens", "lm_head"} <= set(qlora.load_layers(out))
    capsys.readouterr()


@pytest.mark.parametrize("argv_tail, message", [
    (["--include", "("], "--include"),
    (["--include", "nothing-matches"], "no tensor to quantize"),
    (["--group-size", "0"], "--group-size"),
    (["--rank", "0"], "--rank"),
])
def test_option_errors(tmp_path, checkpoint, capsys, argv_tail, message):
    src, _ = checkpoint
    out = tmp_path / "o.safetensors"
    try:  # bad values of typed options stop in argparse (SystemExit), the others in the run
        rc = main(["quantize", str(src), str(out), *argv_tail])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_file_errors(tmp_path, checkpoint, capsys):
    src, _ = checkpoint
    out = tmp_path / "o.safetensors"
    cases = [
        (["quantize", str(tmp_path / "missing.safetensors"), str(out)], "no such file"),
        (["quantize", str(tmp_path), str(out)], "is a directory"),
        (["quantize", str(src), str(tmp_path)], "is a directory"),
        (["quantize", str(src), str(tmp_path / "nodir" / "o.safetensors")], "does not exist"),
        (["inspect", str(tmp_path / "missing")], "no such file"),
        (["inspect", str(tmp_path)], "is a directory"),
        (["inspect", "/dev/null"], "not a regular file"),
    ]
    text = tmp_path / "notes.txt"
    text.write_text("these are not tensors, just some words in a text file\n")
    cases += [(["quantize", str(text), str(out)], "header length"),
              (["inspect", str(text)], "header length")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.startswith(f"qlora {argv[0]}: error:"), err
    assert not out.exists()
    # An existing output needs --force.
    out.write_bytes(b"keep me")
    assert main(["quantize", str(src), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["quantize", str(src), str(out), "--force"]) == 0
    assert qlora.load_layers(out)


def test_nan_weight_names_tensor(tmp_path, capsys):
    w = np.ones((4, 8), np.float32)
    w[1, 2] = np.nan
    src = tmp_path / "nan.safetensors"
    write_safetensors(src, [("fc.weight", w, None)])
    assert main(["quantize", str(src), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "fc.weight" in err and "(1, 2)" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_interrupted_quantize_leaves_nothing(tmp_path, checkpoint, monkeypatch, capsys):
    from qlora.formats import safetensors as _safetensors

    src, _ = checkpoint
    out = tmp_path / "o.safetensors"

    def boom(arr, chunk=1 << 24):
        yield memoryview(b"x" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(_safetensors, "_chunks", boom)
    with pytest.raises(KeyboardInterrupt):
        main(["quantize", str(src), str(out)])
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]
    capsys.readouterr()


def test_inspect_qlora_file(tmp_path, checkpoint, capsys):
    src, _ = checkpoint
    out = tmp_path / "o.safetensors"
    assert main(["quantize", str(src), str(out), "--double-quant"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "qlora file, format version 1, 4 layers" in text
    line = next(l for l in text.splitlines() if l.startswith("model.layers.0.mlp.up_proj"))
    assert line.split()[1:7] == ["96x64", "64", "8", "16", "yes", "yes"]
    assert "other tensors: 7" in text


def test_inspect_plain_file(checkpoint, capsys):
    src, _ = checkpoint
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "plain safetensors file (format 'pt')" in text
    assert "would quantize 4 matrices" in text
    assert "BF16" in text


def test_inspect_bitsandbytes_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    sd = {}
    sd.update(QLoraLinear.from_weight(rng.standard_normal((32, 64)), group_size=64,
                                      double_quant=True).to_bnb("model.fc1."))
    sd.update(QLoraLinear.from_weight(rng.standard_normal((16, 32)), group_size=32,
                                      bias=np.zeros(16)).to_bnb("model.fc2."))
    sd["model.norm.weight"] = np.ones(32, np.float32)
    path = tmp_path / "bnb.safetensors"
    write_safetensors(path, [(k, v, None) for k, v in sd.items()])
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "bitsandbytes 4-bit checkpoint, 2 Linear4bit layers" in text
    fc1 = next(l for l in text.splitlines() if l.startswith("model.fc1"))
    fc2 = next(l for l in text.splitlines() if l.startswith("model.fc2"))
    assert fc1.split()[1:6] == ["32x64", "nf4", "64", "yes", "no"]
    assert fc2.split()[1:6] == ["16x32", "nf4", "32", "no", "yes"]
    assert "other tensors: 1" in text
    # And each layer imports.
    from safetensors.numpy import load_file

    loaded = load_file(str(path))
    layer = QLoraLinear.from_bnb(loaded, "model.fc2.")
    assert layer.out_features == 16


def test_console_script(tmp_path, checkpoint):
    src, _ = checkpoint
    out = tmp_path / "o.safetensors"
    r = subprocess.run([sys.executable, "-m", "qlora", "quantize", str(src), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "qlora", "quantize", str(src), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "already exists" in r.stderr


@pytest.mark.parametrize("extra, message", [
    ({"fc": np.ones((4, 8), np.float32)}, "both become layer 'fc'"),
    ({"fc.bias": np.ones((2, 2), np.int32)}, "collide"),
    ({"fc.scales": np.ones(3, np.float32)}, "collide"),
])
def test_name_collisions(tmp_path, capsys, extra, message):
    t = {"fc.weight": np.ones((4, 8), np.float32), **extra}
    src = tmp_path / "in.safetensors"
    write_safetensors(src, [(k, v, None) for k, v in t.items()])
    assert main(["quantize", str(src), str(tmp_path / "o.safetensors"), "--all-matrices"]) == 2
    assert message in capsys.readouterr().err
