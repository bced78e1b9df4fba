"""CPU thread settings: passive OpenMP waiting before torch loads, one thread for tiny CPU models unless the user chose."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from training.cpu_threads import SMALL_MODEL_PARAMETERS, cpu_threads_for, set_cpu_threads
REPO = Path(__file__).resolve().parents[1]

WATCH_TORCH_IMPORT = """
import os, sys
seen = {}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in seen:
            seen["torch"] = os.environ.get("OMP_WAIT_POLICY")
sys.meta_path.insert(0, Watch())
import sft_train, dpo_train
print("matplotlib" in sys.modules, seen["torch"])
"""


def test_entry_scripts_set_passive_waiting_before_torch_loads_and_leave_matplotlib_unloaded():
    """Also: importing the entry scripts does not load matplotlib (seconds of every run's start; plots import it)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", WATCH_TORCH_IMPORT], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split()[-2:] == ["False", "PASSIVE"]


def test_user_wait_policy_wins():
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", "import training.cpu_threads, os; print(os.environ['OMP_WAIT_POLICY'])"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_threads_by_model_size_unless_the_user_chose():
    assert cpu_threads_for(SMALL_MODEL_PARAMETERS - 1, {}) == 1
    assert cpu_threads_for(SMALL_MODEL_PARAMETERS, {}) is None
    assert cpu_threads_for(1000, {"OMP_NUM_THREADS": "2"}) is None


def test_set_cpu_threads_on_a_tiny_model(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert set_cpu_threads(torch.nn.Linear(10, 10), "cpu") == 1
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert set_cpu_threads(torch.nn.Linear(10, 10), "meta") is None  # not a CPU device: left alone
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_environment_is_read_at_the_call(monkeypatch):
    """datasets' map(num_proc=N) rebinds os.environ to a copy of itself: what a user unset afterwards must still count."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(os, "environ", os.environ.copy())
    del os.environ["OMP_NUM_THREADS"]
    assert cpu_threads_for(1000) == 1
