"""The packages stay layered: training/ is the base (config, checkpoints, loop, distributed), data/ and modeling/ build on
it and not on each other, and only the entry scripts combine all three. Imports inside functions count too."""

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


def test_config_knows_exactly_the_dataset_loaders():
    from data.records import LOADERS
    from training.config import DATASET_NAMES

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
