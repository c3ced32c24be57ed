"""The bad-input battery beyond test_errors.py: files and paths, several-layer files, PEFT folders,
and every argument of every ``qlora`` subcommand. Each bad input raises TypeError/ValueError
(OSError for the file system), or exits with status 2, with a message naming the argument, what
was expected and what was given; a layer that refused an input is unchanged. The CLI runs in
this process (``qlora.cli.main``), so its code is measured by coverage too."""

from __future__ import annotations

import json
import os
import pathlib
import re
import runpy
import sys

import numpy as np
import pytest

import qlora
from qlora import QLoraLinear
from qlora.cli import main
from qlora.formats.safetensors import SafetensorsFile, write_safetensors


def raises(exc, *fragments):
    """pytest.raises that also requires every fragment (literal text) in the message."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


@pytest.fixture
def layer():
    rng = np.random.default_rng(1)
    layer = QLoraLinear.from_weight(rng.standard_normal((8, 64)), rank=2,
                                    bias=rng.standard_normal(8))
    layer.set_lora_b(rng.standard_normal((8, 2)))
    return layer


def state(layer):
    x = np.linspace(-1, 1, layer.in_features, dtype=np.float32)
    return (layer.lora_a, layer.lora_b, layer.scaling, layer.bias, layer.scale, layer(x))


def assert_same(before, after):
    for u, v in zip(before, after):
        np.testing.assert_array_equal(u, v)


# ---------------------------------------------------------------------- API: files and paths
@pytest.mark.parametrize("value", [1, 0, None, "yes", 2.0])
def test_double_quant_must_be_bool(value):
    with raises(TypeError, "double_quant must be a bool", f"got {type(value).__name__}"):
        QLoraLinear.from_weight(np.ones((4, 8)), rank=1, double_quant=value)


@pytest.mark.parametrize("path, what", [(3, "int"), (None, "NoneType"), (b"x.st", "bytes"),
                                        (["x"], "list")])
def test_paths_must_be_str_or_pathlike(tmp_path, layer, path, what):
    before = state(layer)
    with raises(TypeError, "path must be a str or os.PathLike", f"got {what}"):
        layer.save(path)
    with raises(TypeError, "path must be a str or os.PathLike", f"got {what}"):
        QLoraLinear.load(path)
    with raises(TypeError, "path must be a str or os.PathLike", f"got {what}"):
        qlora.save_layers(path, {"a": layer})
    with raises(TypeError, "path must be a str or os.PathLike", f"got {what}"):
        qlora.load_layers(path)
    with raises(TypeError, "folder must be a str or os.PathLike", f"got {what}"):
        qlora.load_peft_adapter(path)
    assert_same(before, state(layer))


def test_pathlike_paths_work(tmp_path, layer):
    layer.save(pathlib.Path(tmp_path / "a.safetensors"))
    back = QLoraLinear.load(pathlib.Path(tmp_path / "a.safetensors"))
    np.testing.assert_array_equal(back.lora_b, layer.lora_b)


@pytest.mark.parametrize("mmap, what", [(1, "int"), ("no", "str"), (None, "NoneType")])
def test_mmap_must_be_bool(tmp_path, layer, mmap, what):
    layer.save(tmp_path / "a.safetensors")
    with raises(TypeError, "mmap must be a bool", f"got {what}"):
        QLoraLinear.load(tmp_path / "a.safetensors", mmap=mmap)
    with raises(TypeError, "mmap must be a bool", f"got {what}"):
        qlora.load_layers(tmp_path / "a.safetensors", mmap=mmap)


def test_missing_and_unwritable_paths(tmp_path, layer):
    with pytest.raises(FileNotFoundError, match="nope"):
        QLoraLinear.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        layer.save(tmp_path / "no-dir" / "a.safetensors")
    assert not (tmp_path / "no-dir").exists()
    with pytest.raises(IsADirectoryError):
        qlora.load_layers(tmp_path)


def test_special_files_are_refused_before_opening(tmp_path):
    # A FIFO would block open() forever; a device would be read without end.
    os.mkfifo(tmp_path / "fifo.safetensors")
    os.symlink("/dev/zero", tmp_path / "zero.safetensors")
    for name in ("fifo.safetensors", "zero.safetensors"):
        with raises(ValueError, name, "not a regular file"):
            qlora.load_layers(tmp_path / name)
        with raises(ValueError, name, "not a regular file"):
            QLoraLinear.load(tmp_path / name)


def test_load_refuses_a_file_of_several_layers(tmp_path, layer):
    qlora.save_layers(tmp_path / "two.safetensors", {"a": layer, "b": layer})
    with raises(ValueError, "two.safetensors", "holds 2 layers", "['a', 'b']",
                "use qlora.load_layers"):
        QLoraLinear.load(tmp_path / "two.safetensors")
    both = qlora.load_layers(tmp_path / "two.safetensors")
    assert list(both) == ["a", "b"]


@pytest.mark.parametrize("layers, exc, fragments", [
    ([1], TypeError, ("layers must be a mapping of names to QLoraLinear", "got list")),
    ({}, ValueError, ("layers must hold at least one layer",)),
    ({"": "L"}, ValueError, ("layer names must be non-empty strings", "got ''")),
    ({3: "L"}, ValueError, ("layer names must be non-empty strings", "got 3")),
    ({"__metadata__": "L"}, ValueError, ("got '__metadata__'",)),
    ({"a": 5}, TypeError, ("layers['a'] must be a QLoraLinear", "got int")),
])
def test_save_layers_bad_mappings(tmp_path, layer, layers, exc, fragments):
    layers = {k: (layer if v == "L" else v) for k, v in layers.items()} \
        if isinstance(layers, dict) else layers
    with raises(exc, *fragments):
        qlora.save_layers(tmp_path / "x.safetensors", layers)
    assert not (tmp_path / "x.safetensors").exists()


def test_load_adapter_refuses_weights_of_another_shape_or_scaling(layer):
    before = state(layer)
    cases = [
        (qlora.LoraWeights("m", np.ones((2, 63), np.float32), np.ones((8, 2), np.float32),
                           1.0, 2), ("'m'", "8x64", "weights.a must have shape (2, 64)",
                                     "got (2, 63)")),
        (qlora.LoraWeights("m", np.ones((2, 64), np.float32), np.ones((7, 2), np.float32),
                           1.0, 2), ("weights.b must have shape (8, 2)", "got (7, 2)")),
        (qlora.LoraWeights("m", np.ones((2, 64), np.float32), np.ones((8, 2), np.float32),
                           -2.0, 2), ("weights.scaling must be a finite number > 0",
                                      "got -2.0")),
        (qlora.LoraWeights("m", np.full((2, 64), np.nan, np.float32),
                           np.ones((8, 2), np.float32), 1.0, 2), ("weights.a must be finite",)),
    ]
    for lw, fragments in cases:
        with raises(ValueError, *fragments):
            layer.load_adapter(lw)
        assert_same(before, state(layer))


# ---------------------------------------------------------------------- the command line
def run_cli(capsys, *args):
    """(exit status, stdout, stderr) of ``qlora ARGS``; argparse errors exit through
    SystemExit, the others return 2."""
    try:
        rc = main(list(args))
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def checkpoint(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "in.safetensors"
    write_safetensors(path, [("fc.weight", rng.standard_normal((16, 64)).astype(np.float32),
                              None)])
    return path


ARGPARSE_CASES = [
    # (argv, option, bad text, expectation)
    (["demo", "--shape", "abc"], "--shape", "'abc'", "4096x4096"),
    (["demo", "--shape", "0x5"], "--shape", "'0x5'", "positive"),
    (["demo", "--rank", "0"], "--rank", "'0'", "integer >= 1"),
    (["demo", "--rank", "two"], "--rank", "'two'", "integer >= 1"),
    (["demo", "--alpha", "-1"], "--alpha", "'-1'", "finite number > 0"),
    (["demo", "--alpha", "nan"], "--alpha", "'nan'", "finite number > 0"),
    (["demo", "--group-size", "0"], "--group-size", "'0'", "integer >= 1"),
    (["demo", "--batch", "0"], "--batch", "'0'", "integer >= 1"),
    (["demo", "--seed", "-1"], "--seed", "'-1'", "integer >= 0"),
    (["quantize", "a", "b", "--group-size", "0"], "--group-size", "'0'", "integer >= 1"),
    (["quantize", "a", "b", "--rank", "-3"], "--rank", "'-3'", "integer >= 1"),
    (["quantize", "a", "b", "--alpha", "0"], "--alpha", "'0'", "finite number > 0"),
    (["quantize", "a", "b", "--seed", "x"], "--seed", "'x'", "integer >= 0"),
    (["quantize", "a"], "OUT.safetensors", "", "required"),
    (["inspect"], "FILE", "", "required"),
    (["bench", "--shape", "4096"], "--shape", "'4096'", "4096x4096"),
    (["bench", "--batch", "0,8"], "--batch", "'0,8'", ">= 1"),
    (["bench", "--batch", "a"], "--batch", "'a'", "1,8,32"),
    (["bench", "--rank", "0"], "--rank", "'0'", "integer >= 1"),
    (["bench", "--threads", "0"], "--threads", "'0'", "integer >= 1"),
    (["bench", "--min-reps", "0"], "--min-reps", "'0'", "integer >= 1"),
    (["bench", "--min-time", "-1"], "--min-time", "'-1'", "finite number >= 0"),
    (["bench", "--max-call-seconds", "0"], "--max-call-seconds", "'0'", "finite number > 0"),
    (["bench", "--seed", "-2"], "--seed", "'-2'", "integer >= 0"),
    (["demo", "--bogus"], "--bogus", "", "unrecognized"),
    (["frobnicate"], "frobnicate", "", "invalid choice"),
    ([], "COMMAND", "", "required"),
]


@pytest.mark.parametrize("argv, option, bad, expected", ARGPARSE_CASES,
                         ids=[" ".join(c[0]) or "none" for c in ARGPARSE_CASES])
def test_cli_argument_errors_exit_2(capsys, argv, option, bad, expected):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert option in err and bad in err and expected in err, err
    assert "Traceback" not in err and out == ""


def test_cli_run_errors_exit_2(capsys, tmp_path, checkpoint):
    npy = tmp_path / "w.npy"
    np.save(npy, np.ones((2, 3, 4)))
    existing = tmp_path / "out.safetensors"
    existing.write_bytes(b"old")
    (tmp_path / "not.safetensors").write_bytes(b"not a safetensors file at all")
    cases = [
        (["demo", "--shape", "8x8", "--rank", "9"], ("rank must be between 1 and 8", "got 9")),
        (["demo", "--weights", str(tmp_path / "none.npy")], ("none.npy",)),
        (["demo", "--weights", str(npy), "--rank", "1"], ("weight must be 2-D", "3-D")),
        (["quantize", str(tmp_path / "none.st"), str(tmp_path / "o.st")],
         ("none.st: no such file",)),
        (["quantize", str(tmp_path), str(tmp_path / "o.st")], ("is a directory",)),
        (["quantize", str(checkpoint), str(existing)], ("already exists", "--force")),
        (["quantize", str(checkpoint), str(tmp_path)], ("is a directory", "output")),
        (["quantize", str(checkpoint), str(tmp_path / "nodir" / "o.st")],
         ("output directory does not exist",)),
        (["quantize", str(checkpoint), str(tmp_path / "o.st"), "--include", "("],
         ("--include '('", "not a valid regular expression")),
        (["quantize", str(checkpoint), str(tmp_path / "o.st"), "--exclude", "[a"],
         ("--exclude '[a'", "not a valid regular expression")),
        (["quantize", str(checkpoint), str(tmp_path / "o.st"), "--include", "nothing"],
         ("no tensor to quantize",)),
        (["quantize", str(tmp_path / "not.safetensors"), str(tmp_path / "o.st")],
         ("not.safetensors", "header length")),
        (["inspect", str(tmp_path / "none.st")], ("none.st: no such file",)),
        (["inspect", str(tmp_path)], ("is a directory",)),
        (["inspect", str(tmp_path / "not.safetensors")], ("header length",)),
        (["bench", "--shape", "8x8", "--rank", "9"],
         ("--rank must be <= min(out, in) = 8 for shape 8x8", "got 9")),
        (["bench", "--methods", "numpy,nope"], ("--methods must name some of", "got nope")),
        (["bench", "--json", str(tmp_path / "nodir" / "b.json")],
         ("--json", "directory does not exist")),
    ]
    for argv, fragments in cases:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2, argv
        assert err.startswith(f"qlora {argv[0]}: error: "), err
        for f in fragments:
            assert f in err, (argv, err)
    assert existing.read_bytes() == b"old"  # not overwritten
    assert not (tmp_path / "o.st").exists()


# ---------------------------------------------------------------------- the CLI, run in process
def parse_demo(stdout):
    num = lambda pat: re.search(pat, stdout, re.M).group(1)  # noqa: E731
    return {
        "fp32": int(num(r"^fp32 weight\s+([\d,]+) bytes").replace(",", "")),
        "nf4": int(num(r"^nf4 weight\s+([\d,]+) bytes").replace(",", "")),
        "saved": int(num(r"^memory saved\s+([\d,]+) bytes").replace(",", "")),
        "recon": float(num(r"^reconstruction\s+relative error ([\d.]+)")),
        "fwd": float(num(r"^forward, batch\s*\d+\s+relative error ([\d.]+)")),
    }


def test_demo_in_process_reports_true_numbers(capsys, tmp_path):
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.02, (48, 96))
    np.save(tmp_path / "w.npy", w)
    rc, out, _ = run_cli(capsys, "demo", "--weights", str(tmp_path / "w.npy"), "--rank", "3",
                         "--group-size", "32", "--batch", "2", "--seed", "4")
    assert rc == 0
    v = parse_demo(out)
    # The same quantization done here: sizes and reconstruction error from first principles.
    layer = QLoraLinear.from_weight(w, rank=3, group_size=32)
    deq = layer.dequantize_weight().astype(np.float64)
    assert v["fp32"] == 4 * 48 * 96
    assert v["nf4"] == 48 * 96 // 2 + 4 * (48 * 96 // 32)
    assert v["saved"] == v["fp32"] - v["nf4"]
    assert v["recon"] == pytest.approx(np.linalg.norm(deq - w) / np.linalg.norm(w), abs=1e-4)
    assert 0.0 < v["fwd"] < 0.3
    assert "w.npy" in out and "batch 2" in out


def test_python_dash_m_runs_the_cli(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qlora", "demo", "--shape", "32x64", "--rank", "2",
                                      "--batch", "1"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("qlora", run_name="__main__", alter_sys=True)
    assert info.value.code == 0
    assert parse_demo(capsys.readouterr().out)["fp32"] == 4 * 32 * 64


def test_inspect_shows_a_damaged_alpha_instead_of_failing(capsys, tmp_path, layer):
    path = tmp_path / "l.safetensors"
    layer.save(path)
    st = SafetensorsFile(path, mmap=False)
    meta = dict(st.metadata)
    layers = json.loads(meta["layers"])
    layers["layer"]["alpha"] = "x"
    meta["layers"] = json.dumps(layers)
    write_safetensors(path, [(k, st.raw(k), i.dtype, i.shape) for k, i in st.tensors.items()],
                      meta)
    rc, out, _ = run_cli(capsys, "inspect", str(path))
    assert rc == 0 and "'x'" in out and "8x64" in out
    # Loading it is refused: the loader checks every number.
    with raises(ValueError, "layers['layer'].alpha", "got 'x'"):
        QLoraLinear.load(path)
