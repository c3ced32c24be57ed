"""Portability smoke test, small enough to run under qemu-user (see .ci/qemu_x86.sh).

It imports qlora, reports and checks the instruction set dispatch chose, builds a layer with
odd sizes (so every tail path runs), and compares forward with a float64 NumPy reference. Under
``qemu-x86_64 -cpu Westmere`` the kernels must choose ``scalar`` and nothing may die of SIGILL;
under ``-cpu Haswell`` they must choose ``avx2`` once it is compiled in. The expected ISA comes
from the environment variable ``QLORA_EXPECT_ISA`` (unset: no expectation, e.g. on the host).

No subprocesses here: under qemu-user a child Python would run natively, not emulated.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import qlora
from qlora import _core

U32 = 2.0**-24  # unit roundoff of float32


def test_reports_and_checks_isa(record_property):
    active = qlora.active_isa()
    available = qlora.available_isas()
    record_property("active_isa", active)
    print(f"active_isa={active} available={available} compiled={list(_core.compiled_isas())}")
    assert active in available
    assert available[-1] == "scalar"
    expected = os.environ.get("QLORA_EXPECT_ISA")
    if expected:
        assert active == expected, (
            f"dispatch chose {active!r}, expected {expected!r} (QLORA_EXPECT_ISA); "
            f"available on this CPU: {available}"
        )


def test_unsupported_isa_is_an_error_not_sigill():
    before = _core.active_isa()
    try:
        for name in _core.compiled_isas():
            if name not in _core.available_isas():
                with pytest.raises(ValueError, match="does not support"):
                    _core.set_isa(name)
        with pytest.raises(ValueError, match="unknown instruction set"):
            _core.set_isa("sse9")
    finally:
        _core.set_isa(before)
    assert _core.active_isa() == before


@pytest.mark.parametrize("out_features,in_features,batch", [(67, 129, 1), (33, 63, 3)])
def test_forward_matches_float64_reference(out_features, in_features, batch):
    rng = np.random.default_rng(out_features * 1000 + in_features)
    w = rng.normal(0.0, 0.05, size=(out_features, in_features)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, size=out_features).astype(np.float32)
    layer = qlora.QLoraLinear.from_weight(w, rank=4, alpha=8.0, group_size=64, bias=bias)
    b = rng.normal(0.0, 0.1, size=(out_features, 4)).astype(np.float32)
    layer.set_lora_b(b)
    x = rng.standard_normal((batch, in_features)).astype(np.float32)

    y = layer(x)

    deq = layer.dequantize_weight().astype(np.float64)
    a = layer.lora_a.astype(np.float64)
    x64 = x.astype(np.float64)
    ref = x64 @ deq.T + layer.scaling * (x64 @ a.T) @ b.astype(np.float64).T + bias
    # Each output is a float32 sum of in_features products plus the LoRA sum of rank products
    # of float32 partial sums: |error| <= gamma_n * (sum of |terms|) with gamma_n ~ n * u,
    # n = in_features + rank + 2. A factor 2 covers the nested LoRA sum's own rounding.
    mag = (np.abs(x64) @ np.abs(deq).T
           + layer.scaling * (np.abs(x64) @ np.abs(a).T) @ np.abs(b.astype(np.float64)).T
           + np.abs(bias))
    bound = 2.0 * (in_features + 4 + 2) * U32 * mag
    err = np.abs(y.astype(np.float64) - ref)
    assert y.dtype == np.float32 and y.shape == (batch, out_features)
    assert np.all(err <= bound), f"max error / bound = {np.max(err / bound):.3g}"
