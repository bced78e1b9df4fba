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
    ("per_device_train_batch_size", "batch_size, the global batch (per-device batch x processes x gradient_accumulation_steps)"),
    ("model_name_or_path", "model.name_or_path"), ("output_dir", "run_dir"), ("max_seq_length", "max_length"),
    ("bf16", "model.policy_dtype=bfloat16"), ("gradient_checkpointing", "activation_checkpointing"),
    ("ref_model", "model.archive: the reference model is the starting policy itself"),
    ("config", "the recipe file as the first argument, before the key=value words"),
])
def test_hf_and_trl_keys_of_another_meaning_say_what_to_use(key, hint):
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}': use {hint.replace('(', '[(]').replace(')', '[)]')}"):
        load_config([f"--{key}", "1"])


@pytest.mark.parametrize("words, key, value", [
    (["--learning_rate", "1e-5"], "lr", 1e-5),
    (["--num_train_epochs", "3"], "n_epochs", 3),
    (["--beta", "0.1"], "loss.beta", 0.1),
    (["--label_smoothing", "0.2"], "loss.label_smoothing", 0.2),
    (["--loss_type", "sigmoid"], "loss.name", "dpo"),
    (["--precompute_ref_log_probs"], "reference_logps", "precompute"),
    (["--precompute_ref_log_probs", "false"], "reference_logps", "live"),
    (["--use_peft"], "lora.enabled", True),
    (["--lora_r", "8"], "lora.r", 8),
    (["--lora_alpha", "16"], "lora.alpha", 16.0),
    (["--lora_dropout", "0.05"], "lora.dropout", 0.05),
    # TRL's names that are this suite's own keys
    (["--max_length", "128"], "max_length", 128),
    (["--max_prompt_length", "64"], "max_prompt_length", 64),
    (["--gradient_accumulation_steps", "2"], "gradient_accumulation_steps", 2),
])
def test_trl_keys_of_the_same_meaning_are_accepted(words, key, value, caplog):
    with caplog.at_level("INFO"):
        config = load_config(words)
    got = config
    for part in key.split("."):
        got = getattr(got, part)
    assert got == value and type(got) is type(value)
    if words[0][2:] not in config_fields():
        assert f"{words[0][2:]} read as {key}=" in caplog.text


def test_a_trl_alias_overrides_the_recipe_and_a_recipe_holds_one_spelling(tmp_path):
    assert load_config([str(REPO / "recipes" / "demo.yaml"), "--learning_rate", "2e-3"]).lr == 2e-3
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1.0e-5\nbeta: 0.1\n")
    c = load_config([str(recipe), "lr=3e-5"])
    assert (c.lr, c.loss.beta) == (3e-5, 0.1)
    recipe.write_text("learning_rate: 1.0e-5\nlr: 2.0e-5\n")
    with pytest.raises(ConfigError, match="learning_rate and lr are the same key here: give only lr"):
        load_config([str(recipe)])


@pytest.mark.parametrize("words, message", [
    (["--loss_type", "ipo"], "loss_type=ipo: use loss.name=dpo (TRL's sigmoid; loss.label_smoothing makes it conservative DPO) "
                             "or loss.name=ipo (IPO on summed log-probs, as the DPO reference; TRL's ipo averages them per token)"),
    (["--loss_type", "hinge"], "loss_type=hinge: use loss.name=dpo"),
    (["--num_train_epochs", "2.5"], "num_train_epochs (n_epochs here): expected an integer, got 2.5"),
    (["--lora_r", "eight"], "lora_r (lora.r here): expected an integer, got 'eight'"),
])
def test_trl_values_without_the_same_meaning_are_refused(words, message):
    with pytest.raises(ConfigError) as e:
        load_config(words)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("word, hint", [
    ("lora_rank=8", "lora.r"), ("label_smothing=0.1", "loss.label_smoothing"), ("logits_chunk_tokens=64", "loss.logits_chunk_tokens"),
    ("reference_dtyp=float32", "model.reference_dtype"), ("lora.rnk=8", "lora.r"), ("learning_rat=1", "lr"), ("lrr=1", "lr"),
    ("loss.bta=1", "loss.beta"), ("los={beta: 1}", "loss"),
])
def test_suggestions_consider_every_dotted_key_and_the_aliases(word, hint):
    with pytest.raises(ConfigError, match=rf"unknown config key '{word.partition('=')[0]}' \(did you mean '{hint}'\?\)"):
        load_config([word])


def test_the_dialect_names_no_key_of_this_suite_and_aliases_name_real_keys():
    from training.config import DIALECT, Alias, Config

    assert not set(DIALECT) & set(config_fields()) and not set(DIALECT) & set(Config.__dataclass_fields__)
    assert all(alias.key in config_fields() for alias in DIALECT.values() if isinstance(alias, Alias))


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
    assert str(e.value).startswith(message)
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
