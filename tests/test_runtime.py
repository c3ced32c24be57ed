"""Runtime settings: thread count, instruction-set choice and their environment variables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import qlora
from qlora import _core


def test_set_get_num_threads(restore_threads):
    for n in (1, 3, 2, 7):
        qlora.set_num_threads(n)
        assert qlora.get_num_threads() == n
    assert isinstance(qlora.get_num_threads(), int)


def python(code, **env):
    full = dict(os.environ)
    full.pop("QLORA_FORCE_ISA", None)
    full.pop("QLORA_NUM_THREADS", None)
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=120)


def test_num_threads_env():
    r = python("import qlora; print(qlora.get_num_threads())", QLORA_NUM_THREADS="3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3"


def test_default_num_threads_is_positive():
    assert _core.default_num_threads() >= 1
    r = python("import qlora; print(qlora.get_num_threads())")
    assert int(r.stdout) >= 1
    if hasattr(os, "sched_getaffinity"):
        assert int(r.stdout) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("isa", _core.available_isas())
def test_force_isa_env(isa):
    r = python("import qlora; print(qlora.active_isa())", QLORA_FORCE_ISA=isa)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == isa


def test_force_isa_unknown_is_an_error_not_a_crash():
    r = python("import qlora, numpy as np\n"
               "qlora.QLoraLinear.from_weight(np.ones((2, 2), np.float32), rank=1)\n",
               QLORA_FORCE_ISA="bogus")
    assert r.returncode == 1  # a Python exception, not a signal
    assert "ValueError" in r.stderr and "bogus" in r.stderr and "QLORA_FORCE_ISA" in r.stderr


def test_isa_lists_are_consistent():
    available = qlora.available_isas()
    assert available[-1] == "scalar"  # best first, scalar last
    assert set(available) <= set(_core.compiled_isas())
    assert qlora.active_isa() in available


@pytest.mark.parametrize("value", ["0", "-2", "abc", "4097", "3 "])
def test_ignored_num_threads_env_warns(value):
    r = python("import qlora; print(qlora.get_num_threads())", QLORA_NUM_THREADS=value)
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" in r.stderr and "QLORA_NUM_THREADS" in r.stderr
    assert repr(value) in r.stderr
    assert int(r.stdout) >= 1


@pytest.mark.parametrize("value", ["1", "4", " 2"])
def test_valid_num_threads_env_is_silent(value):
    r = python("import qlora; print(qlora.get_num_threads())", QLORA_NUM_THREADS=value)
    assert r.returncode == 0 and r.stderr == ""
    assert int(r.stdout) == int(value)
