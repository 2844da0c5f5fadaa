"""The house's layout, kept by CI: layers that import only downwards, no
circles, Flower only at the edge, and the loss written in one place.

Imports are read from the source (every ``import`` statement, inside
functions and under ``TYPE_CHECKING`` too), so a lazy import cannot hide an
arrow that runs up the house.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedtrain"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundations", (
        "fedtrain.types", "fedtrain.errors", "fedtrain.config", "fedtrain.arguments", "fedtrain.layout",
        "fedtrain.validation", "fedtrain.plugin", "fedtrain.deadline", "fedtrain.aggregation",
        "fedtrain.strategy", "fedtrain.checkpoint", "fedtrain.results", "fedtrain.curves",
        "fedtrain.progress", "fedtrain.certs", "fedtrain.models", "fedtrain.huggingface", "fedtrain.metrics",
        "fedtrain.comparison", "fedtrain.sweep", "fedtrain.tensorboard_log",
        "fedtrain.compression", "fedtrain.clock",
    )),
    ("data", ("fedtrain.data",)),
    ("privacy", ("fedtrain.privacy", "fedtrain.sampling")),  # secret sampling draws from the keystream
    ("training", ("fedtrain.training",)),
    ("secure", ("fedtrain.secure",)),
    ("transport", ("fedtrain.transport",)),
    ("engine", ("fedtrain.engine", "fedtrain.buffered")),
    ("run builder", ("fedtrain.run",)),
    ("entry", ("fedtrain.simulation", "fedtrain.deploy", "fedtrain.cli", "fedtrain.audit")),
)
"""Lowest first; a module may import its own layer and those listed before it."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports (absolute names; relative ones resolved;
    ``from package import submodule`` counts as importing the submodule)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = {f"{base}.{alias.name}" for alias in node.names}
            submodules = {n for n in names if (PACKAGE.parent / n.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / n.replace(".", "/") / "__init__.py").exists()}
            found.update(submodules or {base})
    return found


def _layer(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in _modules() if m != "fedtrain" and _layer(m) is None]

    assert not unplaced, f"add these modules to a layer in LAYERS: {unplaced}"


def test_no_module_imports_from_a_higher_layer() -> None:
    upward = []
    for module, targets in _graph().items():
        if module == "fedtrain":  # the package's lazy public API re-exports from below
            continue
        for target in sorted(targets):
            if target != "fedtrain" and _layer(target) > _layer(module):  # type: ignore[operator]
                upward.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} "  # type: ignore[index]
                              f"({LAYERS[_layer(target)][0]})")  # type: ignore[index]

    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circles() -> None:
    graph = {m: {t for t in ts if t != "fedtrain"} for m, ts in _graph().items() if m != "fedtrain"}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)

    assert not circles, f"import circles: {circles}"


def test_flower_is_imported_only_at_the_edge() -> None:
    outside = [name for name, path in _modules().items()
               if any(m == "flwr" or m.startswith("flwr.") for m in _imports(path, name))
               and not any(word in name for word in ("transport", "deploy", "flower"))]

    assert not outside, f"flwr imported outside transport / deploy: {outside}"


def test_cross_entropy_is_written_in_at_most_two_modules() -> None:
    users = [name for name, path in _modules().items() if "cross_entropy" in path.read_text()]

    assert len(users) <= 2, f"cross_entropy written in {users}"


@pytest.mark.parametrize("module", ["fedtrain.transport.relay"])
def test_the_relay_stays_light(module: str) -> None:
    heavy = {"torch", "fedtrain.training", "fedtrain.engine"}
    imported = _imports(_modules()[module], module)

    assert not {m for m in imported if any(m == h or m.startswith(h + ".") for h in heavy)}
