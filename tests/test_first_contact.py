"""First contact: every user mistake, run through the real command lines, prints one line `error: ...` naming its culprit,
exits with status 2, shows no traceback and leaves nothing behind; all before any model is loaded.

The cases run in processes forked from one that imported the libraries once (tests/cli_runner.py), so ~50 command lines
cost a few seconds each instead of a full interpreter start each.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.config import load_config, save_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo"
DEMO_TRAIN = DEMO / "train.jsonl"
DEMO_TEST = DEMO / "test.jsonl"


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def hh_row(human: str, answer: str) -> str:
    return json.dumps({"chosen": f"\n\nHuman: {human}\n\nAssistant: {answer}", "rejected": f"\n\nHuman: {human}\n\nAssistant: no"})


def fake_checkpoint(path: Path, run: dict | None = None, broken: bool = False) -> Path:
    """A checkpoint directory with the files and marker resume looks for (tensors are not needed to be refused)."""
    path.mkdir(parents=True)
    for name in ("policy.pt", "optimizer.pt", "scheduler.pt"):
        torch.save({"step_idx": 64, "state": {}, "metrics": {}}, path / name)
    if broken:
        (path / "policy.pt").write_bytes((path / "policy.pt").read_bytes()[:100])  # truncated by a crash or full disk
    state = {"examples_seen": 64, "updates": 2, "epoch": 0, "offset": 64, "rng": {}, "logs": {}}
    if run is not None:
        state["run"] = run
    torch.save(state, path / "train_state.pt")
    (path / "complete").write_text(json.dumps({"step_idx": 64, "written_at": 1.0, "metrics": {}}))
    return path


def build_cases(root: Path) -> tuple[list[dict], dict[str, str], dict[str, Path]]:
    """(cases for cli_runner, expected text of each error line, path that must not exist afterwards)."""
    runs = root / "runs"
    rows = [line for line in DEMO_TRAIN.read_text().splitlines()[:12]]
    bad_utf8 = write_lines(root / "bad_utf8.jsonl", [*rows[:6], rows[6].encode().replace(b"Human:", b"Human:\xff"), *rows[7:]])
    bad_json = write_lines(root / "bad_json.jsonl", [*rows[:2], rows[2][:-5], *rows[3:]])
    no_field = write_lines(root / "no_field.jsonl", [rows[0], json.dumps({"chosen": json.loads(rows[1])["chosen"]}), *rows[2:]])
    small = write_lines(root / "small.jsonl", rows)
    eos = write_lines(root / "eos.jsonl", [*rows[:3], hh_row("Say stop", "stop<|endoftext|>now"), *rows[4:]])
    chat = write_lines(root / "chat.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "hello"}]}),
    ])
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("exp_name: x\nlr: [1e-3\n")
    not_a_model = root / "not_a_model"
    not_a_model.mkdir()
    (root / "a_file").write_text("x")
    finished = runs / "finished"  # what an earlier run left: its config (usable as a recipe), logs, LATEST
    (finished / "LATEST").mkdir(parents=True)
    save_config(load_config([str(REPO / "recipes" / "demo.yaml"), f"run_dir={finished}"]), finished / "config.yaml")
    (finished / "metrics.jsonl").write_text('{"examples_seen": 0}\n')
    (finished / "LATEST" / "policy.pt").write_text("weights")
    locked = runs / "locked"
    locked.mkdir(parents=True)
    (locked / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}))
    signature = {"batch_size": 16, "gradient_accumulation_steps": 1, "seed": 0, "datasets": ["hh"], "dataset_weights": {},
                 "max_length": 64, "max_prompt_length": 48, "optimizer": "AdamW", "batching": "reference",
                 "length_bucket_window": 64}
    other_run = fake_checkpoint(runs / "other" / "step-64", run=signature)
    damaged = fake_checkpoint(runs / "damaged" / "step-64", run=signature, broken=True)
    (runs / "empty").mkdir()
    prompts = write_lines(root / "prompts.jsonl", ['{"prompt": "hi"}', '{"prompt": "hi"'])
    own = write_lines(root / "own.jsonl", ['{"prompt": "Say hi", "chosen": "hi", "rejected": "no"}', '{"prompt": "Say yes", "answer": "yes"}'])
    metrics_only = runs / "no_metrics"
    metrics_only.mkdir()

    sft = ["sft_train.py", "recipes/demo.yaml", f"local_dirs=[{root / 'local'}]"]
    dpo = ["dpo_train.py", "recipes/demo_dpo.yaml", "model.archive=null", f"local_dirs=[{root / 'local'}]", f"run_dir={runs / 'dpo'}"]
    own_data = ["datasets=[jsonl]", f"data_files.jsonl.train={own}", f"data_files.jsonl.test={own}"]
    data = [f"data_files.hh.test={DEMO_TEST}"]
    c: dict[str, tuple[list[str], str]] = {
        # numbers that cannot mean what the user wants
        "warmup_negative": (sft + ["warmup_steps=-2"], "warmup_steps: must be an integer >= 0, got -2"),
        "grad_norm_negative": (sft + ["max_grad_norm=-1"], "max_grad_norm: must be a number > 0, got -1.0"),
        "n_examples_negative": (sft + ["n_examples=-1"], "n_examples: must be an integer >= 1, got -1"),
        "eval_every_zero": (sft + ["eval_every=0"], "eval_every: must be an integer >= 1, got 0"),
        "eval_every_below_batch": (sft + ["eval_every=8"], "eval_every (8) is counted in examples and must be at least one batch"),
        "lr_inf": (sft + ["lr=inf"], "lr: must be a finite number > 0, got inf"),
        "lr_nan": (sft + ["lr=nan"], "lr: must be a finite number > 0, got nan"),
        "seed_negative": (sft + ["seed=-1"], "seed: must be an integer >= 0 and <= 4294967295, got -1"),
        "max_length_beyond_positions": (sft + ["max_length=1000"], "max_length (1000) exceeds the 256 positions of recipes/demo"),
        "prompt_longer_than_max_length": (sft + ["max_prompt_length=100"], "max_prompt_length (100) must not exceed max_length (64)"),
        "n_eval_below_eval_batch": (sft + ["n_eval_examples=8"], "n_eval_examples (8) is less than one eval batch"),
        "keep_last_zero": (sft + ["keep_last=0"], "keep_last: must be an integer >= 1, got 0"),
        "accumulation_not_dividing": (sft + ["gradient_accumulation_steps=3"], "batch_size (32) must be divisible by"),
        "exp_name_with_slash": (sft + ["exp_name=a/b"], "exp_name: must not contain '/'"),
        # keys, types and the HF/TRL dialect
        "typo_key": (sft + ["lrr=1e-3"], "unknown config key 'lrr' (did you mean 'lr'?)"),
        "hf_learning_rate_alias": (sft + ["--learning_rate", "inf"], "lr: must be a finite number > 0, got inf"),
        "hf_epochs_fraction": (sft + ["--num_train_epochs=2.5"], "num_train_epochs (n_epochs here): expected an integer, got 2.5"),
        "hf_per_device_batch": (sft + ["--per_device_train_batch_size", "8"], "use batch_size, the global batch (per-device batch"),
        "hf_model_name_or_path": (sft + ["model_name_or_path=gpt2"], "'model_name_or_path': use model.name_or_path"),
        "hf_output_dir": (sft + ["output_dir=out"], "'output_dir': use run_dir"),
        "hf_max_seq_length": (sft + ["max_seq_length=128"], "'max_seq_length': use max_length"),
        "hf_bf16": (sft + ["--bf16"], "'bf16': use model.policy_dtype=bfloat16"),
        "trl_config_flag": (["sft_train.py", "--config", "recipes/demo.yaml"], "'config': use the recipe file as the first argument"),
        "trl_sigmoid": (dpo + ["loss.name=sigmoid"], "loss.name: 'sigmoid' is TRL's name for it: use loss.name=dpo"),
        "trl_ipo": (dpo + ["--loss_type", "ipo"], "loss_type=ipo: use loss.name=dpo (TRL's sigmoid;"),
        "trl_ref_model": (dpo + ["--ref_model", "gpt2"], "'ref_model': use model.archive: the reference model is the starting policy"),
        "trl_lora_r": (sft + ["--use_peft", "--lora_r", "0"], "lora.r must be at least 1, got 0"),
        "key_of_a_section": (sft + ["--label_smothing", "0.1"], "(did you mean 'loss.label_smoothing'?)"),
        "wrong_type": (sft + ["batch_size=five"], "batch_size: expected an integer, got 'five'"),
        "unknown_optimizer": (sft + ["optimizer=Adamw"], "optimizer: torch.optim has no 'Adamw' (did you mean 'AdamW'?)"),
        "unknown_dtype": (sft + ["model.policy_dtype=fp16"], "model.policy_dtype: 'fp16' is not one of float32, bfloat16, float16"),
        "unknown_dataset": (sft + ["datasets=[hh,shpp]"], "unknown dataset 'shpp' (did you mean 'shp'?)"),
        "recipe_missing": (["sft_train.py", "recipes/nope.yaml"], "recipe file not found: recipes/nope.yaml"),
        "recipe_bad_yaml": (["sft_train.py", str(bad_yaml)], f"{bad_yaml}:3: not valid YAML"),
        "wandb_without_credentials": (sft + ["wandb.enabled=true"], "wandb.enabled=true but no wandb credentials"),
        # model
        "model_dir_missing": (sft + ["model=/no/such/model"], "model.name_or_path: no model directory at /no/such/model"),
        "model_hub_id_offline": (sft + ["model=someorg/not-cached"], "'someorg/not-cached' is not a local directory and not in the hub cache, and HF_HUB_OFFLINE is set"),
        "model_dir_without_config": (sft + [f"model.name_or_path={not_a_model}"], f"{not_a_model} is a directory without config.json"),
        "model_dir_then_model_key": (sft + ["model=recipes/demo", "model.random_init=true", "max_length=1000"],
                                     "max_length (1000) exceeds the 256 positions of recipes/demo"),
        "model_key_then_model_dir": (sft + [f"model.archive={DEMO_TRAIN}", f"model={not_a_model}"],
                                     f"{not_a_model} is a directory without config.json"),
        "archive_missing": (sft + ["model.archive=/no/policy.pt"], "model.archive: /no/policy.pt does not exist; expected a policy.pt file"),
        # data: file and line
        "data_bad_utf8": (sft + [f"data_files.hh.train={bad_utf8}"] + data, f"{bad_utf8}:7: not valid UTF-8"),
        "data_bad_json": (sft + [f"data_files.hh.train={bad_json}"] + data, f"{bad_json}:3: not valid JSON"),
        "data_missing_field": (sft + [f"data_files.hh.train={no_field}"] + data, f"{no_field}:2: missing field 'rejected'"),
        "data_eos_in_response": (sft + [f"data_files.hh.train={eos}"] + data, f"{eos}:4: the response text of example hh/train/3 contains the EOS token"),
        "data_chat_role": (sft + ["datasets=[jsonl]", "data_files={}", f"data_files.jsonl.train={chat}", f"data_files.jsonl.test={chat}"],
                           f"{chat}:2: messages[1] has role 'asistant' (did you mean 'assistant'?)"),
        "own_data_on_a_recipe": (sft + own_data, f"{own}:2: missing field 'chosen'"),
        "own_data_on_a_dpo_recipe": (dpo + own_data, f"{own}:2: missing field 'chosen'"),
        "own_data_without_files": (sft + ["datasets=[jsonl]"], "datasets=[jsonl] reads your own files and none are given for the train"),
        "data_fewer_than_a_batch": (sft + [f"data_files.hh.train={small}"] + data, "only 12 training example(s), fewer than one batch of 32"),
        "data_file_missing": (sft + ["data_files.hh.train=/no/train.jsonl"] + data, "data file '/no/train.jsonl' does not exist"),
        # run directories and checkpoints
        "run_dir_holds_a_run": (sft + [f"run_dir={finished}"], f"run_dir {finished} already holds a run (checkpoints LATEST)"),
        "saved_config_as_recipe": (["sft_train.py", str(finished / "config.yaml")], f"run_dir {finished} already holds a run"),
        "run_dir_locked": (sft + [f"run_dir={locked}"], f"run_dir {locked} is in use by another run (pid {os.getpid()}"),
        "run_dir_is_a_file": (sft + [f"run_dir={root / 'a_file'}"], f"run_dir: {root / 'a_file'} exists and is not a directory"),
        "resume_missing": (sft + ["resume_from=/no/ckpt"], "resume_from: checkpoint directory not found: /no/ckpt"),
        "resume_auto_nothing": (sft + [f"run_dir={runs / 'empty'}", "resume_from=auto"], f"no complete checkpoint in {runs / 'empty'}"),
        "resume_other_batch_size": (sft + [f"resume_from={other_run}"], "batch_size: checkpoint 16, now 32"),
        "resume_damaged": (sft + [f"resume_from={damaged}"], f"resume_from: {damaged} does not load ({damaged / 'policy.pt'}"),
        "resume_auto_all_damaged": (sft + [f"run_dir={damaged.parent}", "resume_from=auto"], "resume_from=auto: no checkpoint in"),
        # the other commands
        "export_missing_checkpoint": (["-m", "modeling.export", "/no/ckpt", "--out", str(root / "exported")], "/no/ckpt: no such checkpoint directory"),
        "export_run_dir": (["-m", "modeling.export", str(runs / "other"), "--out", str(root / "exported")],
                           f"{runs / 'other'} is a run directory; pass one of its checkpoints: ['step-64']"),
        "generate_missing_model": (["-m", "modeling.generate", "/no/model", "--prompt", "hi"], "/no/model: no such checkpoint directory"),
        "generate_bad_prompts": (["-m", "modeling.generate", "/no/model", "--prompts-file", str(prompts)], f"{prompts}:2: not valid JSON"),
        "plots_missing_metrics": (["-m", "training.plots", str(metrics_only)], "metrics.jsonl"),
        "data_cli_bad_source": (["-m", "data", "stats", "hhh"], "'hhh' is neither a recipe file nor a dataset name"),
        "data_cli_bad_utf8": (["-m", "data", "export", "hh", "--data_files", str(bad_utf8), "--out", str(root / "records.jsonl")],
                              f"{bad_utf8}:7: not valid UTF-8"),
        "data_cli_typo": (["-m", "data", "stats", "recipes/demo.yaml", "max_lenght=32"], "did you mean 'max_length'?"),
    }
    cases, expected, absent = [], {}, {}
    for key, (argv, text) in c.items():
        case = {"id": key, "argv": argv, "cwd": str(REPO), "env": {"SFT_TRACEBACK": "0"}}
        if argv[0] == "sft_train.py" and not any(a.startswith(("run_dir=", "resume_from=")) for a in argv) and key != "saved_config_as_recipe":
            case["argv"] = argv + [f"run_dir={runs / key}"]
            absent[key] = runs / key
        if key == "wandb_without_credentials":
            case["env"].update(HOME=str(root), WANDB_MODE="online")
            case["unset"] = ["WANDB_API_KEY", "NETRC", "WANDB_DISABLED"]
        cases.append(case)
        expected[key] = text
    absent.update(export_missing_checkpoint=root / "exported", data_cli_bad_utf8=root / "records.jsonl")
    return cases, expected, absent


def snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_contact")
    cases, expected, absent = build_cases(root)
    before = snapshot(root / "runs")
    (root / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(REPO / "tests" / "cli_runner.py"), str(root / "cases.json"), str(root / "results.json")],
                   check=True, env=env, timeout=900)
    results = {r["id"]: r for r in json.loads((root / "results.json").read_text())}
    return root, results, expected, absent, before


def case_ids() -> list[str]:
    """The case names, read from build_cases' table without building the files (parametrize needs them at collection)."""
    tree = ast.parse(inspect.getsource(build_cases))
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "c":
            return [k.value for k in node.value.keys]
    raise AssertionError("no case table in build_cases")


@pytest.mark.slow
@pytest.mark.parametrize("case", case_ids())
def test_user_error_is_one_line_exit_2_nothing_left(outcomes, case):
    root, results, expected, absent, before = outcomes
    result = results[case]
    output = result["stdout"] + result["stderr"]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
    assert result["code"] == 2, output
    assert "Traceback" not in output, output
    assert len(errors) == 1, output
    assert expected[case] in errors[0], output
    if case in absent:
        assert not absent[case].exists(), f"{absent[case]} left behind"


@pytest.mark.slow
def test_existing_runs_locks_and_checkpoints_are_untouched(outcomes):
    root, results, expected, absent, before = outcomes
    assert snapshot(root / "runs") == before
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["damaged", "empty", "finished", "locked", "no_metrics", "other"]


def test_at_least_30_distinct_inputs():
    assert len(set(case_ids())) >= 30
