"""setup.cfg declares compatible ranges (an install next to a CUDA torch keeps it); requirements.txt pins exact versions for
the offline demo and CI, each inside its range. It installs both entry scripts, what they import, and their console
scripts."""

import ast
import configparser
import importlib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def test_setup_ranges_contain_the_pins():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    requirements = [Requirement(line) for line in setup["options"]["install_requires"].strip().splitlines()]
    ranges = {r.name: r.specifier for r in requirements}
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            pins[requirement.name] = str(requirement.specifier).removeprefix("==")
    assert set(ranges) == set(pins)
    for name, spec in ranges.items():
        assert "==" not in str(spec) and spec.contains(pins[name]), (name, str(spec), pins[name])
        assert any(s.operator == "<" for s in spec), f"{name}: give an upper bound (the next major version)"


def setup() -> configparser.ConfigParser:
    parsed = configparser.ConfigParser()
    parsed.read(REPO / "setup.cfg")
    return parsed


def test_console_scripts_are_importable_callables():
    lines = setup()["options.entry_points"]["console_scripts"].strip().splitlines()
    scripts = dict(line.replace(" ", "").split("=") for line in lines)
    assert set(scripts) == {"sft-train", "dpo-train"}
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_every_top_level_module_the_scripts_import_is_installed():
    options = setup()["options"]
    modules = {m.strip() for m in options["py_modules"].split(",")}
    packages = {p.strip() for p in options["packages"].split(",")}
    top_level = {p.stem for p in REPO.glob("*.py")} | {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    wanted, seen = ["sft_train", "dpo_train"], set()
    while wanted:  # the scripts and every top-level module they reach
        name = wanted.pop()
        if name in seen:
            continue
        seen.add(name)
        if (REPO / f"{name}.py").is_file():
            wanted += sorted(top_level_imports(REPO / f"{name}.py") & top_level)
    assert seen & top_level <= modules | packages, sorted(seen & top_level - modules - packages)
    assert {"sft_train", "dpo_train", "stage"} <= modules
