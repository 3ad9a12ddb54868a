"""The house rules, checked on the source: layers import only downward, no import cycles, modules of a readable
size, and results that are data."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("serve", "bench", "eval")
MAX_LINES = 400

LAYERS = {
    "serve.errors": set(),
    "serve.provenance": set(),
    "serve.engine": {"serve.errors", "serve.engine"},
    "serve.kosmos2": {"serve.errors", "serve.engine", "serve.kosmos2"},
    "serve.app": {"serve.errors", "serve.engine", "serve.kosmos2", "serve.app"},
    "serve.batch": {"serve.errors", "serve.provenance", "serve.engine", "serve.kosmos2", "serve.app", "serve.batch"},
}
"""What each layer of ``serve`` may import from the project: only the layers below it, and itself."""

FORBIDDEN = {
    "serve.engine": ("ray", "fastapi", "starlette", "serve.app", "serve.kosmos2"),
    "serve.kosmos2": ("ray", "fastapi", "starlette", "serve.app"),
}
"""Third-party packages a layer must not import: the engine and the domain know nothing of Ray or HTTP."""


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that ``name`` imports, anywhere in its body (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in known and t != name}


def all_imports() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def external_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_no_import_cycles():
    graph = all_imports()
    # a package's __init__ importing its own modules is no cycle of the modules themselves
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def layer_of(name: str) -> str | None:
    return next((layer for layer in LAYERS if name == layer or name.startswith(layer + ".")), None)


def test_layers_import_downward_only():
    wrong = []
    for name, targets in all_imports().items():
        layer = layer_of(name)
        if layer is None:
            continue
        allowed = LAYERS[layer]
        for target in targets:
            tool = target.startswith(("bench", "eval"))  # the product never depends on its tools
            if tool or (target.startswith("serve") and target != "serve" and layer_of(target) not in allowed):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_know_nothing_of_ray_or_http(layer):
    wrong = []
    for name, path in modules().items():
        if layer_of(name) != layer:
            continue
        for imported in external_imports(path):
            if any(imported == f or imported.startswith(f + ".") for f in FORBIDDEN[layer]):
                wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


def test_modules_stay_readable():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_results_hold_no_code():
    code = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "results").rglob("*.py"))
    assert not code, code
