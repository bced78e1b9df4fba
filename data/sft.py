"""The SFT examples of a split: canonical records of each dataset, in order, tokenized.

    from data.sft import build_split
    train = build_split(["hh"], "train", {"hh": {"train": ["hh.jsonl"]}}, tokenizer, TokenizeSettings(512, 256), cache_dir)
"""

from __future__ import annotations

import datasets

from data.files import DataError
from data.records import TRUNCATION_MODE, load_records
from data.tokenize import TokenizeSettings, tokenize_examples


def sft_examples(names: list[str], split: str, data_files: dict[str, dict[str, list[str]]], cache_dir: str | None) -> datasets.Dataset:
    """One row per prompt (prompt, sft_target), dataset by dataset in the order given, no cross-dataset de-duplication."""
    columns: dict[str, list[str]] = {"prompt": [], "target": [], "mode": [], "example_id": []}
    for name in names:
        files = data_files.get(name, {}).get(split)
        records = load_records(name, split, files=files, cache_dir=cache_dir)
        for i, (prompt, record) in enumerate(records.items()):
            columns["prompt"].append(prompt)
            columns["target"].append(record["sft_target"])
            columns["mode"].append(TRUNCATION_MODE[name])
            columns["example_id"].append(f"{name}/{split}/{i}")
    if not columns["prompt"]:
        raise DataError(f"the {split} split of {names} holds no examples")
    return datasets.Dataset.from_dict(columns)


def build_split(
    names: list[str],
    split: str,
    data_files: dict[str, dict[str, list[str]]],
    tokenizer,
    settings: TokenizeSettings,
    cache_dir: str | None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    examples = sft_examples(names, split, data_files, cache_dir)
    return tokenize_examples(examples, tokenizer, settings, cache_dir=cache_dir, num_proc=num_proc)
