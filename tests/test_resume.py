"""A run stopped at any update and resumed ends bit-identical to the uninterrupted run, with the same logs.

The runs follow a cosine schedule (2 warmup updates, then decay to 0.1 x lr), so every resume lands mid-schedule.

The tiny run: 18 training examples, batch 4 (4 batches an epoch, 2 examples dropped), 2 epochs = 8 updates, eval and step-N
checkpoint every 8 examples, sampling during eval (so the restored RNG shows in samples.jsonl). Runs stop early through
`max_updates_this_run`, the option users have for job time limits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import sft_train
from tests.test_schedule import expected as expected_lr
from tests.tiny import tiny_data, tiny_model_dir, tiny_run_args
from training import checkpoint as ckpt

TIMING = ("per_second", "memory", "mfu", "time")  # keys whose values depend on the machine, not on the training


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = tiny_model_dir(root / "model")
    train, test = tiny_data(root, n_train=18, n_test=8)
    return root, model, train, test


def args(tiny, run_dir: Path | None, **overrides) -> list[str]:
    root, model, train, test = tiny
    settings = dict(run_dir=run_dir, batch_size=4, n_epochs=2, eval_every=8, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1,
                    sample_during_eval=True, n_eval_model_samples=2, max_new_tokens=2, n_eval_examples=8)
    return tiny_run_args(root, model, train, test, **{**settings, **overrides})


@pytest.fixture(scope="module")
def full(tiny) -> Path:
    run_dir = tiny[0] / "full"
    sft_train.main(args(tiny, run_dir))
    return run_dir


def log(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
    return [{k: v for k, v in row.items() if not any(t in k for t in TIMING)} for row in rows]


def assert_same_run(run_dir: Path, full: Path) -> None:
    """Weights and optimizer state bit-identical; metrics and samples the same records in the same order."""
    for name in ("policy.pt", "optimizer.pt", "scheduler.pt"):
        a, b = ckpt.load_archive(run_dir / "LATEST" / name), ckpt.load_archive(full / "LATEST" / name)
        assert a["step_idx"] == b["step_idx"] == 32
        assert_equal(a["state"], b["state"], name)
    assert log(run_dir) == log(full)
    assert log(run_dir, "samples.jsonl") == log(full, "samples.jsonl")


def assert_equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def updates_logged(run_dir: Path) -> list[int]:
    return [r["counters/updates"] for r in log(run_dir) if "counters/updates" in r]


def test_full_run_shape(full):
    """The reference points the other tests rely on: 8 updates, evals at 0, 8, 16, 24, 32, samples at each eval."""
    assert updates_logged(full) == list(range(1, 9))
    lrs = [r["lr"] for r in log(full) if "lr" in r]
    assert lrs == pytest.approx([1e-3 * expected_lr("cosine", k, 2, 8, 0.1) for k in range(8)], rel=1e-12)
    assert [r["examples_seen"] for r in log(full) if "loss/eval" in r] == [0, 8, 16, 24, 32]
    assert sorted(p.name for p in full.glob("step-*")) == ["step-16", "step-24", "step-8"]
    assert len(log(full, "samples.jsonl")) == 10


def test_chunked_run_through_saved_config(tiny, full):
    """max_updates_this_run=3 three times over (stops at 12 and 24, inside epochs 0 and 1), each continuation being the
    command the run prints: the saved config.yaml as the recipe plus resume_from=auto. keep_last=2 prunes step dirs."""
    run_dir = tiny[0] / "chunked"
    sft_train.main(args(tiny, run_dir, max_updates_this_run=3, keep_last=2))
    assert updates_logged(run_dir) == [1, 2, 3]
    assert ckpt.load_archive(run_dir / "LATEST" / "policy.pt")["step_idx"] == 12
    again = [str(run_dir / "config.yaml"), f"run_dir={run_dir}", "resume_from=auto"]
    sft_train.main(again)
    assert updates_logged(run_dir) == [1, 2, 3, 4, 5, 6]
    state = ckpt.load_file(run_dir / "LATEST" / "train_state.pt")
    assert (state["examples_seen"], state["epoch"], state["offset"]) == (24, 1, 8)
    sft_train.main(again)
    assert_same_run(run_dir, full)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(("step-", "."))) == ["step-16", "step-24"]


def test_resume_in_second_epoch_from_latest_path(tiny, full):
    run_dir = tiny[0] / "second-epoch"
    sft_train.main(args(tiny, run_dir, max_updates_this_run=5))
    state = ckpt.load_file(run_dir / "LATEST" / "train_state.pt")
    assert (state["examples_seen"], state["updates"], state["epoch"], state["offset"]) == (20, 5, 1, 4)
    sft_train.main(args(tiny, None, resume_from=run_dir / "LATEST"))  # no run_dir: the checkpoint's run continues
    assert_same_run(run_dir, full)


def test_resume_from_step_dir_rewinds_logs(tiny, full):
    """Resuming an older step-N of a run that went further: the logs are cut back to that checkpoint, so the steps trained
    again appear once (and the end state equals the uninterrupted run). step-16 sits at the end of epoch 0."""
    run_dir = tiny[0] / "rewound"
    shutil.copytree(full, run_dir)
    assert len(log(run_dir)) > 12
    sft_train.main(args(tiny, run_dir, resume_from=run_dir / "step-16"))
    assert_same_run(run_dir, full)


def fake_checkpoint(run_dir: Path, name: str, step: int) -> Path:
    train_state = {"examples_seen": step, "updates": step // 4, "epoch": 0, "offset": step, "rng": {}}
    return ckpt.write_checkpoint(run_dir, name, step, {"w": torch.full((2,), float(step))}, {}, {}, train_state, {})


def test_auto_picks_newest_complete_checkpoint(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_resume("auto", tmp_path)
    fake_checkpoint(tmp_path, "step-8", 8)
    fake_checkpoint(tmp_path, "LATEST", 12)  # e.g. saved on SIGTERM
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "LATEST"
    fake_checkpoint(tmp_path, "step-16", 16)
    (tmp_path / ".tmp-step-24").mkdir()  # a write killed half-way
    (tmp_path / ".tmp-step-24" / "policy.pt").write_bytes(b"partial")
    (tmp_path / "step-32").mkdir()  # not written by us: no marker
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step-16"
    # same examples seen: the one written later wins (step-16 after the eval that followed a SIGTERM'd LATEST at 16)
    fake_checkpoint(tmp_path, "LATEST", 16)
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "LATEST"
    fake_checkpoint(tmp_path, "step-16", 16)
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step-16"
    with pytest.raises(ckpt.CheckpointError, match="step-32 is not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "step-32"), tmp_path)


def test_keep_last_prunes_oldest_step_dirs(tmp_path):
    for step in (8, 16, 24, 32):
        fake_checkpoint(tmp_path, f"step-{step}", step)
        ckpt.prune(tmp_path, 2)
    fake_checkpoint(tmp_path, "LATEST", 40)
    ckpt.prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-24", "step-32"]


def test_resume_warns_that_a_new_lr_is_ignored(tiny, full, tmp_path, caplog):
    run_dir = tmp_path / "copy"
    shutil.copytree(full, run_dir)
    with caplog.at_level("WARNING", logger="sft"):
        sft_train.main(args(tiny, run_dir, resume_from=str(run_dir / "step-16"), lr=0.5, min_lr_ratio=0.5))
    assert any("lr=0.5 is ignored" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage() == "lr schedule cosine, warmup 2 of 8 updates, down to 0.5 x lr is ignored: the resumed run "
               "continues the checkpoint's (cosine, warmup 2 of 8 updates, down to 0.1 x lr)" for r in caplog.records)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["examples_seen"] == 32
