"""``qlora bench`` runs end to end and writes its JSON (structure only: speed is never asserted)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from qlora import QLoraLinear, _core
from qlora.cli import main


def test_bench_quick_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    before = _core.active_isa()
    rc = main(["bench", "--quick", "--shape", "64x96", "--batch", "1,3", "--rank", "4",
               "--methods", "qlora,qlora-scalar,numpy", "--min-time", "0", "--min-reps", "1",
               "--json", str(path)])
    assert rc == 0
    assert _core.active_isa() == before  # forcing scalar is undone
    text = capsys.readouterr().out
    assert "== forward 64x96" in text and "calling overhead" in text
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "notes", "forward", "quantize", "overhead"}
    rows = {(c["batch"], c["method"]) for c in data["forward"]}
    assert {(1, "numpy fp32"), (3, "numpy fp32"), (1, "qlora fp32"),
            (1, "qlora fp32[scalar]")} <= rows
    for c in data["forward"]:
        assert c["median_ms"] > 0 and c["reps"] >= 1
        if c["method"].startswith("qlora"):
            assert 0 < c["rel_diff"] < 0.5  # NF4 rounding, not garbage
            isa = "scalar" if c["method"].endswith("[scalar]") else before
            assert c["kernel"].startswith(f"{isa}.gemm_nf4_") or c["kernel"].startswith(
                tuple(f"{i}.gemm_nf4_" for i in _core.available_isas()))
        else:
            assert c["kernel"] == ""
    assert data["meta"]["threads"] >= 1
    assert data["meta"]["cold"] is False
    assert all(c["copies"] == 1 for c in data["forward"])
    assert data["overhead"]["us_per_call_wall"]["64x64 layer.forward(x)"] > 0


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--methods", "nope"]) == 2
    assert "--methods must name" in capsys.readouterr().err


def test_bench_quick_cold_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = main(["bench", "--quick", "--cold", "--methods", "qlora,numpy", "--min-time", "0",
               "--min-reps", "1", "--json", str(path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "COLD" in text and "K copies per method" in text
    data = json.loads(path.read_text())
    assert data["meta"]["cold"] is True and data["meta"]["llc_bytes"] > 0
    assert data["forward"]
    for c in data["forward"]:
        assert c["copies"] >= 1 and c["median_ms"] > 0
        if c["method"].startswith("qlora"):
            assert 0 < c["rel_diff"] < 0.5  # every copy holds the same weight


def test_bench_precisions_name_their_kernels(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = main(["bench", "--shape", "64x96", "--shape", "32x64", "--batch", "1,40", "--rank", "4",
               "--methods", "qlora,numpy", "--precision", "fp32,bf16,int8", "--min-time", "0",
               "--min-reps", "1", "--json", str(path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "kernels  bf16:" in text and "kernels  int8:" in text
    data = json.loads(path.read_text())
    assert data["meta"]["precisions"] == ["fp32", "bf16", "int8"]
    assert data["meta"]["kernel_info"]["precisions"].keys() == {"fp32", "bf16", "int8"}
    cells = {(c["shape"], c["batch"], c["method"]): c for c in data["forward"]}
    layer_like = QLoraLinear.from_weight(np.ones((64, 96), np.float32), rank=4)
    for shape in ("64x96", "32x64"):
        for b in (1, 40):
            for p in ("fp32", "bf16", "int8"):
                c = cells[(shape, b, f"qlora {p}")]
                choice = _core.gemm_choice(layer_like._state.tensor, p, b)
                assert c["kernel"] == choice["kernel"]  # the kernel that served the row
                assert ("no " + p + " kernel here" in c["note"]) == (choice["precision"] != p)
                assert c["fallback"] == (choice["precision"] != p)
                # Each precision is close to NumPy's product of the unquantized weight: NF4.
                assert 0.01 < c["rel_diff"] < 0.5


def test_bench_rejects_bad_precision(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--precision", "fp32,fp16"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--precision" in err and "'fp16'" in err and "'bf16'" in err


def test_bench_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    rc = main(["bench", "--shape", "64x96", "--shape", "96x64", "--batch", "1,2,8", "--rank",
               "2", "--methods", "qlora,numpy", "--precision", "fp32,bf16", "--min-time", "0",
               "--min-reps", "1", "--plot", str(png)])
    assert rc == 0
    assert f"wrote {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bench_plot_without_matplotlib_fails_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = main(["bench", "--shape", "64x96", "--batch", "1", "--plot", str(tmp_path / "b.png")])
    assert rc == 2
    captured = capsys.readouterr()
    assert "--plot needs matplotlib" in captured.err and "qlora[plot]" in captured.err
    assert "== forward" not in captured.out  # nothing was timed
    assert not (tmp_path / "b.png").exists()


def test_bench_plot_into_a_missing_directory(tmp_path, capsys):
    rc = main(["bench", "--batch", "1", "--plot", str(tmp_path / "nope" / "b.png")])
    assert rc == 2
    assert "--plot" in capsys.readouterr().err


def test_bench_plot_and_adapters_exclude_each_other(tmp_path, capsys):
    rc = main(["bench", "--adapters", "1", "--plot", str(tmp_path / "b.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--plot" in err and "--adapters" in err
    assert not (tmp_path / "b.png").exists()
