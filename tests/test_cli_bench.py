"""``qlora bench`` runs end to end and writes its JSON (structure only: speed is never asserted)."""

from __future__ import annotations

import json

from qlora import _core
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
    assert {(1, "numpy fp32"), (3, "numpy fp32"), (1, f"qlora[{before}]")} <= rows
    for c in data["forward"]:
        assert c["median_ms"] > 0 and c["reps"] >= 1
        if c["method"].startswith("qlora"):
            assert 0 < c["rel_diff"] < 0.5  # NF4 rounding, not garbage
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
