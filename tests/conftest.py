"""Shared fixtures: the instruction sets to run on, hypothesis profiles, small helpers.

Hypothesis profiles: ``ci`` (the default) bounds the examples so the whole suite stays fast;
``thorough`` runs many more. Pick one with ``HYPOTHESIS_PROFILE=thorough pytest``. Neither has a
deadline: a first call may pay for thread-pool start-up or a large shape.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import qlora
from qlora import _core

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The fp32 tests run once per instruction set that has fp32 kernels of its own; the ones that
# only add reduced-precision kernels (avx512_bf16, avx512_vnni, ...) would repeat the fp32
# kernels of the ISA below them. Precision tests take their ISAs from PRECISION_ISAS.
_OWN = _core.kernel_info()["isa_kernels"]
ALL_ISAS = _core.available_isas()
ISAS = [name for name in ALL_ISAS if "gemm_nf4_f32" in _OWN[name]]
SIMD_ISAS = [name for name in ISAS if name != "scalar"]
PRECISION_ISAS = {
    "bf16": [name for name in ALL_ISAS if "gemm_nf4_bf16" in _OWN[name] and name != "scalar"],
    "int8": [name for name in ALL_ISAS if "gemm_nf4_q8" in _OWN[name] and name != "scalar"],
}


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test once per instruction set this CPU supports, restoring the original after."""
    original = _core.active_isa()
    _core.set_isa(request.param)
    try:
        yield request.param
    finally:
        _core.set_isa(original)


class use_isa:
    """Context manager: run a block with one instruction set, then restore the previous one."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.saved = _core.active_isa()
        _core.set_isa(self.name)
        return self

    def __exit__(self, *exc):
        _core.set_isa(self.saved)
        return False


@pytest.fixture
def restore_threads():
    """Restore qlora's thread count after a test that changes it."""
    saved = qlora.get_num_threads()
    yield saved
    qlora.set_num_threads(saved)


def bnb_codes(layer: qlora.QLoraLinear) -> np.ndarray:
    """The layer's codes in bitsandbytes' flat packing (uint8, (n + 1) // 2)."""
    out, inp = layer.out_features, layer.in_features
    flat = np.empty((out * inp + 1) // 2, np.uint8)
    _core.codes_to_bnb(layer._state.weight.codes, out, inp, flat)
    return flat


def bits(a: np.ndarray) -> np.ndarray:
    """float32 array as its uint32 bit patterns, for bit-for-bit comparison (0.0 vs -0.0 too)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
