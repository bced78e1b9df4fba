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
