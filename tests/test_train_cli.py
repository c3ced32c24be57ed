"""``qlora finetune``: the example runs, prints one loss line per step for both starts, and the
training lowers the loss and the held-out error against the fp32 layer."""

from __future__ import annotations

import re

from qlora.cli.main import main


def test_finetune_example(capsys):
    assert main(["finetune", "--shape", "96x128", "--rank", "4", "--steps", "15",
                 "--batch", "64", "--lr", "2e-3"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d", line)]
    assert [int(r[0]) for r in rows] == list(range(1, 16))
    nf4 = [float(r[1]) for r in rows]
    loftq = [float(r[2]) for r in rows]
    assert nf4[-1] < 0.8 * nf4[0] and loftq[-1] < 0.8 * loftq[0]
    err = {k: float(v) for k, v in re.findall(r"^\s+(.+?)\s{2,}(\d\.\d+)$", out, re.M)}
    assert err["LoftQ start"] < err["NF4 only (B = 0)"]
    assert err["NF4 start + 15 steps"] < err["NF4 only (B = 0)"]


def test_finetune_rejects_bad_dropout(capsys):
    assert main(["finetune", "--shape", "8x8", "--rank", "2", "--steps", "1",
                 "--dropout", "1.5"]) == 2
    assert "dropout must be in [0, 1)" in capsys.readouterr().err


def test_bench_backward_smoke(capsys):
    """One small cell: the row holds qlora's timings, the ratios and u's bytes (no speed is
    asserted); the torch columns are '-' without the interop extra."""
    assert main(["bench", "--backward", "--shape", "64x128", "--batch", "1,3", "--rank", "4",
                 "--min-reps", "1", "--min-time", "0"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("64x128")]
    assert [int(r[1]) for r in rows] == [1, 3]
    assert [int(r[-1]) for r in rows] == [4 * 4, 3 * 4 * 4]  # saved u: batch x rank float32
    assert all(float(r[2]) > 0 and float(r[5]) > 0 for r in rows)
