"""A checkpoint write that fails half-way (disk full) is one line naming the file, the reason and the intact previous
checkpoint; it exits 2, leaves no partial checkpoint and the run resumes from the previous one once there is space again.
One process (torch.save of policy.pt), FSDP2 on 2 processes (torch.distributed.checkpoint shards of process 1) and the
main process's background writer of policy.pt (its failure stops every process)."""

from __future__ import annotations

import errno

import pytest
import torch

import sft_train
from tests.full_disk import FullDisk
from tests.test_distributed import FORCED, make_tiny_llama, recipe, run_forked
from tests.tiny import tiny_data, tiny_model_dir, tiny_run_args
from training import checkpoint as ckpt
from training.cli import run_main


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_torch_save_into_a_full_disk_is_one_line_and_the_previous_checkpoint_resumes(tmp_path, monkeypatch, capsys):
    model = tiny_model_dir(tmp_path / "model")
    train, test = tiny_data(tmp_path, n_train=18, n_test=8)
    run_dir = tmp_path / "run"
    argv = tiny_run_args(tmp_path, model, train, test, run_dir=run_dir, batch_size=4, n_epochs=2, eval_every=8)
    monkeypatch.delenv("SFT_TRACEBACK", raising=False)
    monkeypatch.setattr(ckpt, "open", FullDisk(".tmp-step-16", room=20_000).open, raising=False)
    with pytest.raises(SystemExit) as exit:
        run_main(sft_train.main, argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert f"could not write checkpoint step-16: {run_dir / '.tmp-step-16' / 'policy.pt'}: the disk is full (ENOSPC)" in line
    assert f"the last complete checkpoint, {run_dir / 'step-8'}, is intact" in line and "resume_from=auto" in line
    assert not (run_dir / "step-16").exists() and not (run_dir / ".tmp-step-16").exists()
    assert ckpt.resolve_resume("auto", run_dir) == run_dir / "step-8"

    monkeypatch.undo()  # space again
    sft_train.main([*argv, "resume_from=auto"])
    assert "resumed from " + str(run_dir / "step-8") in capsys.readouterr().out
    assert ckpt.load_archive(run_dir / "LATEST" / "policy.pt")["step_idx"] == 32


def test_the_os_reason_is_found_behind_torch_saves_own_error(tmp_path, monkeypatch):
    for code, reason in ((errno.EDQUOT, "the disk quota is exceeded (EDQUOT)"), (errno.EIO, "an I/O error (EIO)")):
        monkeypatch.setattr(ckpt, "open", FullDisk(".tmp-LATEST", room=100, code=code).open, raising=False)
        with pytest.raises(ckpt.CheckpointWriteError, match=rf"policy.pt: {reason.replace('(', '[(]').replace(')', '[)]')}"):
            ckpt.write_checkpoint(tmp_path, "LATEST", 8, {"w": torch.zeros(1000)}, {}, {}, {"rng": {}}, {})
        assert not (tmp_path / ".tmp-LATEST").exists() and not (tmp_path / "LATEST").exists()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_write")
    return root, make_tiny_llama(root / "model")


def fsdp(root, run_dir, model, *extra, **env):
    fsdp_env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    args = [*recipe(model), f"run_dir={run_dir}", f"local_dirs=[{root / 'cache'}]", "sample_during_eval=false", *extra]
    return run_forked([FORCED, "fsdp", *args], root, **fsdp_env, **env)


@pytest.mark.slow
def test_sharded_save_into_a_full_disk_on_another_process_is_one_line_and_resumes(sharded):
    root, model = sharded
    run_dir = root / "shards"
    result = fsdp(root, run_dir, model, FULL_DISK=".tmp-LATEST/resume:0@1")  # process 1's shards of the final LATEST
    output = result.stdout
    assert result.returncode == 2 and "Traceback" not in output, output[-4000:]
    (line,) = error_lines(output)
    assert f"could not write checkpoint LATEST: the sharded resume state in {run_dir / '.tmp-LATEST' / 'resume'}" in line
    assert "the disk is full (ENOSPC)" in line and f"{run_dir / 'step-8'}, is intact" in line
    assert not (run_dir / "LATEST").exists() and not (run_dir / ".tmp-LATEST").exists()
    assert ckpt.is_complete(run_dir / "step-8")

    result = fsdp(root, run_dir, model, "resume_from=auto")
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"resumed from {run_dir / 'step-8'}" in result.stdout
    assert ckpt.is_complete(run_dir / "LATEST") and ckpt.load_archive(run_dir / "LATEST" / "policy.pt")["step_idx"] == 12


@pytest.mark.slow
def test_a_failed_background_write_of_policy_pt_stops_the_run(sharded):
    root, model = sharded
    run_dir = root / "background"
    result = fsdp(root, run_dir, model, FULL_DISK=".tmp-step-8/policy.pt:1000@0")  # the main process's writer thread
    output = result.stdout
    assert result.returncode == 2 and "Traceback" not in output, output[-4000:]
    (line,) = error_lines(output)
    assert f"could not write checkpoint step-8: {run_dir / '.tmp-step-8' / 'policy.pt'}: the disk is full (ENOSPC)" in line
    assert "no earlier checkpoint exists" in line
    assert not (run_dir / "step-8").exists() and not (run_dir / ".tmp-step-8").exists() and not (run_dir / "LATEST").exists()
