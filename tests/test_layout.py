"""The package layout as the code has it: every module imports, the import graph has no cycle, and
imports point only down the data flow (web -> acquire -> score -> policies, learners -> run ->
analysis -> cli). Imports inside functions count as much as those at the top: a lazy import that
closes a cycle is still a cycle for a reader.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("explorer", "policies", "learners")
# Lower layers first; a module may import its own layer or any layer before it.
LAYERS = ["explorer.web", "explorer.acquire", "explorer.score", "learners", "policies", "explorer.run",
          "explorer.analysis", "explorer.cli", "explorer.__main__"]


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports: for `from a.b import c`, a.b.c when c is a module, else a.b."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            submodules = {f"{module}.{alias.name}" for alias in node.names} & known
            out |= submodules
            if len(submodules) < len(node.names) and module in known:
                out.add(module)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def layer(name: str) -> int | None:
    matches = [i for i, prefix in enumerate(LAYERS) if name == prefix or name.startswith(prefix + ".")]
    return matches[-1] if matches else None


def test_every_module_imports():
    for name in module_files():
        importlib.import_module(name)


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_imports_point_down_the_flow():
    wrong = [f"{a} ({LAYERS[layer(a)]}) imports {b} ({LAYERS[layer(b)]})"
             for a, targets in import_graph().items() for b in targets
             if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_the_cli():
    """The CLI is reached through its entry points (`explorer`, `python -m explorer`, which is
    explorer/__main__.py, `python -m explorer.cli`, `main([...])`)."""
    assert sorted(a for a, targets in import_graph().items() if "explorer.cli" in targets) == ["explorer.__main__"]


def test_every_module_has_a_layer():
    assert [name for name in module_files() if layer(name) is None and name not in PACKAGES] == []


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_find_cycle_finds_a_cycle_and_only_a_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def missing_names(path: Path) -> list[str]:
    """`from PROJECT_MODULE import name` statements of `path`, at any depth, whose name the module
    does not define (nor is a submodule of it)."""
    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module \
                and node.module.split(".")[0] in (*PACKAGES, "bench"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                is_package = hasattr(module, "__path__")
                if not hasattr(module, alias.name) and not (
                        is_package and importlib.util.find_spec(f"{node.module}.{alias.name}")):
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{alias.name}")
    return missing


def test_every_imported_name_exists_in_code_and_benchmarks():
    """A benchmark's lazy `from explorer... import name` breaks only when it runs: a name renamed
    in the package is caught here instead (bench/ has no run in the suite for most scripts)."""
    import sys

    sys.path.insert(0, str(ROOT))
    paths = [*module_files().values(), *sorted((ROOT / "bench").glob("*.py"))]
    assert [m for path in paths for m in missing_names(path)] == []
