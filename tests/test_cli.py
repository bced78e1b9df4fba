"""Command-line behaviour shared by every entry point: one line per user error, help from the config tree, the HF/TRL
dialect, `--key value` words, model shorthands, and every config field's range."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

import sft_train
from training.cli import run_main
from training.errors import UserError
from training.checks import CHECKS, validate
from training.config import ConfigError, config_fields, load_config
from training.model_source import check_model_source

REPO = Path(__file__).resolve().parents[1]


def test_every_config_field_has_a_declared_range():
    """A new field needs its valid values in training/checks.py CHECKS (or a Free entry saying where it is checked)."""
    assert set(config_fields()) == set(CHECKS)


def fail_with(error: BaseException):
    def main(argv):
        raise error
    return main


def test_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("SFT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        run_main(fail_with(ConfigError("lr: must be a finite number > 0,\n got inf")))
    assert e.value.code == 2 and capsys.readouterr().err == "error: lr: must be a finite number > 0, got inf\n"
    with pytest.raises(SystemExit):
        run_main(fail_with(OSError(errno.ENOSPC, "No space left on device", "/runs/x/LATEST/policy.pt")))
    assert capsys.readouterr().err == ("error: the disk is full writing /runs/x/LATEST/policy.pt; free space or point run_dir / "
                                       "local_dirs at another disk\n")
    with pytest.raises(SystemExit):
        run_main(fail_with(PermissionError(errno.EACCES, "Permission denied", "/runs/x")))
    assert capsys.readouterr().err == "error: Permission denied: /runs/x\n"


def test_traceback_on_request_and_for_unexpected_errors(capsys, monkeypatch):
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_main(fail_with(KeyError("betas")))
    monkeypatch.setenv("SFT_TRACEBACK", "1")
    with pytest.raises(ConfigError):
        run_main(fail_with(ConfigError("lr: bad")))
    assert capsys.readouterr().err == ""


def test_other_processes_stay_quiet(capsys, monkeypatch):
    """Before the Accelerator exists the launcher's rank decides (each process fails on the same config)."""
    from accelerate.state import PartialState

    monkeypatch.setattr(PartialState, "_shared_state", {})
    monkeypatch.delenv("SFT_TRACEBACK", raising=False)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        run_main(fail_with(ConfigError("lr: bad")))
    assert e.value.code == 2 and capsys.readouterr().err == ""


def test_help_lists_every_key_with_default_and_docstring(capsys):
    assert sft_train.main(["--help"]) is None
    out = capsys.readouterr().out
    for key in config_fields():
        assert f"\n  {key}=" in out, key
    assert "  lr=5.0e-07\n      Peak learning rate" in out and "  model.policy_dtype=float32\n      dtype of the weights" in out
    sft_train.main(["--help", "model"])
    section = capsys.readouterr().out
    assert "model.block_name=null" in section and "\n  lr=" not in section and "\n  loss.name=" not in section
    with pytest.raises(UserError, match=r"--help modle: no such config key or section \(did you mean 'model'\?\)"):
        sft_train.main(["--help", "modle"])


def test_key_value_spellings():
    c = load_config(["--lr", "1e-4", "--batch_size=8", "--debug", "--wandb.enabled", "false", "n_epochs=2"])
    assert (c.lr, c.batch_size, c.debug, c.wandb.enabled, c.n_epochs) == (1e-4, 8, True, False, 2)
    assert load_config(["--max-length", "128"]).max_length == 128


@pytest.mark.parametrize("key, hint", [
    ("learning_rate", "lr"), ("num_train_epochs", "n_epochs"), ("per_device_train_batch_size", "batch_size (the global batch"),
    ("model_name_or_path", "model.name_or_path"), ("output_dir", "run_dir"), ("max_seq_length", "max_length"),
    ("bf16", "model.policy_dtype=bfloat16"), ("gradient_checkpointing", "activation_checkpointing"),
])
def test_hf_and_trl_keys_get_pointed_suggestions(key, hint):
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}': this suite calls it {hint.replace('(', '[(]')}"):
        load_config([f"--{key}", "1"])


def test_model_shorthand_and_command_line_model_replaces_the_recipe_model():
    c = load_config(["model=recipes/demo"])
    assert (c.model.name, c.model.name_or_path) == ("blank_model", "recipes/demo")
    assert load_config(["model=someorg/some-model"]).model.name_or_path == "someorg/some-model"
    c = load_config([str(REPO / "recipes" / "demo.yaml"), "model=pythia28"])  # the demo recipe sets name_or_path and random_init
    assert (c.model.name, c.model.name_or_path, c.model.random_init) == ("pythia28", "EleutherAI/pythia-2.8b", False)


@pytest.mark.parametrize("over, message", [
    (["warmup_steps=-2"], "warmup_steps: must be an integer >= 0, got -2"),
    (["max_grad_norm=-1"], "max_grad_norm: must be a number > 0, got -1.0"),
    (["n_examples=-1"], "n_examples: must be an integer >= 1, got -1"),
    (["eval_every=0"], "eval_every: must be an integer >= 1, got 0"),
    (["lr=inf"], "lr: must be a finite number > 0, got inf"),
    (["seed=-1"], "seed: must be an integer >= 0 and <= 4294967295, got -1"),
    (["minimum_log_interval_secs=nan"], "minimum_log_interval_secs: must be a finite number >= 0, got nan"),
    (["tokenize_num_proc=0"], "tokenize_num_proc: must be an integer >= 1, got 0"),
    (["model.device_map=everywhere"], "model.device_map: 'everywhere' is not one of auto, balanced, balanced_low_0, sequential"),
    (["wandb.project= "], "wandb.project: must not be empty"),
])
def test_ranges_are_checked_by_key(over, message):
    config = load_config(["exp_name=x", "model.name_or_path=recipes/demo", *over])
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert str(e.value) == message
    assert load_config(["max_grad_norm=inf"]).max_grad_norm == float("inf")  # no clipping is a valid choice


def test_console_lines_are_not_wrapped_in_a_pipe():
    code = "from training.logger import console; console.print('w' * 200)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out == "w" * 200 + "\n"


def test_launcher_asking_for_processes_that_did_not_start_is_reported(monkeypatch, tmp_path):
    from training.distributed import build_accelerator, describe_setup

    config = load_config(["exp_name=x", "model.name_or_path=recipes/demo"])
    accelerator = build_accelerator(config)
    assert "note:" not in describe_setup(config, accelerator, tmp_path)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what accelerate's MULTI_CPU launch sets for num_processes > 1
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "note: the launch config asked for several processes, but this is the only one" in describe_setup(config, accelerator, tmp_path)


def test_hub_id_without_network_fails_at_once(monkeypatch):
    """Not offline by setting, but no network: a quick connect decides, instead of a minute of retries."""
    import time

    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    config = load_config(["exp_name=x", "model=someorg/not-cached"])
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"model.name_or_path: 'someorg/not-cached' is not a local directory or in the hub "
                                          r"cache, and http://127.0.0.1:9 cannot be reached"):
        check_model_source(config)
    assert time.monotonic() - start < 5
