"""setup.cfg declares compatible ranges (an install next to a CUDA torch keeps it); requirements.txt pins exact versions for
the offline demo and CI, each inside its range."""

import configparser
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
