"""Tokenization: the reference's rules on real HH rows, chat masks from offsets, the disk cache, collate masks, bad input.

    python -m pytest tests/test_tokenize.py -q
"""

import gzip
import json
import logging
from pathlib import Path

import pytest
import torch

import data.tokenize
from data.batches import collate
from data.chat import token_mask, tokenize_conversations
from data.files import DataError
from data.records import load_records
from data.sft import build_split, reweight, sft_examples
from data.tokenize import TokenizeSettings, content_fingerprint, tokenize_examples

SHARED = Path(__file__).resolve().parents[2] / "shared"
HH_ROWS = SHARED / "data" / "hh" / "harmless-base-test-300.jsonl.gz"
TINY_GPT2 = SHARED / "data" / "reference" / "tiny-gpt2"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    if not TINY_GPT2.is_dir():
        pytest.skip(f"reference tokenizer not available at {TINY_GPT2}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_GPT2))


@pytest.fixture(scope="module")
def hh_path() -> str:
    if not HH_ROWS.is_file():
        pytest.skip(f"real HH rows not available at {HH_ROWS}")
    return str(HH_ROWS)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def reference_example(tokenizer, prompt: str, target: str, mode: str, max_length: int, max_prompt_length: int):
    """The reference's rules restated one example at a time: separate tokenization, EOS, prompt cut, then response cut."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(response_ids) > max_length:
        prompt_ids = prompt_ids[:max_prompt_length] if mode == "keep_start" else prompt_ids[-max_prompt_length:]
    if len(prompt_ids) + len(response_ids) > max_length:
        response_ids = response_ids[: max_length - max_prompt_length]
    sequence = prompt_ids + response_ids
    labels = [-100] * len(prompt_ids) + response_ids
    return prompt_ids, response_ids, sequence, labels


@pytest.mark.parametrize("kind", ["hh", "jsonl"])
def test_matches_reference_rules_on_real_rows(tokenizer, hh_path, tmp_path, kind):
    records = load_records("hh", "test", files=[hh_path])
    files = [hh_path]
    if kind == "jsonl":  # the same prompts and targets through a keep_start dataset kind
        files = [write_jsonl(tmp_path / "rows.jsonl", [{"prompt": p, "chosen": r["sft_target"]} for p, r in records.items()])]
    max_length, max_prompt_length = 96, 40
    data = build_split([kind], "test", {kind: {"test": files}}, tokenizer, TokenizeSettings(max_length, max_prompt_length), None)
    mode = "keep_end" if kind == "hh" else "keep_start"
    assert len(data) == len(records) == 300
    prompt_cut = response_cut = 0
    for i, (prompt, record) in enumerate(records.items()):
        p, r, sequence, labels = reference_example(tokenizer, prompt, record["sft_target"], mode, max_length, max_prompt_length)
        example = data[i]
        assert example["example_id"] == f"{kind}/test/{i}"
        assert example["prompt_ids"] == p and example["response_ids"] == r, example["example_id"]
        batch = collate([example], pad_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        assert batch["input_ids"][0].tolist() == sequence
        assert batch["labels"][0].tolist() == labels
        full_p = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        prompt_cut += len(p) < full_p
        response_cut += r[-1] != tokenizer.eos_token_id
        assert example["n_supervised"] == len(r)
    # both truncation steps are exercised, and a prompt longer than max_prompt_length survives when everything fits
    assert prompt_cut > 20 and response_cut > 5
    assert any(len(e) > max_prompt_length for e in data["prompt_ids"])
    if kind == "hh":  # keep_end keeps the last turn marker; keep_start keeps the first human turn
        assert all(tokenizer.decode(e).endswith("\n\nAssistant:") for e in data["prompt_ids"])
    else:
        assert all(tokenizer.decode(e).startswith("\n\nHuman:") for e in data["prompt_ids"])


def test_second_run_is_served_from_cache(tokenizer, hh_path, tmp_path, monkeypatch):
    files = {"hh": {"test": [hh_path]}}
    settings = TokenizeSettings(512, 256)
    first = build_split(["hh"], "test", files, tokenizer, settings, str(tmp_path))
    entries = list((tmp_path / "tokenized").iterdir())
    assert len(entries) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(data.tokenize, "tokenize_batch", must_not_run)
    second = build_split(["hh"], "test", files, tokenizer, settings, str(tmp_path))
    assert second.to_dict() == first.to_dict()
    assert list((tmp_path / "tokenized").iterdir()) == entries
    with pytest.raises(AssertionError, match="tokenized again"):  # other settings are another cache entry
        build_split(["hh"], "test", files, tokenizer, TokenizeSettings(512, 128), str(tmp_path))


def test_content_fingerprint_follows_content_only(hh_path):
    a = sft_examples(["hh"], "test", {"hh": {"test": [hh_path]}}, None)
    b = sft_examples(["hh"], "test", {"hh": {"test": [hh_path]}}, None)
    assert content_fingerprint(a) == content_fingerprint(b)
    changed = b.map(lambda row, i: {"target": row["target"] + ("!" if i == 7 else "")}, with_indices=True)
    assert content_fingerprint(changed) != content_fingerprint(a)


def test_examples_without_supervised_tokens_are_dropped_with_a_warning(tokenizer, hh_path, caplog):
    records = load_records("hh", "test", files=[hh_path])
    limit = 150  # max_length == max_prompt_length: any example that needs truncating loses its whole response
    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    fits = [n_tokens(p) + n_tokens(r["sft_target"]) + 1 <= limit for p, r in records.items()]
    with caplog.at_level(logging.WARNING, logger="data.tokenize"):
        data = build_split(["hh"], "test", {"hh": {"test": [hh_path]}}, tokenizer, TokenizeSettings(limit, limit), None)
    assert 0 < sum(fits) < len(fits)
    assert data["example_id"] == [f"hh/test/{i}" for i, ok in enumerate(fits) if ok]
    assert f"dropped {len(fits) - sum(fits)} example(s) with no supervised token" in caplog.text
    with pytest.raises(DataError, match="no example has a supervised token"):
        build_split(["hh"], "test", {"hh": {"test": [hh_path]}}, tokenizer, TokenizeSettings(8, 8), None)


def test_eos_inside_text_is_an_error(tokenizer, tmp_path):
    rows = [{"prompt": "Q:", "chosen": " fine"}, {"prompt": "Q:", "chosen": " merged"}, {"prompt": "Q2:", "chosen": " a<|endoftext|>b"}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)  # rows 1 and 2 merge: the example index (1) is not the line (3)
    with pytest.raises(DataError, match=rf"^{path}:3: the response text of example jsonl/train/1 contains the EOS token"):
        build_split(["jsonl"], "train", {"jsonl": {"train": [path]}}, tokenizer, TokenizeSettings(64, 32), None)


def test_collate_with_sentinel_pad_id():
    examples = [
        {"prompt_ids": [11, 12], "response_ids": [21, 22, 2]},
        {"prompt_ids": [13], "response_ids": [23, 2], "response_mask": [1, 1]},
        {"prompt_ids": [14, 15, 16], "response_ids": [24, 25, 26, 2], "response_mask": [1, 0, 1, 1]},
    ]
    batch = collate(examples, pad_id=-8)
    assert batch["input_ids"].tolist() == [
        [11, 12, 21, 22, 2, -8, -8], [13, 23, 2, -8, -8, -8, -8], [14, 15, 16, 24, 25, 26, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1] * 7]
    assert batch["labels"].tolist() == [
        [-100, -100, 21, 22, 2, -100, -100], [-100, 23, 2, -100, -100, -100, -100], [-100, -100, -100, 24, -100, 26, 2]]


def test_collate_pad_equal_to_eos_keeps_eos_supervised():
    eos = 0
    batch = collate([{"prompt_ids": [5], "response_ids": [6, eos]}, {"prompt_ids": [5, 7], "response_ids": [8, 9, eos]}], pad_id=eos)
    assert batch["input_ids"].tolist() == [[5, 6, eos, eos, eos], [5, 7, 8, 9, eos]]
    assert batch["labels"].tolist() == [[-100, 6, eos, -100, -100], [-100, -100, 8, 9, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]


def test_token_mask_uses_character_overlap():
    offsets = [(0, 3), (3, 9), (9, 10), (10, 10), (10, 15), (15, 20)]
    assert token_mask(offsets, [(4, 10), (18, 19)]) == [0, 1, 1, 0, 0, 1]
    assert token_mask(offsets, [(10, 12)]) == [0, 0, 0, 1, 1, 0]  # an empty token inside a span counts


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Add 2 and 2"},
    {"role": "assistant", "content": "4"},
]


def supervised_text(tokenizer, ids: list[int], mask: list[int]) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


def test_chat_masks_only_assistant_turns(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", CHATML)
    [(ids, mask)] = tokenize_conversations([CHAT], ["c0"], tokenizer)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # the turns' end markers are learned; EOS follows the last turn
    assert supervised_text(tokenizer, ids, mask) == "Hello! How can I help?<|im_end|>\n4<|im_end|>\n<|endoftext|>"
    assert tokenizer.decode([t for t, m in zip(ids, mask) if not m]) == rendered.replace(
        "Hello! How can I help?<|im_end|>\n", "").replace("4<|im_end|>\n", "")


def test_chat_mask_survives_a_token_merged_across_the_turn_boundary(tokenizer, monkeypatch):
    # The generation prompt ends with a space that BPE merges into the first answer token (" Hello"): matching the
    # generation prompt's token ids would find no boundary; character offsets supervise the merged token.
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
                "{% else %}Bot: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Bot: {% endif %}")
    monkeypatch.setattr(tokenizer, "chat_template", template)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    [(ids, mask)] = tokenize_conversations([chat], ["c0"], tokenizer)
    boundary = tokenizer("User: Hi\nBot: Hello\n", add_special_tokens=False, return_offsets_mapping=True)
    straddling = [t for t, (s, e) in zip(boundary["input_ids"], boundary["offset_mapping"]) if s < len("User: Hi\nBot: ") < e]
    assert straddling and straddling[0] in [t for t, m in zip(ids, mask) if m]
    assert supervised_text(tokenizer, ids, mask).endswith("Hello\n<|endoftext|>")
    assert not supervised_text(tokenizer, ids, mask).startswith("Bot")


def test_chat_rows_through_build_split_with_truncation(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)  # no template: the HH transcript form
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    files = {"jsonl": {"train": [path]}}
    full = build_split(["jsonl"], "train", files, tokenizer, TokenizeSettings(512, 256), None)
    first = full[0]
    assert tokenizer.decode(first["prompt_ids"]) == "Be brief.\n\nHuman: Hi there\n\nAssistant:"
    response = first["response_ids"]
    assert tokenizer.decode(response) == " Hello! How can I help?\n\nHuman: Add 2 and 2\n\nAssistant: 4<|endoftext|>"
    assert supervised_text(tokenizer, response, first["response_mask"]) == " Hello! How can I help? 4<|endoftext|>"
    assert first["n_supervised"] == sum(first["response_mask"]) < len(response)
    assert first["example_id"] == f"jsonl/train/0@{path}:1"
    labels = collate([first], pad_id=0)["labels"][0].tolist()
    assert [t for t in labels if t != -100] == [t for t, m in zip(response, first["response_mask"]) if m]
    # keep_start: a too-long chat keeps its first prompt tokens, then the response's first max_length - max_prompt_length
    cut = build_split(["jsonl"], "train", files, tokenizer, TokenizeSettings(12, 5), None)[0]
    assert cut["prompt_ids"] == first["prompt_ids"][:5] and cut["response_ids"] == response[:7]
    assert cut["response_mask"] == first["response_mask"][:7] and cut["truncated"]


def test_chat_bad_rows_name_file_and_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": [{"role": "user", "content": "only"}]}])
    with pytest.raises(DataError, match=rf"{path}:2: the conversation has no assistant message"):
        build_split(["jsonl"], "train", {"jsonl": {"train": [path]}}, tokenizer, TokenizeSettings(64, 32), None)
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": CHAT}, {"prompt": "P", "chosen": "c"}])
    with pytest.raises(DataError, match=rf"{path}:2: expected a chat row"):
        build_split(["jsonl"], "train", {"jsonl": {"train": [path]}}, tokenizer, TokenizeSettings(64, 32), None)
    path = write_jsonl(tmp_path / "eos.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                              {"role": "assistant", "content": "y<|endoftext|>"}]}])
    with pytest.raises(DataError, match=rf"{path}:1: messages\[1\] contains the EOS token"):
        build_split(["jsonl"], "train", {"jsonl": {"train": [path]}}, tokenizer, TokenizeSettings(64, 32), None)


def test_malformed_row_names_file_and_line_through_build_split(tokenizer, hh_path, tmp_path):
    with gzip.open(hh_path, "rt") as f:
        lines = f.read().splitlines()[:5]
    lines[3] = lines[3][:-10]  # a cut-off JSON line
    bad = tmp_path / "hh.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:4: not valid JSON"):
        build_split(["hh"], "train", {"hh": {"train": [str(bad)]}}, tokenizer, TokenizeSettings(64, 32), None)


def test_empty_split_and_filtered_split_fail_before_training(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="produced no records"):
        build_split(["hh"], "train", {"hh": {"train": [str(empty)]}}, tokenizer, TokenizeSettings(64, 32), None)
    rows = [{"history": "q", "human_ref_A": "a", "human_ref_B": "b", "score_A": 3, "score_B": 2, "labels": 1}]
    shp = write_jsonl(tmp_path / "shp.jsonl", rows)
    with pytest.raises(DataError, match="the filter removed all"):
        build_split(["shp"], "train", {"shp": {"train": [shp]}}, tokenizer, TokenizeSettings(64, 32), None)


def test_dataset_weights_are_deterministic_subsamples_and_copies(hh_path, tmp_path):
    rows = list(range(10))
    import random

    half = reweight(rows, 0.5, random.Random("x:0"))
    assert len(half) == 5 and half == sorted(half) and half == reweight(rows, 0.5, random.Random("x:0"))
    assert reweight(rows, 2.5, random.Random("x:0")) == rows + rows + half
    assert reweight(rows, 1.0, random.Random("x:0")) == rows and reweight(rows, 0, random.Random("x:0")) == []
    jsonl = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"P{i}", "chosen": "c"} for i in range(4)])
    files = {"hh": {"train": [hh_path]}, "jsonl": {"train": [jsonl]}}
    mixed = sft_examples(["hh", "jsonl"], "train", files, None, weights={"hh": 0.1, "jsonl": 2}, seed=3)
    ids = mixed["example_id"]
    assert len(ids) == 30 + 8 and ids[30:] == [f"jsonl/train/{i}" for i in [0, 1, 2, 3, 0, 1, 2, 3]]
    assert ids[:30] == sorted(ids[:30], key=lambda s: int(s.split("/")[-1]))
    other_seed = sft_examples(["hh", "jsonl"], "train", files, None, weights={"hh": 0.1, "jsonl": 2}, seed=4)
    assert other_seed["example_id"][:30] != ids[:30]
    with pytest.raises(DataError, match="holds no examples"):
        sft_examples(["jsonl"], "train", files, None, weights={"jsonl": 0.0})


def test_num_proc_gives_the_same_result(tokenizer, hh_path):
    examples = sft_examples(["hh"], "test", {"hh": {"test": [hh_path]}}, None)
    examples = data.tokenize.datasets.concatenate_datasets([examples] * 7)  # 2,100 rows: two map batches per process
    one = tokenize_examples(examples, tokenizer, TokenizeSettings(128, 64))
    two = tokenize_examples(examples, tokenizer, TokenizeSettings(128, 64), num_proc=2)
    assert two["prompt_ids"] == one["prompt_ids"] and two["response_ids"] == one["response_ids"]
    assert torch.equal(torch.tensor(two["n_supervised"]), torch.tensor(one["n_supervised"]))


def test_backend_encoding_gives_the_ids_of_a_tokenizer_call(tokenizer, hh_path):
    from data.tokenize import encode_texts
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(str(TINY_GPT2))  # its backend state is changed below
    texts = [r for prompt, record in load_records("hh", "test", files=[hh_path]).items() for r in (prompt, record["sft_target"])]
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert encode_texts(fresh, texts) == expected
    fresh(texts[:2], truncation=True, max_length=3)  # leaves truncation set on the backend
    assert fresh.backend_tokenizer.truncation is not None
    assert encode_texts(fresh, texts) == expected  # not cut to 3 tokens
