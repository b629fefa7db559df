"""The merge package's shape: a module per phase, each importing only the phases below it.

No submodule imports the package (``lora_tools.ops.merge``, whose ``__init__`` imports every
phase) or a sibling that imports it back, also not from inside a function, where a circle hides
until the function runs.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "lora_tools.ops.merge"
FOLDER = ROOT / "lora_tools" / "ops" / "merge"
SUBMODULES = sorted(p.stem for p in FOLDER.glob("*.py") if p.stem != "__init__")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (inside functions too).

    ``from lora_tools.ops.merge import jobs`` counts as importing the submodule ``jobs``;
    ``from lora_tools.ops.merge import copy_raw`` and ``from lora_tools.ops import merge`` as
    importing the package.
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative to the package the file is in
                parts = PACKAGE.split(".")
                parent = parts[: len(parts) + 1 - node.level]
                module = ".".join([*parent, *([module] if module else [])])
            for alias in node.names:
                full = f"{module}.{alias.name}"
                if full == PACKAGE or (module == PACKAGE and alias.name in SUBMODULES):
                    names.add(full)
                else:
                    names.add(module)
    return names


def _sibling_graph() -> dict[str, set[str]]:
    """Submodule -> the submodules it imports."""
    return {
        name: {s for s in SUBMODULES if f"{PACKAGE}.{s}" in _imports(FOLDER / f"{name}.py")}
        for name in SUBMODULES
    }


def test_the_phases_are_there() -> None:
    assert set(SUBMODULES) >= {
        "plan",
        "jobs",
        "arithmetic",
        "numpy_engine",
        "torch_engine",
        "engine",
        "write",
    }


@pytest.mark.parametrize("name", SUBMODULES)
def test_no_submodule_imports_the_package(name: str) -> None:
    assert PACKAGE not in _imports(FOLDER / f"{name}.py"), (
        f"{name}.py imports {PACKAGE}, whose __init__ imports every phase: a circle"
    )


def test_the_submodules_import_each_other_without_a_circle() -> None:
    graph = _sibling_graph()
    assert graph["arithmetic"] == set() and graph["jobs"] <= {"arithmetic", "quantized"}
    assert graph["quantized"] == {"arithmetic"}
    assert "engine" not in graph["torch_engine"] and "write" not in graph["torch_engine"]
    order: list[str] = []
    visiting: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in order:
            return
        assert node not in visiting, "import circle: " + " -> ".join([*path, node])
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        visiting.discard(node)
        order.append(node)

    for node in graph:
        visit(node, [])
    assert len(order) == len(SUBMODULES)


def test_the_check_sees_a_circle_hidden_in_a_function(tmp_path: Path) -> None:
    """The static check reads function-local imports (as merge_torch's once hid one)."""
    source = tmp_path / "mod.py"
    source.write_text(
        "def f():\n    from lora_tools.ops.merge import copy_raw\n    from . import plan\n"
    )
    assert {PACKAGE, f"{PACKAGE}.plan"} <= _imports(source)
    source.write_text("from lora_tools.ops import merge\n")
    assert PACKAGE in _imports(source)


@pytest.mark.parametrize("name", SUBMODULES)
def test_each_submodule_imports_alone_in_a_fresh_interpreter(name: str) -> None:
    if name == "torch_engine" and importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    code = (
        "import importlib, sys\n"
        f"importlib.import_module('{PACKAGE}.{name}')\n"
        # the numpy path never loads torch
        f"assert {name!r} == 'torch_engine' or 'torch' not in sys.modules, 'torch loaded'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
