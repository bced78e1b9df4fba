"""The packages stay layered: training/ is the base (config, checkpoints, loop, distributed), data/ and modeling/ build on
it and not on each other, and only the entry scripts combine all three; no two project files import each other, directly or
through others. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> modules it must not import (a module forbids its submodules too). Plots are drawn by the scripts, not by export.
FORBIDDEN = {"training": {"data", "modeling"}, "data": {"modeling"}, "modeling": {"data", "training.plots"}}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(module, line) of every import in the file, wherever it stands; `from a import b` counts as a and a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name, node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {(node.module, node.lineno)} | {(f"{node.module}.{alias.name}", node.lineno) for alias in node.names}
    return found


def forbidden(module: str, package: str) -> bool:
    return any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[package])


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_the_layers_below(package):
    offenders = [f"{path.relative_to(REPO)}:{line} imports {name}"
                 for path in sorted((REPO / package).rglob("*.py"))
                 for name, line in sorted(imported_packages(path)) if forbidden(name, package)]
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_function_local_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from modeling.load import load_model\n    import data.records\n    from training import plots\n")
    assert imported_packages(source) == {("modeling.load", 2), ("modeling.load.load_model", 2), ("data.records", 3),
                                         ("training", 4), ("training.plots", 4)}
    assert forbidden("training.plots", "modeling") and not forbidden("training.plotsx", "modeling")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every project module outside tests/ (packages by their __init__.py)."""
    files = [p for p in REPO.glob("*.py")] + [p for d in ("training", "data", "modeling", "benchmarks") for p in (REPO / d).rglob("*.py")]
    names = {}
    for path in files:
        parts = path.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def runtime_imports(path: Path) -> set[str]:
    """The modules of every import that runs (module level or inside functions), leaving out `if TYPE_CHECKING:` blocks,
    which only type checkers read (data/hh.py's Record annotation from data/records.py)."""
    found = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update({node.module} | {f"{node.module}.{alias.name}" for alias in node.names})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports when it runs (`from a import b` counts a.b when it is a module, else a)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in runtime_imports(path):
            # `from a import b` yields both a and a.b: keep a.b if it is a module (then a is only its package)
            if imported in modules:
                targets.add(imported)
        for imported in list(targets):
            if any(other.startswith(imported + ".") for other in targets) and (REPO / imported.replace(".", "/") / "__init__.py").is_file():
                targets.discard(imported)  # the package of a submodule imported from it: its __init__ is not the target
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a, b, ..., a) if there is any."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_project_files():
    cycle = find_cycle(import_graph(project_modules()))
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle_through_a_function_local_import(tmp_path):
    graph = {"modeling.loss": {"modeling.compile"}, "modeling.compile": {"training.adapters"}, "training.adapters": set()}
    assert find_cycle(graph) is None
    graph["training.adapters"] = {"modeling.loss"}
    assert find_cycle(graph) == ["modeling.compile", "training.adapters", "modeling.loss", "modeling.compile"]
    source = tmp_path / "x.py"
    source.write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from data.records import Record\n\n"
                      "def f():\n    from training.config import Config\n")
    assert runtime_imports(source) == {"typing", "typing.TYPE_CHECKING", "training.config", "training.config.Config"}


def test_config_knows_exactly_the_dataset_loaders():
    from data.records import LOADERS
    from training.checks import DATASET_NAMES

    assert tuple(LOADERS) == DATASET_NAMES


def module_files() -> dict[str, Path]:
    """Dotted name -> file of every module of the three packages and of the top-level scripts."""
    files = {path.stem: path for path in REPO.glob("*.py")}
    for package in FORBIDDEN:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def runtime_imports(path: Path) -> set[str]:
    """The modules the file imports when it runs (also inside functions), leaving out `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def import_cycles() -> list[list[str]]:
    """The groups of modules that import each other in a circle when they run, each sorted."""
    files = module_files()
    graph = {name: {module for module in runtime_imports(path) if module in files and module != name}
             for name, path in files.items()}
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for other in graph[name]:
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            component = []
            while not component or component[-1] != name:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return cycles


def test_no_import_cycle_between_files():
    assert import_cycles() == []


def test_the_cycle_check_sees_function_local_imports(tmp_path, monkeypatch):
    (tmp_path / "modeling").mkdir()
    (tmp_path / "modeling" / "a.py").write_text("from modeling.b import f\n")
    (tmp_path / "modeling" / "b.py").write_text("def f():\n    from modeling import a\n")
    (tmp_path / "modeling" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from modeling.a import x\n")
    (tmp_path / "modeling" / "d.py").write_text("from modeling.c import y\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert import_cycles() == [["modeling.a", "modeling.b"]]
