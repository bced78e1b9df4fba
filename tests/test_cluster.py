"""Cluster life in one process: SIGUSR1 and a save timer, a continue command that names the launcher, a stop request that
lands on the last update, one wandb run across resumes. (The multi-process parts are in tests/test_distributed.py.)"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import sft_train
import training.loop
from tests.tiny import tiny_data, tiny_model_dir, tiny_run_args
from training.logger import MetricsLogger
from training.loop import StopRequested, continue_command, restored_signal_handlers

ONE = SimpleNamespace(num_processes=1, is_main_process=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    return root, tiny_model_dir(root / "model"), *tiny_data(root, n_train=16, n_test=4)


def args(tiny, run_dir: Path, **overrides) -> list[str]:
    root, model, train, test = tiny
    return tiny_run_args(root, model, train, test, run_dir=run_dir, **{"eval_every": 8, **overrides})  # 4 updates


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigusr1_asks_for_the_same_stop_as_sigterm():
    with restored_signal_handlers():
        stop = StopRequested()
        assert stop.after_update(ONE) == (False, False)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signal == signal.SIGUSR1 and stop.after_update(ONE) == (True, False)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # given back


def test_save_timer_writes_latest_between_checkpoints_and_the_run_goes_on(tiny, monkeypatch):
    names = []
    save = training.loop.save
    monkeypatch.setattr(training.loop, "save", lambda *a: names.append(a[-1]) or save(*a))
    run_dir = sft_train.main(args(tiny, tiny[0] / "timer", save_every_minutes=1e-9))  # due after every update
    # step-8 restarts the timer too; the last update is followed by the final LATEST only
    assert names == ["LATEST", "step-8", "LATEST", "LATEST"]
    assert [m["examples_seen"] for m in metrics(run_dir) if "counters/updates" in m] == [4, 8, 12, 16]


def test_a_stop_request_on_the_last_update_finishes_the_run(tiny):
    run_dir = sft_train.main(args(tiny, tiny[0] / "last", max_updates_this_run=4))  # the run has exactly 4 updates
    evals = [m["examples_seen"] for m in metrics(run_dir) if "loss/eval" in m]
    assert evals == [0, 8, 16]  # the final eval ran: the run finished instead of stopping
    assert (run_dir / "loss.png").is_file()  # and the end-of-run plots were drawn


def test_continue_command_repeats_the_launcher_with_its_options(monkeypatch, tmp_path):
    run_dir = tmp_path / "my runs" / "x"
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert continue_command("sft_train.py", run_dir) == \
        f"python sft_train.py '{run_dir}/config.yaml' 'run_dir={run_dir}' resume_from=auto"
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(sys, "argv", ["/home/u/suite/sft_train.py", "recipes/llama7b_hh.yaml", "lr=1e-6"])
    launcher = ["/venv/bin/python3", "/venv/bin/accelerate", "launch", "--config_file", "accelerate_configs/fsdp_8gpu.yaml",
                "--main_process_port", "29501", "sft_train.py", "recipes/llama7b_hh.yaml", "lr=1e-6"]
    assert continue_command("sft_train.py", run_dir, launcher) == (
        "accelerate launch --config_file accelerate_configs/fsdp_8gpu.yaml --main_process_port 29501 sft_train.py "
        f"'{run_dir}/config.yaml' 'run_dir={run_dir}' resume_from=auto")
    torchrun = ["/venv/bin/python", "-m", "torch.distributed.run", "--nproc_per_node", "8", "sft_train.py", "recipes/x.yaml"]
    assert continue_command("sft_train.py", run_dir, torchrun).startswith(
        "/venv/bin/python -m torch.distributed.run --nproc_per_node 8 sft_train.py ")


class FakeRun:
    def __init__(self, resumed: bool, step: int):
        self.resumed, self.step, self.logged = resumed, step, []

    def log(self, metrics, step):
        self.logged.append(step)


def test_one_wandb_run_per_training_run(monkeypatch, tmp_path):
    calls = []
    fake = SimpleNamespace(util=SimpleNamespace(generate_id=lambda: f"id{len(calls)}"),
                           init=lambda **kw: calls.append(kw) or FakeRun(resumed=len(calls) > 1, step=13))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = training.loop.Config(exp_name="x")
    accelerator = SimpleNamespace(is_main_process=True)
    training.loop.start_wandb(config, tmp_path, accelerator)
    training.loop.start_wandb(config, tmp_path, accelerator)  # a resume into the same run dir
    assert [(c["id"], c["resume"]) for c in calls] == [("id0", "allow"), ("id0", "allow")]
    assert (tmp_path / "wandb_id").read_text() == "id0"
    # the resumed wandb run already has the steps up to 12; the resumed training repeats 8 and 12 and goes on
    run = FakeRun(resumed=True, step=13)
    logger = MetricsLogger(tmp_path, run, min_interval=0)
    for step in (8, 12, 16):
        logger.log({"loss/train": 1.0}, step)
    assert run.logged == [16]


def descendants(root: int) -> list[int]:
    """Pids of all processes below `root` (torchrun starts the training processes in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.slow
def test_sigusr1_under_accelerate_launch_saves_exits_0_and_prints_the_launch_command(tiny):
    """SLURM's --signal=USR1@600 reaches every process of the step. The launcher runs with USR1 ignored (the README's
    `trap '' USR1; exec accelerate launch ...`); the 2 training processes stop, save LATEST and exit 0, and so does it."""
    import shlex
    import subprocess
    import time

    from tests.tiny import REPO
    from training import checkpoint as ckpt

    run_dir = tiny[0] / "usr1"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml"]
    cli = [*launcher, "sft_train.py", *args(tiny, run_dir, n_epochs=50, eval_every=10_000, do_first_eval=False)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    with open(tiny[0] / "usr1.out", "w") as out:
        proc = subprocess.Popen(cli, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tiny[0] / "usr1.out").read_text()[-3000:]
            time.sleep(0.05)
        for pid in [proc.pid, *descendants(proc.pid)]:  # every process of the step, as slurmstepd signals them
            os.kill(pid, signal.SIGUSR1)
        assert proc.wait(120) == 0, (tiny[0] / "usr1.out").read_text()[-3000:]
    output = (tiny[0] / "usr1.out").read_text()
    assert "received SIGUSR1" in output
    (line,) = [x for x in output.splitlines() if "continue with: " in x]
    stopped = int(line.split("stopped at ")[1].split()[0])
    assert 0 < stopped < 200 and ckpt.load_archive(run_dir / "LATEST" / "policy.pt")["step_idx"] == stopped
    assert shlex.split(line.split("continue with: ")[1]) == \
        [*launcher, "sft_train.py", f"{run_dir}/config.yaml", f"run_dir={run_dir}", "resume_from=auto"]
