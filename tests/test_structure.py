"""The package's structure as DESIGN.md states it, checked on the source: no import circles, metrics never import
model, data or extraction code, and no module imports another package's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mimprobe"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, tuple[str, ...], int]]:
    """(imported module, names, line) of every import in a file, top-level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = tuple(alias.name for alias in node.names)
            if module.startswith("mimprobe"):
                # `from . import knn` imports a module: record it as such
                modules = [f"{module}.{n}" for n in names if (PACKAGE.parent / f"{module}.{n}".replace(".", "/")
                                                               ).with_suffix(".py").exists()]
                found += [(m, (), node.lineno) for m in modules] or [(module, names, node.lineno)]
        elif isinstance(node, ast.Import):
            found += [(alias.name, (), node.lineno) for alias in node.names if alias.name.startswith("mimprobe")]
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        graph[_module_name(path)] = {module for module, _, _ in _imports(path)}
    return graph


def _package_of(module: str) -> str:
    """The top-level sub-package (``mimprobe.metrics``), or the module itself for top-level modules."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Module edges, with imports of a package's ``__init__`` (its re-exports) left out: a module importing its
    own package's public names is not a circle of code."""
    return {module: {target for target in targets if not (PACKAGE.parent / target.replace(".", "/") / "__init__.py"
                                                           ).exists()}
            for module, targets in graph.items()}


def test_no_module_import_circles():
    assert _cycles(_without_package_inits(_graph())) == []


def test_no_package_import_circles():
    packages: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        packages.setdefault(_package_of(module), set()).update(
            _package_of(target) for target in targets if _package_of(target) != _package_of(module))
    assert _cycles(packages) == []


@pytest.mark.parametrize("forbidden", ["mimprobe.models", "mimprobe.data", "mimprobe.features.extraction",
                                       "mimprobe.pipeline", "mimprobe.refinement", "mimprobe.pretrain"])
def test_metrics_never_import_models_data_or_extraction(forbidden):
    offenders = [(module, target) for module, targets in _graph().items() if module.startswith("mimprobe.metrics")
                 for target in targets if target == forbidden or target.startswith(forbidden + ".")]
    assert offenders == []


def test_no_private_names_across_packages():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        here = _package_of(_module_name(path))
        for module, names, line in _imports(path):
            there = _package_of(module)
            if there == here or there in ("mimprobe._threads", "mimprobe._device", "mimprobe._lock", "mimprobe._disk", "mimprobe._run_folder",
                                          "mimprobe._lazy",
                                          "mimprobe._messages", "mimprobe._ranks", "mimprobe._versions"):
                continue  # a package's own private modules; the top-level support modules are shared by design
            private_module = any(part.startswith("_") and part != "__init__" for part in module.split(".")[1:])
            private_names = [name for name in names if name.startswith("_") and not name.startswith("__")]
            if private_module or private_names:
                offenders.append(f"{_module_name(path)}:{line} imports {module} {private_names or ''}")
    assert offenders == []


def test_the_checks_can_fail(tmp_path):
    """The cycle finder finds a planted circle and the import reader resolves relative imports."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    imports = _imports(PACKAGE / "metrics" / "profile.py")
    assert any(module == "mimprobe.features.store" for module, _, _ in imports)
