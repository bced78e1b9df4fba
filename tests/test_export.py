"""modeling.export on small checkpoints written the way training writes them: the HF directory loads with plain
transformers and gives the logits of the policy.pt model, policy.pt loads strictly into a fresh base model (DPO's
`model.archive`), and --policy-keys transformers-4.29 writes 4.29's keys.

    python -m pytest tests/test_export.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from modeling.export import export_hf, finish_run, main, run_config
from training.plots import plot_run_or_warn
from modeling.load import load_model
from training import checkpoint as ckpt
from training.attention import resolve_attention
from training.config import build_config, save_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo"
KEYS_429 = REPO / "tests" / "fixtures" / "keys_transformers_4.29"
METRICS = {"loss/eval": 123.456789, "logps_eval/chosen": -123.456789, "nll_per_token/eval": 2.5}


def write_run(run_dir: Path, model_dir: Path, seed: int = 0, **extra) -> Path:
    """A run dir with config.yaml and LATEST/ holding a random-init policy (seeded) after 24 examples."""
    config = build_config({**extra,
        "exp_name": "export_test",
        "model": {"name_or_path": str(model_dir), "random_init": True},
        "data_files": {"hh": {"train": "recipes/demo/train.jsonl", "test": "recipes/demo/test.jsonl"}},
        "lr": 1e-4,
        "run_dir": str(run_dir),
    })
    resolve_attention(config, "cpu")  # as start_run does before the run saves its config
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.yaml")
    torch.manual_seed(seed)
    model = load_model(config.model)
    return ckpt.write_checkpoint(run_dir, "LATEST", 24, model.state_dict(), {}, {}, {}, METRICS)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def test_hf_export_round_trip_and_dpo_strict_load(tmp_path):
    latest = write_run(tmp_path / "run", DEMO)
    out = main([str(latest), "--out", str(tmp_path / "hf")])
    assert out == tmp_path / "hf"

    # DPO's archive path: a fresh base model (other random weights), then torch.load(...)["state"] with strict=True.
    config = build_config({"exp_name": "x", "model": {"name_or_path": str(DEMO), "random_init": True}})
    torch.manual_seed(1)
    policy = load_model(config.model)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    before = logits(policy, ids)
    incompatible = policy.load_state_dict(torch.load(latest / "policy.pt", map_location="cpu")["state"], strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    expected = logits(policy, ids)
    assert not torch.equal(before, expected)

    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(exported, ids), expected)

    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "config.yaml", "README.md"} <= files
    assert not any(name.endswith(".bin") for name in files)
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert (out / "config.yaml").read_bytes() == (latest.parent / "config.yaml").read_bytes()

    source = transformers.AutoTokenizer.from_pretrained(DEMO)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "\n\nHuman: How many words are in this list: sun dog?\n\nAssistant: 2"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == source(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id == source.eos_token_id
    assert tokenizer.pad_token_id == source.eos_token_id  # training padded with EOS
    assert not {"is_local", "local_files_only"} & json.loads((out / "tokenizer_config.json").read_text()).keys()
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}  # safetensors alone wrote 0600
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == source.eos_token_id
    assert generation["pad_token_id"] == source.eos_token_id

    card = (out / "README.md").read_text()
    assert "Final eval loss (`loss/eval`, mean summed NLL per example): 123.4568" in card
    assert str(DEMO) in card and "random initialisation" in card
    assert "| `lr` | 0.0001 |" in card
    assert f"transformers {transformers.__version__}" in card


def test_sharded_export_of_a_pretrained_gpt2(tmp_path, reference_dir):
    """A model with weights (tied head, its own generation_config.json): shards load back to the policy's logits."""
    config = build_config({"exp_name": "x", "model": {"name_or_path": str(reference_dir / "tiny-gpt2")}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(config, run_dir / "config.yaml")
    model = load_model(config.model)
    torch.manual_seed(0)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied, as in a trained model's state_dict
    latest = ckpt.write_checkpoint(run_dir, "LATEST", 8, state, {}, {}, {}, {})
    out = export_hf(latest, tmp_path / "hf", max_shard_size="100KB")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model.load_state_dict(torch.load(latest / "policy.pt", map_location="cpu")["state"], strict=True)
    ids = torch.tensor([[0, 11, 500, 2047, 3]])
    assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(out), ids), logits(model, ids))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    assert "not evaluated" in (out / "README.md").read_text()


def fixture_lines(case: str) -> list[str]:
    return (KEYS_429 / f"{case}.float32.keys.txt").read_text().splitlines()


def test_policy_keys_transformers_429_gpt2(tmp_path):
    """A gpt2 built from the config the 4.29 keys were recorded with: names, shapes and dtypes equal the recording."""
    kwargs = json.loads((KEYS_429 / "configs.json").read_text())["cases"]["gpt2"]["kwargs"]
    model_dir = tmp_path / "gpt2"
    transformers.GPT2Config(**kwargs).save_pretrained(model_dir)
    latest = write_run(tmp_path / "run", model_dir)
    out = main([str(latest), "--policy-keys", "transformers-4.29", "--out", str(tmp_path / "legacy" / "policy.pt")])

    legacy = torch.load(out, map_location="cpu")
    assert legacy.keys() == {"step_idx", "state", "metrics"}
    assert legacy["step_idx"] == 24 and legacy["metrics"] == METRICS
    lines = [f"{k} [{','.join(map(str, v.shape))}] {str(v.dtype).removeprefix('torch.')}" for k, v in legacy["state"].items()]
    assert lines == fixture_lines("gpt2")
    current = torch.load(latest / "policy.pt", map_location="cpu")["state"]
    assert torch.equal(legacy["state"]["transformer.h.1.mlp.c_fc.weight"], current["transformer.h.1.mlp.c_fc.weight"])


def test_policy_keys_transformers_429_demo_llama(tmp_path):
    """Llama in 4.29 = today's keys plus one rotary inv_freq buffer per layer (the demo model has 4 layers)."""
    latest = write_run(tmp_path / "run", DEMO)
    out = main([str(latest), "--policy-keys", "transformers-4.29", "--out", str(tmp_path)])
    assert out == tmp_path / "policy.pt"
    legacy = torch.load(out, map_location="cpu")["state"]
    current = torch.load(latest / "policy.pt", map_location="cpu")["state"]
    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(4)}
    assert set(legacy) == set(current) | inv_freq
    # head_dim 32, base 10000: 1 / 10000^(2j/32) for j = 0..15
    expected = torch.tensor([10000.0 ** (-2 * j / 32) for j in range(16)])
    torch.testing.assert_close(legacy["model.layers.3.self_attn.rotary_emb.inv_freq"], expected)
    assert all(torch.equal(legacy[k], current[k]) for k in current)


def test_run_dir_instead_of_checkpoint_names_the_checkpoints(tmp_path):
    latest = write_run(tmp_path / "run", DEMO)
    with pytest.raises(FileNotFoundError, match=r"is a run directory; pass one of its checkpoints: \['LATEST'\]"):
        main([str(latest.parent), "--out", str(tmp_path / "hf")])
    with pytest.raises(FileNotFoundError, match="elsewhere: no such checkpoint directory"):
        export_hf(tmp_path / "elsewhere", tmp_path / "hf")
    (tmp_path / "lone").mkdir()
    with pytest.raises(FileNotFoundError, match="no run config"):
        export_hf(tmp_path / "lone", tmp_path / "hf")


def test_finish_run_exports_and_a_failing_plot_only_warns(tmp_path, caplog):
    latest = write_run(tmp_path / "run", DEMO)
    (latest.parent / "metrics.jsonl").write_text('{"examples_seen": 0, "loss/train": 1.0}\n{broken\n')
    config = run_config(latest)
    assert config.export  # the default
    finish_run(config, latest.parent)
    assert (latest.parent / "hf" / "model.safetensors").is_file()
    assert plot_run_or_warn(latest.parent) == []
    assert "plots for" in caplog.text and "metrics.jsonl" in caplog.text
    assert not list(latest.parent.glob("*.png"))


def test_export_of_a_packed_run_in_a_fresh_process(tmp_path):
    """packing=true resolves model.attn_implementation=sdpa_packed (on CPU); the export and generate CLIs, started as new processes,
    must know that name, and the export must load with plain transformers."""
    latest = write_run(tmp_path / "run", DEMO, packing=True)
    assert run_config(latest).model.attn_implementation == "sdpa_packed"
    out = tmp_path / "hf"
    result = subprocess.run([sys.executable, "-m", "modeling.export", str(latest), "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "modeling.generate", str(latest), "--prompt", "hi", "--greedy",
                             "--max-new-tokens", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    transformers.AutoModelForCausalLM.from_pretrained(out)
