"""The package's imports run one way: cli -> _layers -> _layer -> formats -> _state -> _core.

Every module's imports (lazy ones inside functions included) are read with ``ast`` from the
sources, so the test checks the code as written, not what happens to be imported already.
"""

from __future__ import annotations

import ast
import os

import pytest

import qlora

PKG_DIR = os.path.dirname(qlora.__file__)

# Higher may import lower (or its own level inside the same package), never the reverse.
LEVELS = [
    ("qlora._core", 0),
    ("qlora._validate", 1),
    ("qlora._state", 2),
    ("qlora._runtime", 2),
    ("qlora._precision", 1),
    ("qlora.formats", 3),
    ("qlora._train", 3),  # forward_train / backward, methods of the layer
    ("qlora._adapters", 3.5),  # named adapters and mixed batches: the layer's mixin
    ("qlora._layer", 4),
    ("qlora._layers", 5),  # save_layers / load_layers: several layers, built on the layer
    ("qlora.torch", 5),  # the optional torch bridge, built on the layer; imports torch lazily
    ("qlora.cli", 6),
    ("qlora.__main__", 7),
    ("qlora", 7),  # the package __init__: public names only
]


def level(module: str) -> int:
    """The level of the longest LEVELS prefix of ``module``."""
    best = None
    for name, lvl in LEVELS:
        if module == name or module.startswith(name + "."):
            if best is None or len(name) > len(best[0]):
                best = (name, lvl)
    assert best is not None, f"{module} has no level in LEVELS"
    return best[1]


def package_of(module: str) -> str:
    """The subpackage a module belongs to for same-level imports (qlora.cli, qlora.formats)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def modules() -> dict[str, str]:
    """Every Python module of the package: dotted name -> path."""
    out = {}
    for root, _, files in os.walk(PKG_DIR):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG_DIR))
            name = rel[:-3].replace(os.sep, ".")
            if name.endswith(".__init__"):
                name = name[: -len(".__init__")]
            out[name] = os.path.join(root, f)
    return out


MODULES = modules()


def imports_of(name: str, path: str) -> set[str]:
    """qlora modules that ``name`` imports (resolved; ``from X import y`` counts X.y when y is a
    module of the package, else X)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    base_parts = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "qlora" or alias.name.startswith("qlora."):
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base_parts[: len(base_parts) - (node.level - 1)]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "qlora" or target.startswith("qlora.")):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES or sub == "qlora._core" else target)
    return found


def test_every_module_is_found():
    for expected in ("qlora._state", "qlora._layer", "qlora.formats.safetensors",
                     "qlora.formats.bnb", "qlora.formats.peft", "qlora.formats.files",
                     "qlora.cli", "qlora.cli.main", "qlora.cli.demo", "qlora.cli.quantize",
                     "qlora.cli.inspect", "qlora.cli.common", "qlora.cli.bench"):
        assert expected in MODULES


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_one_way(name):
    mine = level(name)
    for imported in imports_of(name, MODULES[name]):
        theirs = level(imported)
        assert theirs <= mine, f"{name} (level {mine}) imports {imported} (level {theirs})"
        if theirs == mine:
            assert package_of(imported) == package_of(name), (
                f"{name} imports {imported} of the same level from another package")


def test_import_graph_has_no_cycle():
    graph = {name: {i for i in imports_of(name, path) if i in MODULES and i != name}
             for name, path in MODULES.items()}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            pytest.fail("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "qlora._layer"))
def test_no_module_reads_the_layers_private_state(name):
    # Only the layer module touches a layer's state attribute; converters and the CLI take and
    # return state values, or use the public API.
    with open(MODULES[name], encoding="utf-8") as f:
        tree = ast.parse(f.read())
    hits = [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in ("_state", "_from_state")]
    assert not hits, f"{name} reads a layer's private fields at lines {hits}"


def test_formats_never_mention_the_layer():
    for name, path in MODULES.items():
        if name.startswith("qlora.formats"):
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            assert "QLoraLinear" not in names, name


def test_the_checker_catches_an_upward_import(tmp_path):
    # The resolver is the part that could silently pass: feed it an upward relative import.
    bad = tmp_path / "bad.py"
    bad.write_text("from .._layer import QLoraLinear\nfrom .. import _core\n")
    found = imports_of("qlora.formats.bad", str(bad))
    assert found == {"qlora._layer", "qlora._core"}
    assert level("qlora._layer") > level("qlora.formats.bad")


def test_every_file_opens_with_a_docstring():
    for name, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        assert ast.get_docstring(tree), f"{name} has no module docstring"


def test_no_file_is_too_long():
    for name, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        assert n <= 650, f"{name} has {n} lines; split it by job"


def test_console_script_entry_point_resolves():
    # pyproject's [project.scripts] names qlora.cli:main; the cli package must keep exposing it.
    import importlib.metadata

    from qlora.cli.main import main

    # The source tree's pyproject (next to the package in a dev build, or next to tests/ in a
    # checkout with the package installed); else the installed distribution's own metadata.
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(os.path.dirname(os.path.dirname(PKG_DIR)), "pyproject.toml"),
                  os.path.join(os.path.dirname(here), "pyproject.toml")]
    pyproject = next((p for p in candidates if os.path.exists(p)), None)
    if pyproject is not None:
        tomllib = pytest.importorskip("tomllib")  # Python 3.11+
        with open(pyproject, "rb") as f:
            scripts = tomllib.load(f)["project"]["scripts"]
        entry = importlib.metadata.EntryPoint(name="qlora", value=scripts["qlora"],
                                              group="console_scripts")
    else:
        found = [e for e in importlib.metadata.distribution("qlora-cpu").entry_points
                 if e.group == "console_scripts" and e.name == "qlora"]
        assert len(found) == 1, found
        entry = found[0]

    assert entry.load() is main
