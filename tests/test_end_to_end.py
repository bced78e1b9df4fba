"""The real CLI end to end: reference fidelity on real HH rows, and the checkpoint contract."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import sft_train

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo"


def golden_args(hh: Path, reference: Path, run_dir: Path) -> list[str]:
    """The settings of the reference's recorded run (see shared/data/reference/README.md)."""
    return [
        "exp_name=golden", "model=blank_model", f"model.name_or_path={reference / 'tiny-gpt2'}",
        f"data_files.hh.train={hh}", f"data_files.hh.test={hh}", "datasets=[hh]", "batch_size=4",
        "gradient_accumulation_steps=2", "lr=1e-4", "warmup_steps=5", "n_epochs=null", "n_examples=80", "n_eval_examples=32",
        "eval_batch_size=16", "eval_every=40", "do_first_eval=true", "sample_during_eval=false", "max_length=512",
        "max_prompt_length=256", "optimizer=RMSprop", "max_grad_norm=10.0", "seed=0", "model.policy_dtype=float32",
        "minimum_log_interval_secs=0", "wandb.enabled=false", f"run_dir={run_dir}", "export=false",
        f"local_dirs=[{run_dir.parent / 'cache'}]",
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_matches_the_reference_run_on_real_hh(hh_rows_path, reference_dir, tmp_path):
    """Every loss/train, grad_norm and loss/eval of the reference's own run, to 1e-4 relative.

    This pins data order, truncation, the loss, the warmup schedule, clipping and RMSprop at once.
    """
    run_dir = tmp_path / "run"
    sft_train.main(golden_args(hh_rows_path, reference_dir, run_dir))
    golden = read_jsonl(reference_dir / "hh300_golden_metrics.jsonl")
    ours = read_jsonl(run_dir / "metrics.jsonl")

    golden_train = [g for g in golden if "loss/train" in g]
    ours_train = [o for o in ours if "loss/train" in o]
    assert [g["_step_examples"] for g in golden_train] == [o["examples_seen"] for o in ours_train] == list(range(4, 81, 4))
    for g, o in zip(golden_train, ours_train):
        assert o["loss/train"] == pytest.approx(g["loss/train"], rel=1e-4), g["_step_examples"]
        assert o["grad_norm"] == pytest.approx(g["grad_norm"], rel=1e-4), g["_step_examples"]
        assert o["logps_train/chosen"] == pytest.approx(-g["loss/train"], rel=1e-4)

    golden_eval = [g for g in golden if "loss/eval" in g]
    ours_eval = [o for o in ours if "loss/eval" in o]
    # The reference evaluates at 0 and 40; this suite adds a final eval at 80 so LATEST carries metrics.
    assert [o["examples_seen"] for o in ours_eval] == [0, 40, 80]
    for g, o in zip(golden_eval, ours_eval):
        assert o["loss/eval"] == pytest.approx(g["loss/eval"], rel=1e-4)

    # lr follows the warmup: update k uses lr * min(1, (k + 1) / 6)
    assert [o["lr"] for o in ours_train] == pytest.approx([1e-4 * min(1.0, (k + 1) / 6) for k in range(20)], rel=1e-12)
    policy = torch.load(run_dir / "LATEST" / "policy.pt", map_location="cpu", weights_only=True)
    assert policy["step_idx"] == 80 and policy["metrics"]["loss/eval"] == pytest.approx(ours_eval[-1]["loss/eval"])
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["LATEST", "step-40"]


def run_cli(args: list[str], cwd: Path = REPO, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "sft_train.py", *args], cwd=cwd, env=env, capture_output=True, text=True, **kwargs)


def demo_args(run_dir: Path, **over) -> list[str]:
    args = {
        "exp_name": "e2e", "model": "blank_model", "model.name_or_path": str(DEMO), "model.random_init": "true",
        "data_files.hh.train": str(DEMO / "train.jsonl"), "data_files.hh.test": str(DEMO / "test.jsonl"),
        "batch_size": 8, "gradient_accumulation_steps": 2, "lr": "1e-3", "optimizer": "AdamW", "warmup_steps": 2,
        "n_epochs": "null", "n_examples": 32, "eval_every": 16, "n_eval_examples": 16, "eval_batch_size": 8,
        "n_eval_model_samples": 2, "max_length": 128, "max_prompt_length": 64, "max_new_tokens": 8,
        "wandb.enabled": "false", "run_dir": str(run_dir), "local_dirs": f"[{run_dir.parent / 'cache'}]",
        "export": "false", "minimum_log_interval_secs": 0,
    }
    args.update(over)
    return [f"{k}={v}" for k, v in args.items()]


def test_cli_writes_the_dpo_checkpoint_contract(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(demo_args(run_dir), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["LATEST", "step-16"]
    fresh = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(DEMO))
    for name, step in (("step-16", 16), ("LATEST", 32)):
        files = {"policy.pt", "optimizer.pt", "scheduler.pt"}
        assert files <= {p.name for p in (run_dir / name).iterdir()}
        for f in files:
            blob = torch.load(run_dir / name / f, map_location="cpu")
            assert set(blob) == {"step_idx", "state", "metrics"} and blob["step_idx"] == step
            assert set(blob["metrics"]) >= {"loss/eval", "logps_eval/chosen"}
        state = torch.load(run_dir / name / "policy.pt", map_location="cpu")["state"]
        assert list(state) == list(fresh.state_dict())  # exactly the plain HF keys, no wrapper prefixes
        assert all(t.device.type == "cpu" for t in state.values())
        fresh.load_state_dict(state, strict=True)
    scheduler = torch.load(run_dir / "LATEST" / "scheduler.pt")["state"]
    assert scheduler["last_epoch"] == 4  # 32 examples / batch 8 = 4 optimizer steps

    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss/train" in r]
    assert [r["examples_seen"] for r in train] == [8, 16, 24, 32]
    assert {"loss/train", "logps_train/chosen", "grad_norm", "lr", "examples_per_second", "tokens_per_second",
            "counters/examples", "counters/updates"} <= set(train[0])
    assert [r["examples_seen"] for r in records if "loss/eval" in r] == [0, 16, 32]
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert len(samples) == 2 * 3 and {"prompt", "sample", "examples_seen"} <= set(samples[0])
    assert samples[0]["prompt"].endswith("\n\nAssistant:")
    assert (run_dir / "config.yaml").is_file()


def test_debug_mode_writes_no_step_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    sft_train.main(demo_args(run_dir, debug="true", sample_during_eval="false"))
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["LATEST"]


def test_archive_is_loaded_before_training(tmp_path):
    """model.archive puts a previous policy.pt's weights in the model: its eval loss at 0 equals the archive's final one."""
    first = tmp_path / "first"
    sft_train.main(demo_args(first, sample_during_eval="false"))
    final = [r for r in read_jsonl(first / "metrics.jsonl") if "loss/eval" in r][-1]["loss/eval"]
    second = tmp_path / "second"
    sft_train.main(demo_args(second, sample_during_eval="false", n_examples=8, **{"model.archive": str(first / "LATEST" / "policy.pt")}))
    assert [r for r in read_jsonl(second / "metrics.jsonl") if "loss/eval" in r][0]["loss/eval"] == pytest.approx(final, rel=1e-6)
