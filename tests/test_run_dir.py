"""A run directory belongs to one run: a finished run is never overwritten (not by a new run, not by its own config.yaml
used as a recipe), two live runs never share one, a resume cannot mix two runs, and resume_from=auto gets past a newest
checkpoint that does not load."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import sft_train
import stage
from tests.tiny import tiny_data, tiny_model_dir, tiny_run_args
from training import checkpoint as ckpt
from training.config import ConfigError
from training.rundir import LOCK, claim_run_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_dir")
    model = tiny_model_dir(root / "model")
    train, test = tiny_data(root, n_train=16, n_test=4)
    return root, model, train, test


def args(tiny, run_dir: Path, **overrides) -> list[str]:
    root, model, train, test = tiny
    return tiny_run_args(root, model, train, test, **{"run_dir": run_dir, "batch_size": 4, "eval_every": 8, **overrides})


@pytest.fixture(scope="module")
def finished(tiny) -> Path:
    """A finished run: step-8 and LATEST (16 examples, 4 updates)."""
    return sft_train.main(args(tiny, tiny[0] / "finished"))


def fingerprint(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_finished_run_is_never_overwritten(tiny, finished):
    before = fingerprint(finished)
    with pytest.raises(ConfigError, match=rf"run_dir {finished} already holds a run \(checkpoints LATEST, step-8\); continue "
                                          r"it with resume_from=auto, start over there with overwrite=true"):
        sft_train.main(args(tiny, finished, lr=5e-3))
    with pytest.raises(ConfigError, match="already holds a run"):  # its own config.yaml as a recipe, as the README shows
        sft_train.main([str(finished / "config.yaml")])
    assert fingerprint(finished) == before  # not a byte changed, no lock left
    assert yaml.safe_load((finished / "config.yaml").read_text())["overwrite"] is False


def test_overwrite_true_starts_over_without_mixing_logs(tiny, finished, capsys):
    run_dir = tiny[0] / "overwritten"
    shutil.copytree(finished, run_dir)
    (run_dir / "step-999").mkdir()  # a checkpoint of the earlier run that the new one would never replace
    sft_train.main(args(tiny, run_dir, overwrite=True, eval_every=16))
    out = capsys.readouterr().out  # what is running, then the summary
    assert "running single on 1 process (cpu); weights and optimizer state float32, compute float32; batch_size 4 = 4 per " \
           "device x 1 accumulation x 1 data-parallel" in out and f"run dir: {run_dir}" in out
    final = json.loads((run_dir / "LATEST" / "complete").read_text())["metrics"]["loss/eval"]
    assert f"done: 16 examples, 4 updates in " in out and f"final eval loss {final:.4f}" in out
    assert f"policy (the input of DPO): {run_dir}/LATEST/policy.pt" in out and f"plots:" in out and str(run_dir / "loss.png") in out
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["examples_seen"] for m in metrics if "loss/train" in m] == [4, 8, 12, 16]  # not appended to the old log
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix != ".png") == ["LATEST", "config.yaml", "metrics.jsonl"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["overwrite"] is False


def hold_and_try(run_dir: str, barrier, results) -> None:
    barrier.wait()
    try:
        claim_run_dir(run_dir, resuming=False, overwrite=False)
        results.put("claimed")
        barrier.wait()  # hold the lock until both have tried
    except ConfigError as e:
        results.put(str(e))
        barrier.wait()


def test_two_runs_started_at_once_into_one_dir_one_is_refused(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=hold_and_try, args=(str(tmp_path / "run"), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes[0] == "claimed" and "is in use by another run (pid" in outcomes[1]


def test_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": dead, "started": "earlier"}))
    with caplog.at_level(logging.WARNING):
        claim = claim_run_dir(run_dir, resuming=False, overwrite=False)
    assert f"taking over the stale lock {run_dir / LOCK} of pid {dead}" in caplog.text
    assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on"):
        claim_run_dir(run_dir, resuming=False, overwrite=False)
    claim.release()
    assert not (run_dir / LOCK).exists()


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 8, "eval_every": 8}, "batch_size: checkpoint 4, now 8"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps: checkpoint 1, now 2"),
    ({"seed": 1}, "seed: checkpoint 0, now 1"),
    ({"optimizer": "AdamW"}, "optimizer: checkpoint 'RMSprop', now 'AdamW'"),
    ({"max_length": 48}, "max_length: checkpoint 64, now 48"),
    ({"datasets": "[hh,shp]"}, "datasets: checkpoint ['hh'], now ['hh', 'shp']"),
])
def test_resume_refuses_settings_that_change_order_or_counters(tiny, finished, change, message, monkeypatch):
    monkeypatch.setattr(stage, "load_tokenizer", lambda *a: pytest.fail("refused only after loading the tokenizer"))
    before = fingerprint(finished)
    with pytest.raises(ConfigError) as e:
        sft_train.main(args(tiny, finished, resume_from="auto", **change))
    assert message in str(e.value) and "resume_force=true" in str(e.value)
    assert fingerprint(finished) == before


def test_resume_refuses_other_training_data_and_force_overrides(tiny, finished, caplog):
    run_dir = tiny[0] / "other-data"
    shutil.copytree(finished, run_dir)
    root, model, train, test = tiny
    changed = root / "train-changed.jsonl"
    lines = train.read_text().splitlines()
    changed.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same rows, another order
    with pytest.raises(ConfigError, match=r"the training data \(content hash \w{12} in the checkpoint, \w{12} now\)"):
        sft_train.main(args(tiny, run_dir, resume_from="auto", data_files__hh__train=changed))
    with caplog.at_level(logging.WARNING):
        sft_train.main(args(tiny, run_dir, resume_from="auto", data_files__hh__train=changed, resume_force=True))
    assert "resume_force=true: resuming" in caplog.text and "the training data" in caplog.text


def test_safe_changes_resume(tiny, finished):
    run_dir = tiny[0] / "safe"
    shutil.copytree(finished, run_dir)
    sft_train.main(args(tiny, run_dir, resume_from="auto", eval_every=12, minimum_log_interval_secs=5, keep_last=1))
    assert ckpt.load_train_state(run_dir / "LATEST" / "train_state.pt")["examples_seen"] == 16


def checkpoint(run_dir: Path, name: str, step: int) -> Path:
    state = {"examples_seen": step, "updates": step // 4, "epoch": 0, "offset": step, "rng": {}}
    return ckpt.write_checkpoint(run_dir, name, step, {"w": torch.zeros(2)}, {}, {}, state, {})


def test_auto_skips_a_newest_checkpoint_that_does_not_load(tmp_path, caplog):
    checkpoint(tmp_path, "step-8", 8)
    checkpoint(tmp_path, "step-16", 16)
    latest = checkpoint(tmp_path, "LATEST", 20)
    policy = latest / "policy.pt"
    policy.write_bytes(policy.read_bytes()[: policy.stat().st_size // 2])  # truncated, marker intact
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step-16"
    assert f"skipping {latest}, it does not load ({policy}" in caplog.text
    train_state = tmp_path / "step-16" / "train_state.pt"
    train_state.write_bytes(b"garbage")
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step-8"
    with pytest.raises(ckpt.CheckpointError, match=rf"resume_from: {latest} does not load"):
        ckpt.resolve_resume(str(latest), tmp_path)


def test_malformed_marker_of_an_older_checkpoint_does_not_block_latest(tmp_path, caplog):
    old = checkpoint(tmp_path, "step-8", 8)
    checkpoint(tmp_path, "LATEST", 16)
    (old / "complete").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "LATEST"
        assert ckpt.last_good_checkpoint(tmp_path) == tmp_path / "LATEST"
    assert f"malformed marker {old / 'complete'}" in caplog.text
