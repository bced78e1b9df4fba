"""The last tracebacks a new user met, each now one line: an unknown model_type, datasets=[jsonl] without files,
`data.demo score` on a missing run, Ctrl-C outside the loop, an archive of another model; model.archive given as a run or
checkpoint directory; a LoRA adapter whose base no model directory holds; the launcher's own output after a run's last
line (python -m training.launch)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from tests.tiny import REPO, tiny_model_dir
from training import checkpoint as ckpt
from training.cli import run_main
from training.config import build_config

DEMO = REPO / "recipes" / "demo"


def model_dir(path: Path, **changes) -> Path:
    path = tiny_model_dir(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return path


def test_architecture_problem_names_directory_model_type_version_and_fix(tmp_path):
    from training.model_source import architecture_problem

    version = transformers.__version__
    typo = architecture_problem(model_dir(tmp_path / "typo", model_type="lama"))
    assert f"{tmp_path / 'typo' / 'config.json'} has model_type 'lama' (did you mean 'llama'?), which transformers {version} " \
           "does not know: upgrade transformers" in typo and "model.trust_remote_code=true" in typo
    remote = model_dir(tmp_path / "remote", model_type="brand_new", auto_map={"AutoConfig": "x.Config"})
    assert "ships its own code for it (auto_map in config.json): set model.trust_remote_code=true" in architecture_problem(remote)
    assert architecture_problem(remote, trust_remote_code=True) is None
    assert "is not a causal LM" in architecture_problem(model_dir(tmp_path / "t5", model_type="t5"))
    assert architecture_problem(tiny_model_dir(tmp_path / "fine")) is None


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """The command lines, each in a child of one process that imported the libraries once (tests/cli_runner.py)."""
    root = tmp_path_factory.mktemp("errors")
    typo = model_dir(root / "typo", model_type="lama")
    local = [f"local_dirs=[{root / 'local'}]"]
    no_files = ["datasets=[jsonl]", "data_files={}"]
    sft = ["sft_train.py", "recipes/demo.yaml", *local]
    dpo = ["dpo_train.py", "recipes/demo_dpo.yaml", "model.archive=null", *local]
    cases = {
        "unknown_model_type": sft + [f"model.name_or_path={typo}", f"run_dir={root / 'r1'}"],
        "jsonl_without_files_sft": sft + no_files + [f"run_dir={root / 'r2'}"],
        "jsonl_without_files_dpo": dpo + no_files + [f"run_dir={root / 'r3'}"],
        "demo_score_missing_run": ["-m", "data.demo", "score", str(root / "nonexist")],
        "archive_dir_without_policy": sft + [f"model.archive={root}", f"run_dir={root / 'r4'}"],
    }
    payload = [{"id": key, "argv": argv, "cwd": str(REPO), "env": {"SFT_TRACEBACK": "0"}} for key, argv in cases.items()]
    (root / "cases.json").write_text(json.dumps(payload))
    subprocess.run([sys.executable, str(REPO / "tests" / "cli_runner.py"), str(root / "cases.json"), str(root / "results.json")],
                   check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    return root, {r["id"]: r for r in json.loads((root / "results.json").read_text())}


@pytest.mark.parametrize("case, expected", [
    ("unknown_model_type", "has model_type 'lama' (did you mean 'llama'?), which transformers"),
    ("jsonl_without_files_sft", "datasets=[jsonl] reads your own files and none are given for the train split: set "
                                "data_files.jsonl.train=PATH and data_files.jsonl.test=PATH"),
    ("jsonl_without_files_dpo", "datasets=[jsonl] reads your own files and none are given for the train split"),
    ("demo_score_missing_run", "no run directory at"),
    ("archive_dir_without_policy", "is a directory without"),
])
def test_one_line_exit_2(outcomes, case, expected):
    root, results = outcomes
    result = results[case]
    output = result["stdout"] + result["stderr"]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
    assert result["code"] == 2 and "Traceback" not in output and len(errors) == 1, output
    assert expected in errors[0], output


def test_ctrl_c_outside_the_training_loop_is_one_line_and_status_130(capsys, monkeypatch):
    monkeypatch.delenv("SFT_TRACEBACK", raising=False)

    def preparing_data(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run_main(preparing_data, [])
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.startswith("interrupted (Ctrl-C): stopped at once") and err.count("\n") == 1


def test_a_signal_delivered_twice_at_once_is_one_request_and_a_later_one_stops_at_once():
    from training.loop import REPEAT_SECONDS, StopRequested, restored_signal_handlers

    with restored_signal_handlers():
        stop = StopRequested()
        stop.handle(signal.SIGTERM, None)  # scancel signals every process of the step ...
        stop.handle(signal.SIGTERM, None)  # ... and the launcher forwards the one it got
        assert stop.signal == signal.SIGTERM
        stop.signalled_at -= REPEAT_SECONDS + 0.1
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C
            stop.handle(signal.SIGINT, None)


def fake_run(run_dir: Path) -> Path:
    """A run directory whose LATEST holds a policy.pt."""
    (run_dir / "LATEST").mkdir(parents=True)
    torch.save({"step_idx": 8, "state": {}, "metrics": {}}, run_dir / "LATEST" / "policy.pt")
    return run_dir


def test_model_archive_takes_a_run_or_checkpoint_directory_and_says_which_file(tmp_path, caplog):
    import logging

    import sft_train
    import stage
    from training.loop import start_run

    run = fake_run(tmp_path / "sft")
    policy = run / "LATEST" / "policy.pt"
    base = ["recipes/demo.yaml", f"local_dirs=[{tmp_path / 'local'}]", f"run_dir={tmp_path / 'new'}"]
    for given in (run, run / "LATEST"):
        with caplog.at_level(logging.INFO):
            config = start_run([*base, f"model.archive={given}"], sft_train.LOSSES, "", stage.build_accelerator).config
        assert config.model.archive == str(policy)
        assert f"model.archive: {given} is a {'run' if given == run else 'checkpoint'} directory; using {policy}" in caplog.text
    assert ckpt.resolve_archive(str(policy)) == (str(policy), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match=rf"{tmp_path / 'empty'} is a directory without {tmp_path / 'empty' / 'policy.pt'} "
                                                   rf"or {tmp_path / 'empty' / 'LATEST' / 'policy.pt'}"):
        ckpt.resolve_archive(str(tmp_path / "empty"))


def test_an_archive_of_another_model_names_the_first_keys_and_the_counts(tmp_path):
    from modeling.load import load_archive_state

    llama = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tiny_model_dir(tmp_path / "m")))
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(
        tiny_model_dir(tmp_path / "g", arch="gpt2")))
    torch.save({"step_idx": 8, "state": gpt2.state_dict(), "metrics": {}}, tmp_path / "gpt2.pt")
    with pytest.raises(ckpt.CheckpointError) as e:
        load_archive_state(llama, str(tmp_path / "gpt2.pt"))
    message = str(e.value)
    missing, unexpected = len(llama.state_dict().keys() - gpt2.state_dict()), len(gpt2.state_dict().keys() - llama.state_dict())
    assert f"keys missing from the archive: {missing} (model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight, " \
           "model.layers.0.self_attn.k_proj.weight, ...)" in message
    assert f"keys the model does not have: {unexpected} (transformer.wte.weight, " in message
    assert message.count("weight") <= 8 and "\n" not in message  # 3 of the 20 and 3 of the 28 keys, and one shape


def lora_export(tmp_path: Path, **model) -> Path:
    """hf/adapter of a LoRA run on the tiny Llama (its adapters as peft made them)."""
    from modeling.lora import add_adapters, write_adapter
    from training.adapters import adapter_state

    directory = tiny_model_dir(tmp_path / "base")
    config = build_config({"exp_name": "lora", "model": {"name": "blank_model", "name_or_path": str(directory), **model},
                           "lora": {"enabled": True, "r": 4}})
    peft_model = add_adapters(transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(directory)), config.lora)
    return write_adapter(tmp_path / "run" / "hf" / "adapter", adapter_state(peft_model.state_dict()), config)


def test_a_lora_adapter_of_a_dpo_run_records_the_sft_export_as_its_base(tmp_path):
    from peft import AutoPeftModelForCausalLM

    sft = fake_run(tmp_path / "sft")  # the SFT run's export of the same LATEST (step 8), as finish_run writes it
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(
        tiny_model_dir(tmp_path / "sft_model"))).save_pretrained(sft / "hf")
    (sft / "hf" / "README.md").write_text(f"- Checkpoint: `{sft / 'LATEST'}` after 8 training examples\n")
    adapter = lora_export(tmp_path, random_init=True, archive=str(sft / "LATEST" / "policy.pt"))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str((sft / "hf").resolve())
    AutoPeftModelForCausalLM.from_pretrained(adapter)  # loads its base by itself


def test_a_lora_adapter_on_random_weights_records_no_base_and_says_why(tmp_path):
    adapter = lora_export(tmp_path, random_init=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert "no model directory holds them" in (adapter / "README.md").read_text()


def launch_and_stop(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    """`python -m training.launch` (the accelerate launch wrapper) with torchrun's agent over tests/dist_scripts/stop_worker.py;
    `stop`: Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it) once the worker is ready."""
    out = tmp_path / "worker"
    command = [sys.executable, "-m", "training.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml", "--num_processes",
               "1", "tests/dist_scripts/stop_worker.py", mode, str(out)]
    with open(tmp_path / "output.txt", "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "SFT_TRACEBACK": "0"})
        try:
            deadline = time.monotonic() + 120
            while mode == "stop" and not Path(f"{out}.ready.0").exists():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "output.txt").read_text()
                time.sleep(0.05)
            if mode == "stop":
                os.killpg(proc.pid, signal.SIGINT)
            proc.wait(120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, proc.returncode, (tmp_path / "output.txt").read_text())


@pytest.mark.slow
def test_ctrl_c_under_the_launcher_ends_with_the_continue_line_and_status_0(tmp_path):
    result = launch_and_stop(tmp_path, "stop")
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stdout
    assert "death signal" in result.stdout  # torchrun's agent got the Ctrl-C too
    assert "SignalException" not in result.stdout and "Traceback" not in result.stdout
    assert "continue with: " in lines[-1] and "-m training.launch --config_file accelerate_configs/cpu_2proc.yaml" in lines[-1]


@pytest.mark.slow
def test_a_user_error_under_the_launcher_is_its_last_line_and_status_2(tmp_path):
    result = launch_and_stop(tmp_path, "fail")
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 2, result.stdout
    assert lines[-1] == "error: lr: must be a finite number > 0, got inf" and "Traceback" not in result.stdout
