"""Checkpoints survive kill -9 at any moment, SIGTERM stops cleanly with a working resume command, and bad files are refused.

The kill tests fork a training process whose checkpoint writer blocks at a chosen point (a hook installed in the child by
this file; the product has no test switches), kill -9 it there, and resume. The SIGTERM test runs the real command line.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sft_train
from tests.tiny import REPO, tiny_data, tiny_model_dir, tiny_run_args
from training import checkpoint as ckpt

def blocking_run(point: str, sentinel: Path, argv: list[str]) -> None:
    """Forked child: train, but block forever at `point` of a checkpoint write (after writing `sentinel`)."""
    def block():
        sentinel.write_text(point)
        time.sleep(600)

    if point == "between-renames":  # LATEST moved aside, the new one not yet renamed into place
        rename = os.rename

        def hooked_rename(src, dst):
            rename(src, dst)
            if Path(dst).name == ".old-LATEST":
                block()
        os.rename = hooked_rename
    elif point == "mid-write":  # step-16's temporary directory holds policy.pt only
        save_file = ckpt.save_file

        def hooked_save_file(obj, path):
            save_file(obj, path)
            if Path(path).parent.name == ".tmp-step-16" and Path(path).name == "policy.pt":
                block()
        ckpt.save_file = hooked_save_file
    sft_train.main(argv)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    model = tiny_model_dir(root / "model")
    train, test = tiny_data(root, n_train=18, n_test=8)
    return root, model, train, test


def args(tiny, run_dir: Path, **overrides) -> list[str]:
    root, model, train, test = tiny
    return tiny_run_args(root, model, train, test, run_dir=run_dir, **{"batch_size": 4, "n_epochs": 2, "eval_every": 8, **overrides})


@pytest.fixture(scope="module")
def full(tiny) -> Path:
    run_dir = tiny[0] / "full"
    sft_train.main(args(tiny, run_dir))
    return run_dir


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "COLUMNS": "300"}


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "per_second" not in k and "memory" not in k and "mfu" not in k} for r in rows]


def assert_same_end(run_dir: Path, full: Path) -> None:
    a = ckpt.load_archive(run_dir / "LATEST" / "policy.pt")["state"]
    b = ckpt.load_archive(full / "LATEST" / "policy.pt")["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(run_dir) == metrics(full)
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no .tmp-/.old-/.del- left behind


@pytest.mark.slow
@pytest.mark.parametrize("point", ["between-renames", "mid-write"])
def test_kill_9_while_writing_a_checkpoint(tiny, full, point):
    run_dir = tiny[0] / point
    sft_train.main(args(tiny, run_dir, max_updates_this_run=2))  # LATEST at 8 examples
    sentinel = tiny[0] / f"{point}.blocked"
    child = multiprocessing.get_context("fork").Process(target=blocking_run, args=(point, sentinel, args(tiny, run_dir, resume_from="auto")))
    child.start()
    deadline = time.monotonic() + 120
    while not sentinel.exists():
        assert child.exitcode is None, "the training process ended before the checkpoint write"
        assert time.monotonic() < deadline, "the run never reached the checkpoint write"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL

    if point == "between-renames":
        assert not (run_dir / "LATEST").exists() and ckpt.is_complete(run_dir / ".old-LATEST")
        ckpt.recover(run_dir)  # what the next run does first
        assert ckpt.load_archive(run_dir / "LATEST" / "policy.pt")["step_idx"] == 8  # the previous LATEST, loadable
        assert ckpt.resolve_resume("auto", run_dir) == run_dir / "step-24"
    else:
        assert (run_dir / ".tmp-step-16" / "policy.pt").is_file() and not ckpt.is_complete(run_dir / ".tmp-step-16")
        assert not (run_dir / "step-16").exists()
        assert ckpt.load_archive(run_dir / "LATEST" / "policy.pt")["step_idx"] == 8
        assert ckpt.resolve_resume("auto", run_dir) == run_dir / "step-8"  # written after LATEST at the same step
    sft_train.main(args(tiny, run_dir, resume_from="auto"))
    assert_same_end(run_dir, full)


@pytest.mark.slow
def test_sigterm_saves_latest_and_the_printed_command_resumes(tiny):
    """The real CLI gets SIGTERM mid-run: it finishes the step, saves LATEST, exits 0 and prints a command that completes."""
    run_dir = tiny[0] / "sigterm"
    cli = args(tiny, run_dir, n_epochs=10, eval_every=10_000, do_first_eval=False)  # 40 updates, no evals in between
    with open(tiny[0] / "sigterm.out", "w") as out:
        proc = subprocess.Popen([sys.executable, "sft_train.py", *cli], cwd=REPO, env=subprocess_env(), stdout=out,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tiny[0] / "sigterm.out").read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    output = (tiny[0] / "sigterm.out").read_text()
    assert "received SIGTERM" in output
    (line,) = [x for x in output.splitlines() if "continue with: " in x]
    stopped = int(line.split("stopped at ")[1].split()[0])
    updates = [r["counters/updates"] for r in metrics(run_dir) if "counters/updates" in r]
    assert 0 < stopped < 160 and updates == list(range(1, stopped // 4 + 1))  # the step in flight was finished and logged
    assert ckpt.load_archive(run_dir / "LATEST" / "policy.pt")["step_idx"] == stopped
    command = shlex.split(line.split("continue with: ")[1])
    assert command[:2] == ["python", "sft_train.py"]
    sft_train.main(command[2:])
    updates = [r["counters/updates"] for r in metrics(run_dir) if "counters/updates" in r]
    assert updates == list(range(1, 41))
    assert ckpt.load_archive(run_dir / "LATEST" / "policy.pt")["step_idx"] == 160


class Foreign:
    """Unpickling this would create a directory: a stand-in for a malicious archive."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def bad_file(kind: str, good: Path, path: Path) -> Path:
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random-bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "foreign-pickle":
        torch.save({"step_idx": 0, "state": Foreign(path.parent / "pwned"), "metrics": {}}, path)
    elif kind == "not-an-archive":
        torch.save(torch.zeros(3), path)
    return path


BAD_KINDS = ["truncated", "random-bytes", "foreign-pickle", "not-an-archive"]


def test_checkpoint_files_load_with_weights_only(full):
    for name in ckpt.CHECKPOINT_FILES:
        torch.load(full / "LATEST" / name, weights_only=True)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_archive_is_refused_clearly(tiny, full, tmp_path, kind):
    archive = bad_file(kind, full / "LATEST" / "policy.pt", tmp_path / "policy.pt")
    with pytest.raises(ckpt.CheckpointError, match=str(archive)):
        sft_train.main(args(tiny, tmp_path / "run", model__archive=archive))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("name", ["policy.pt", "train_state.pt"])
def test_bad_checkpoint_file_is_refused_on_resume(tiny, full, tmp_path, kind, name):
    checkpoint = tmp_path / "LATEST"
    shutil.copytree(full / "LATEST", checkpoint)
    bad_file(kind, full / "LATEST" / name, checkpoint / name)
    with pytest.raises(ckpt.CheckpointError, match=str(checkpoint / name)):
        sft_train.main(args(tiny, tmp_path / "run", resume_from=checkpoint))
    assert not (tmp_path / "pwned").exists()
