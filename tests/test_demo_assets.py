"""The committed demo assets in recipes/demo/ match `data.demo` and are usable by the training script.

    python -m pytest tests/test_demo_assets.py
"""

import json
from pathlib import Path

import pytest

from data.demo import EOS, N_TEST, N_TRAIN, check_answer, expected_answer, make_rows, make_splits

DEMO_DIR = Path(__file__).resolve().parents[1] / "recipes" / "demo"
ASSISTANT = "\n\nAssistant:"


def _read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO_DIR / name).read_text(encoding="utf-8").splitlines()]


def _split(text: str) -> tuple[str, str]:
    """(prompt, response) the way the hh loader splits a chosen/rejected text."""
    end = text.rindex(ASSISTANT) + len(ASSISTANT)
    return text[:end], text[end:]


@pytest.fixture(scope="module")
def committed() -> tuple[list[dict], list[dict]]:
    return _read_jsonl("train.jsonl"), _read_jsonl("test.jsonl")


def test_regenerated_rows_equal_committed_files(committed):
    train, test = make_splits()
    assert (train, test) == committed
    assert len(train) == N_TRAIN and len(test) == N_TEST
    # Byte-level too: the files are exactly what the generator writes.
    expected = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in train)
    assert (DEMO_DIR / "train.jsonl").read_text(encoding="utf-8") == expected


def test_make_rows_is_deterministic_and_seeded():
    assert make_rows(50, seed=3) == make_rows(50, seed=3)
    assert make_rows(50, seed=3) != make_rows(50, seed=4)


def test_prompts_are_distinct_and_splits_disjoint(committed):
    train, test = committed
    train_prompts = [_split(row["chosen"])[0] for row in train]
    test_prompts = [_split(row["chosen"])[0] for row in test]
    assert len(set(train_prompts)) == len(train_prompts)
    assert len(set(test_prompts)) == len(test_prompts)
    assert not set(train_prompts) & set(test_prompts)


def test_rows_have_hh_form(committed):
    for row in committed[0] + committed[1]:
        assert set(row) == {"chosen", "rejected"}
        prompt, chosen = _split(row["chosen"])
        assert prompt.startswith("\n\nHuman: ")
        assert row["rejected"].startswith(prompt) and _split(row["rejected"])[0] == prompt
        assert chosen.startswith(" ") and chosen.strip() and ASSISTANT not in chosen
        assert row["chosen"] != row["rejected"]
        assert EOS not in row["chosen"] and EOS not in row["rejected"]


def test_check_answer_accepts_chosen_and_rejects_rejected(committed):
    for row in committed[1]:
        prompt, chosen = _split(row["chosen"])
        _, rejected = _split(row["rejected"])
        assert check_answer(prompt, chosen)
        assert not check_answer(prompt, rejected)


def test_check_answer_cut_rule():
    prompt = "\n\nHuman: What number comes after 1999?\n\nAssistant:"
    assert expected_answer(prompt) == "2000"
    assert check_answer(prompt, " 2000")
    assert check_answer(prompt, " 2000<|endoftext|><|endoftext|>")
    assert check_answer(prompt, " 2000\n\nHuman: What number comes after 3?")
    assert not check_answer(prompt, " 20001")
    assert not check_answer(prompt, " 2000 2001")
    assert not check_answer(prompt, "")
    assert expected_answer("\n\nHuman: Say these words in reverse order: cat red fox\n\nAssistant:") == "fox red cat"
    with pytest.raises(ValueError, match="not a demo prompt"):
        expected_answer("\n\nHuman: What is the capital of France?\n\nAssistant:")


def test_tokenizer_round_trips_and_has_eos(committed):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)
    assert tokenizer.eos_token == EOS
    assert tokenizer.bos_token is None
    assert tokenizer.convert_tokens_to_ids(EOS) == tokenizer.eos_token_id
    assert len(tokenizer) <= 1024
    for row in committed[0][:20] + committed[1][:20]:
        prompt, response = _split(row["chosen"])
        ids = tokenizer(row["chosen"], add_special_tokens=False).input_ids
        assert tokenizer.eos_token_id not in ids
        assert tokenizer.decode(ids) == row["chosen"]
        # Prompt and response are tokenized separately in training; each piece must round-trip on its own.
        assert tokenizer.decode(tokenizer(prompt, add_special_tokens=False).input_ids) == prompt
        assert tokenizer.decode(tokenizer(response, add_special_tokens=False).input_ids) == response
    assert tokenizer(EOS, add_special_tokens=False).input_ids == [tokenizer.eos_token_id]
    # Digits are single tokens, so "1000" is four ids.
    assert len(tokenizer("1000", add_special_tokens=False).input_ids) == 4


def test_config_builds_a_tiny_model():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(DEMO_DIR)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.bos_token_id is None
    model = AutoModelForCausalLM.from_config(config)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert 500_000 < sum(p.numel() for p in model.parameters()) < 3_000_000
    logits = model(torch.tensor([[0, 1, 2]])).logits
    assert logits.shape == (1, 3, len(tokenizer))
    assert not (DEMO_DIR / "model.safetensors").exists() and not (DEMO_DIR / "pytorch_model.bin").exists()
