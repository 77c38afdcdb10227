"""The package's shape: imports point down the layers of pyproject.toml's import-linter contract,
no module takes another's private names, and no function is longer than 80 lines.

Read from the source (``ast``) and with ``lint-imports``; nothing is imported or run.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "geoseg"
LONGEST = 80  # lines of one function from its "def" (docstring included, decorators not)


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def imports_of(tree: ast.Module):
    """``(module, name)`` for every ``from geoseg... import name`` anywhere in ``tree`` (functions too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "geoseg":
            for alias in node.names:
                yield node.module, alias.name


def functions(tree: ast.Module, prefix: str):
    """``(qualified name, lines)`` of every function and method in ``tree``."""
    def walk(node, path):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield ".".join(path + [child.name]), child.end_lineno - child.lineno + 1
                yield from walk(child, path + [child.name])
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, path + [child.name])

    yield from walk(tree, [prefix])


def test_no_module_imports_another_modules_private_names():
    found = []
    mods = modules()
    for name, tree in mods.items():
        for module, imported in imports_of(tree):
            if module != name and imported.startswith("_") and not imported.startswith("__"):
                found.append(f"{name} imports {module}.{imported}")
    assert not found, "make these public (and document them) or move them where they are used: " + "; ".join(found)


def test_no_function_is_longer_than_80_lines():
    """A long job is a list of named steps (resolve options -> open inputs -> run model -> write
    outputs), each a function of its own."""
    lengths = {}
    for name, tree in modules().items():
        for qualified, lines in functions(tree, name):
            if lines > LONGEST:
                lengths[qualified] = lines
    assert not lengths, f"functions over {LONGEST} lines: {lengths}; split them into named steps"


def test_the_functions_walk_sees_methods_and_nested_functions():
    tree = ast.parse("class A:\n    def f(self):\n        def g():\n            pass\n        return g\n")
    assert dict(functions(tree, "m")) == {"m.A.f": 4, "m.A.f.g": 2}


def test_imports_keep_the_layer_contract():
    """pyproject.toml's [tool.importlinter] contracts: layers top to bottom, and no import cycle."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.skip("lint-imports is not installed: pip install -e '.[test]' installs import-linter")
    proc = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
