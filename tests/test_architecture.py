"""The layer picture of docs/architecture.md, checked on the source: no import runs up a layer,
and no two modules import each other, not even through a function-local import."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import lora_tools

ROOT = Path(lora_tools.__file__).parent

#: Module prefix -> layer, lowest first (docs/architecture.md draws the same picture). The
#: longest matching prefix decides; a module may import its own layer and the layers below.
LAYERS: dict[str, int] = {
    "lora_tools": 0,  # the package itself: __version__ and the lazy names only
    "lora_tools.constants": 0,
    "lora_tools.errors": 0,
    "lora_tools.patterns": 1,
    "lora_tools.results": 1,
    "lora_tools.io": 1,
    "lora_tools.quant": 1,
    "lora_tools.adapter": 2,
    "lora_tools.lowrank": 2,
    "lora_tools.deltas": 2,
    "lora_tools.naming": 1,
    "lora_tools.layouts": 1,
    "lora_tools.formats": 4,
    "lora_tools.resolve": 5,
    "lora_tools.consumers": 5,
    "lora_tools.ops": 6,
    "lora_tools.api": 7,
    "lora_tools.cli": 8,
    "lora_tools.__main__": 8,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _imports(module: str) -> Iterator[tuple[str, int]]:
    """Every lora_tools module that ``module`` imports, anywhere in its body, with the line."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # imports under `if TYPE_CHECKING:` are for annotations only: they never run
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule when there is one
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name, node.lineno


GRAPH = {m: sorted({target for target, _ in _imports(m)}) for m in MODULES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        assert any(module == p or module.startswith(p + ".") for p in LAYERS), module


def test_no_import_runs_up_a_layer() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)}) "
        f"at line {line}"
        for module in MODULES
        if module != "lora_tools"
        for target, line in _imports(module)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    # a package's __init__ re-exporting its submodules is not a circle: its submodules import
    # their siblings, never the package
    graph = {m: [t for t in targets if not m.startswith(t + ".")] for m, targets in GRAPH.items()}
    assert _cycles(graph) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": ["b"], "b": ["a"]}, [["a", "b"]]),
        ({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}, [["a", "b", "c"]]),
        ({"a": ["b"], "b": []}, []),
    ],
)
def test_the_circle_finder_finds_circles(graph, expected) -> None:
    assert _cycles(graph) == expected
