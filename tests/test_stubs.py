"""The committed type stubs match the compiled module (.ci/check_stubs.sh), and ship with
py.typed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stubs_up_to_date():
    pytest.importorskip("pybind11_stubgen")
    script = os.path.join(ROOT, ".ci", "check_stubs.sh")
    if not os.path.exists(script):
        pytest.skip("not running from a source checkout")
    r = subprocess.run(["bash", script], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, r.stdout + r.stderr


def test_stubs_and_py_typed_installed():
    import qlora

    pkg = os.path.dirname(qlora.__file__)
    assert os.path.exists(os.path.join(pkg, "py.typed"))
    stub = os.path.join(pkg, "_core.pyi")
    assert os.path.exists(stub)
    from qlora import _core

    text = open(stub, encoding="utf-8").read()
    public = [name for name in dir(_core) if not name.startswith("_")]
    missing = [name for name in public if name not in text]
    assert not missing, missing
