"""Tests run offline, on CPU, without wandb; shared fixtures for real data and tiny models."""

import os

for var, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "OMP_NUM_THREADS": "1",  # tiny models: one thread is as fast and avoids oversubscription
    "TOKENIZERS_PARALLELISM": "false",
    # compile=true tests on CPU: inductor's kernels as scalar C++ (no at::vec templates), compiled in this process (no pool
    # of compile workers, each importing torch). g++ then takes a third of the time per kernel; what the tests check
    # (graphs, breaks, recompiles, compiled == eager losses and gradients) does not depend on the vector width.
    "TORCHINDUCTOR_VEC_ISA_OK": "0",
    "TORCHINDUCTOR_COMPILE_THREADS": "1",
}.items():
    os.environ.setdefault(var, value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HH_ROWS = SHARED / "data" / "hh" / "harmless-base-test-300.jsonl.gz"
REFERENCE = SHARED / "data" / "reference"


@pytest.fixture
def hh_rows_path() -> Path:
    if not HH_ROWS.is_file():
        pytest.skip(f"real HH rows not available at {HH_ROWS}")
    return HH_ROWS


@pytest.fixture
def reference_dir() -> Path:
    if not (REFERENCE / "tiny-gpt2").is_dir():
        pytest.skip(f"reference outputs not available at {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """The 2-layer Llama checkpoint of the multi-process tests (tests/test_distributed.py make_tiny_llama), made once; runs
    only read it."""
    from tests.test_distributed import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def dist_runs(tmp_path_factory, tiny_llama) -> dict:
    """The 1-process run of tests/test_distributed.py's recipe, which the 2-process, resumed and compiled runs are compared
    with; made once per session (tests only read it)."""
    from tests.test_distributed import launch

    tmp = tmp_path_factory.mktemp("runs")
    return {"tmp": tmp, "model": tiny_llama, "1proc": launch(tmp, tmp / "1proc", tiny_llama, "1proc")}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (setup.cfg: -n 2 --dist loadgroup) a module- or session-scoped fixture is built once per worker
    that runs a test needing it. The tests sharing an expensive one therefore go to one worker: those of dist_runs (the
    1-process baseline run) together, those of a module fixture (a run several tests read) with their module. tiny_llama
    (a second to write) may be made once per worker."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        scopes = {fdefs[-1].scope for name in item.fixturenames if (fdefs := info.name2fixturedefs.get(name))
                  and fdefs[-1].baseid.startswith("tests")}
        if "dist_runs" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("dist_runs"))
        elif "module" in scopes:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
