"""The ``qlora`` command line, run as a user would (``python -m qlora`` in a subprocess)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import reference as ref


def qlora_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "qlora", *args], capture_output=True,
                          text=True, timeout=timeout)


def parse(stdout):
    """The demo's numbers: sizes in bytes, bits/parameter and the two relative errors."""
    num = lambda pat: re.search(pat, stdout, re.M).group(1)  # noqa: E731
    return {
        "fp32": int(num(r"^fp32 weight\s+([\d,]+) bytes").replace(",", "")),
        "nf4": int(num(r"^nf4 weight\s+([\d,]+) bytes").replace(",", "")),
        "bits": float(num(r"^nf4 weight.*\(([\d.]+) bits/parameter\)")),
        "saved": int(num(r"^memory saved\s+([\d,]+) bytes").replace(",", "")),
        "recon": float(num(r"^reconstruction\s+relative error ([\d.]+)")),
        "fwd": float(num(r"^forward, batch\s*\d+\s+relative error ([\d.]+)")),
    }


def stored(out_f, in_f, group_size):
    return out_f * (-(-in_f // 32)) * 16 + 4 * (-(-out_f * in_f // group_size))


def test_demo_small_shape():
    r = qlora_cli("demo", "--shape", "256x128", "--rank", "4", "--batch", "3")
    assert r.returncode == 0, r.stderr
    v = parse(r.stdout)
    assert v["fp32"] == 4 * 256 * 128
    assert v["nf4"] == stored(256, 128, 64)
    assert v["saved"] == v["fp32"] - v["nf4"]
    assert v["bits"] == pytest.approx(8 * v["nf4"] / (256 * 128), abs=5e-4)
    # NF4 of Gaussian weights at group 64: an RMS relative error of about 0.09 (0.073 mean
    # abs error of a unit Gaussian is ~0.09 in RMS terms). A broken quantizer is far outside.
    assert 0.05 < v["recon"] < 0.15
    # The output error of a linear map of Gaussian inputs follows the weight error.
    assert 0.03 < v["fwd"] < 0.2
    assert "rank=4" in r.stdout and "batch 3" in r.stdout


def test_demo_default_4096():
    r = qlora_cli("demo")
    assert r.returncode == 0, r.stderr
    v = parse(r.stdout)
    assert v["fp32"] == 4 * 4096 * 4096 == 67_108_864
    assert v["nf4"] == stored(4096, 4096, 64) == 9_437_184
    assert v["saved"] == 57_671_680
    assert 0.05 < v["recon"] < 0.15
    assert "4096x4096" in r.stdout


def test_demo_weights_file(tmp_path):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 70)) * 4  # float64 on disk: converted by the layer
    w[1, :64] = 0.0
    path = tmp_path / "w.npy"
    np.save(path, w)
    r = qlora_cli("demo", "--weights", str(path), "--group-size", "32", "--rank", "2")
    assert r.returncode == 0, r.stderr
    assert str(path) in r.stdout
    v = parse(r.stdout)
    assert v["fp32"] == 4 * 3 * 70
    assert v["saved"] == max(0, v["fp32"] - stored(3, 70, 32))
    codes, absmax = ref.quantize(w.astype(np.float32), 32)
    deq = ref.dequantize(codes, absmax, 32).astype(np.float64)
    w64 = w.astype(np.float32).astype(np.float64)
    want = np.linalg.norm(deq - w64) / np.linalg.norm(w64)
    # The CLI prints 4 decimals, and measures against the float64 file (not its float32
    # rounding): both differences are far below 1e-4.
    assert abs(v["recon"] - want) <= 6e-5, (v["recon"], want)


@pytest.mark.parametrize("args, fragment", [
    (["demo", "--shape", "0x5"], "shape"),
    (["demo", "--shape", "abc"], "shape"),
    (["demo", "--shape", "12"], "shape"),
    (["demo", "--shape", "8x8", "--rank", "0"], "rank"),
    (["demo", "--shape", "8x8", "--rank", "9"], "rank"),
    (["demo", "--shape", "8x8", "--rank", "two"], "rank"),
    (["demo", "--shape", "32x32", "--group-size", "0"], "--group-size"),
    (["demo", "--shape", "32x32", "--alpha", "-1"], "alpha"),
    (["demo", "--weights", "/nonexistent/w.npy"], "w.npy"),
    (["demo", "--bogus"], "--bogus"),
    (["frobnicate"], "frobnicate"),
    ([], "COMMAND"),
])
def test_bad_arguments_exit_nonzero_with_message(args, fragment):
    r = qlora_cli(*args)
    assert r.returncode != 0
    assert fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("content, fragment", [
    (np.ones((2, 3, 4)), "2-D"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
    (np.ones((2, 2), complex), "complex"),
])
def test_bad_weights_file(tmp_path, content, fragment):
    path = tmp_path / "bad.npy"
    np.save(path, content)
    r = qlora_cli("demo", "--weights", str(path), "--rank", "1")
    assert r.returncode != 0
    assert fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_help():
    r = qlora_cli("demo", "--help")
    assert r.returncode == 0
    for option in ("--shape", "--weights", "--rank", "--group-size", "--batch"):
        assert option in r.stdout


def test_console_script():
    exe = shutil.which("qlora", path=os.path.dirname(sys.executable)) or shutil.which("qlora")
    if exe is None:
        pytest.skip("the qlora console script is not on PATH")
    r = subprocess.run([exe, "demo", "--shape", "64x64", "--rank", "2", "--batch", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert parse(r.stdout)["fp32"] == 4 * 64 * 64
