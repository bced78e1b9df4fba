"""modeling.generate: prompt formatting and prompt files, then a real short training run on the demo assets whose end
writes the HF export and the plots, and whose checkpoint and export generate the same completions as a hand-written
greedy loop.

    python -m pytest tests/test_generate.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import sft_train
from modeling.export import build_model, run_config
from modeling.generate import complete, format_prompt, main, read_prompts

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo"
QUESTION = "How many words are in this list: sun dog owl tree?"
MULTI_TURN = "\n\nHuman: Here are three words: fox cat moon.\n\nAssistant: OK.\n\nHuman: What was the first word?\n\nAssistant:"


def test_format_prompt():
    assert format_prompt(QUESTION) == f"\n\nHuman: {QUESTION}\n\nAssistant:"
    assert format_prompt(f"  {QUESTION}\n") == f"\n\nHuman: {QUESTION}\n\nAssistant:"
    assert format_prompt(MULTI_TURN) == MULTI_TURN
    assert format_prompt("\n\nHuman: hi\n\nAssistant: \n") == "\n\nHuman: hi\n\nAssistant:"
    # Not the HH form (no leading blank lines): wrapped like any other text.
    assert format_prompt("Human: hi\n\nAssistant:") == "\n\nHuman: Human: hi\n\nAssistant:\n\nAssistant:"


def test_read_prompts(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("first question\n\n  second question\n")
    assert read_prompts(text) == ["first question", "  second question"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": MULTI_TURN, "id": 3}) + "\n\n" + json.dumps({"prompt": "q"}) + "\n")
    assert read_prompts(jsonl) == [MULTI_TURN, "q"]
    jsonl.write_text(json.dumps({"prompt": "q"}) + "\n" + json.dumps({"text": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected a JSON object with a \"prompt\" string"):
        read_prompts(jsonl)
    jsonl.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: not valid JSON"):
        read_prompts(jsonl)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """40 updates of the demo model: enough to start answering (a few tokens, then EOS)."""
    tmp = tmp_path_factory.mktemp("demo_run")
    return sft_train.main([
        "exp_name=generate_test", f"model.name_or_path={DEMO}", "model.random_init=true",
        f"data_files.hh.train={DEMO / 'train.jsonl'}", f"data_files.hh.test={DEMO / 'test.jsonl'}",
        "batch_size=8", "n_epochs=null", "n_examples=320", "n_eval_examples=8", "eval_batch_size=8", "eval_every=100000",
        "max_length=256", "max_prompt_length=128", "optimizer=AdamW", "lr=3e-3", "warmup_steps=5", "sample_during_eval=false",
        "minimum_log_interval_secs=0",
        "wandb.enabled=false", f"run_dir={tmp / 'run'}", f"local_dirs=[{tmp}]",
    ])


def greedy_reference(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Argmax decoding written out: no BOS, stop after EOS."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new)


@pytest.mark.slow
def test_trained_run_exports_plots_and_generates(run_dir, tmp_path, capsys):
    assert sorted(p.name for p in run_dir.glob("*.png")) == ["grad_norm.png", "loss.png", "lr.png", "throughput.png"]
    hf = run_dir / "hf"
    latest = run_dir / "LATEST"
    policy = build_model(run_config(latest).model, torch.load(latest / "policy.pt", map_location="cpu")["state"])
    exported = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, policy(ids).logits)
    final_eval = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["loss/eval"]
    assert f"Final eval loss (`loss/eval`, mean summed NLL per example): {final_eval:.4f}" in (hf / "README.md").read_text()

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": QUESTION}) + "\n" + json.dumps({"prompt": MULTI_TURN}) + "\n")
    expected = [greedy_reference(exported, tokenizer, format_prompt(p), 12) for p in (QUESTION, MULTI_TURN)]
    assert any(e.strip() for e in expected)  # something to compare beyond an immediate EOS

    capsys.readouterr()
    for source in (latest, hf):
        assert main([str(source), "--prompts-file", str(prompts_file), "--greedy", "--max-new-tokens", "12", "--jsonl"]) == expected
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert rows == [{"prompt": format_prompt(QUESTION), "completion": expected[0]},
                        {"prompt": MULTI_TURN, "completion": expected[1]}]

    assert main([str(latest), "--prompt", QUESTION, "--greedy", "--max-new-tokens", "12"]) == expected[:1]
    assert f"\n\nHuman: {QUESTION}\n\nAssistant:{expected[0]}\n" in capsys.readouterr().out

    # Sampling: reseeded per prompt, so a prompt's completion depends on the seed only, not on the other prompts.
    prompts = [format_prompt(QUESTION), MULTI_TURN]
    forward = complete(exported, tokenizer, prompts, max_new_tokens=8, temperature=1.5, seed=7)
    backward = complete(exported, tokenizer, prompts[::-1], max_new_tokens=8, temperature=1.5, seed=7)
    assert forward == backward[::-1]
