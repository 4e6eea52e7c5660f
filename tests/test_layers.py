"""The architecture (docs/architecture.md, Layers) as a test: which layer may import which, and no
import cycles between modules, counting imports inside functions too (a lazy import is still a
dependency). Read from the source with ``ast``, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "storage", "pipeline", "distill", "cli")
#: What each layer may import besides itself: data flows pipeline -> storage -> distill; cli calls all.
ALLOWED = {
    "core": set(),
    "storage": {"core"},
    "pipeline": {"core", "storage"},
    "distill": {"core", "storage", "pipeline"},
    "cli": {"core", "storage", "pipeline", "distill"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["arcflow", *parts])


def _imports(path: Path) -> set[str]:
    """Every ``arcflow`` module ``path`` imports, anywhere in the file, as dotted names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("arcflow."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("arcflow."):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def test_the_graph_is_read():
    graph = _graph()
    assert "arcflow.core.errors" in graph["arcflow.distill.config"]
    assert "arcflow.distill.trainer" in graph["arcflow.cli.distill_commands"]


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_the_layers_below_it(layer):
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        if module.split(".")[1] == layer
        for target in targets
        if target.split(".")[1] not in ALLOWED[layer] | {layer}
    )
    assert not wrong, wrong


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
