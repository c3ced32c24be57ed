"""The committed type stubs match the compiled module (.ci/check_stubs.sh), and ship with
py.typed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The committed stubs were generated with these; other versions format signatures differently
# (e.g. pybind11 3 writes "typing.SupportsInt | typing.SupportsIndex"), so the comparison only
# means something with the same tools. .ci/check_stubs.sh itself is always strict.
STUBGEN_VERSION = "3.0.0"
PYBIND11_MAJOR = "3."


def test_stubs_up_to_date():
    import importlib.metadata

    pytest.importorskip("pybind11_stubgen")
    versions = {}
    for dist in ("pybind11-stubgen", "pybind11"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    if versions["pybind11-stubgen"] != STUBGEN_VERSION or not (
        versions["pybind11"] or ""
    ).startswith(PYBIND11_MAJOR):
        pytest.skip(f"stubs were generated with pybind11-stubgen {STUBGEN_VERSION} and "
                    f"pybind11 {PYBIND11_MAJOR}x; found {versions}")
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
