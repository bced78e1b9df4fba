"""The SFT examples of a split: canonical records of each dataset (or chat rows), in order, optionally reweighted, tokenized.

    from data.sft import build_split
    train = build_split(["hh", "shp"], "train", {"hh": {"train": ["hh.jsonl"]}}, tokenizer, TokenizeSettings(512, 256),
                        cache_dir, weights={"shp": 0.5}, seed=0)

One example per prompt, (prompt, sft_target), dataset by dataset in the order given, no cross-dataset de-duplication. A `jsonl`
dataset whose first row has `messages` is chat data: one example per row (see data/chat.py).

Weights (train mixtures): a dataset with weight w and n examples contributes round(w * n) examples: floor(w) full copies in
order, then a sample without replacement of the remaining count, drawn from Random(f"{name}:{seed}") and kept in file order.
w = 1 (the default) keeps the dataset as it is; w = 0.5 keeps a fixed half; w = 2.5 repeats it twice plus a fixed half.

Cache: a tokenized split lives in `{cache_dir}/tokenized/split-{key}`, the key made from its inputs alone (split_key: the local
files' paths and bytes or the hub dataset's fingerprint, weights, seed, tokenizer and settings), so a run whose inputs are
unchanged hashes them and reads the entry without parsing a record or tokenizing.
"""

from __future__ import annotations

import hashlib
import json
import random

import datasets

from data.chat import conversation_json, is_chat_data, load_conversations
from data.files import DataError, iter_rows, resolve_paths
from data.records import LOADERS, TRUNCATION_MODE, load_records, records_key
from data.tokenize import (FORMAT_VERSION, EosInTextError, TokenizeSettings, as_dataset, tokenize_examples,
                           tokenizer_fingerprint)

COLUMNS = ("prompt", "target", "mode", "example_id", "messages")


def dataset_rows(name: str, split: str, files: list[str] | None, cache_dir: str | None,
                 num_proc: int | None = None) -> list[dict[str, str]]:
    """The untokenized examples of one dataset and split."""
    mode = TRUNCATION_MODE[name]
    if name == "jsonl" and files is not None:
        paths = resolve_paths(files)
        if is_chat_data(paths):
            conversations = load_conversations(paths)
            return [
                {"prompt": "", "target": "", "mode": mode, "example_id": f"{name}/{split}/{i}@{where}",
                 "messages": conversation_json(messages)}
                for i, (where, messages) in enumerate(conversations)
            ]
    records = load_records(name, split, files=files, cache_dir=cache_dir, num_proc=num_proc)
    return [
        {"prompt": prompt, "target": record["sft_target"], "mode": mode, "example_id": f"{name}/{split}/{i}", "messages": ""}
        for i, (prompt, record) in enumerate(records.items())
    ]


def reweight(rows: list, weight: float, rng: random.Random) -> list:
    """round(weight * len(rows)) rows: whole copies, then a seeded sample of the rest kept in the original order."""
    if weight < 0:
        raise ValueError(f"dataset weight must be non-negative, got {weight}")
    n_take = round(weight * len(rows))
    copies, rest = divmod(n_take, len(rows)) if rows else (0, 0)
    return rows * copies + [rows[i] for i in sorted(rng.sample(range(len(rows)), rest))]


def sft_examples(*args, **kwargs) -> datasets.Dataset:
    """`sft_columns(...)` as a Dataset."""
    return as_dataset(sft_columns(*args, **kwargs))


def sft_columns(
    names: list[str],
    split: str,
    data_files: dict[str, dict[str, list[str]]],
    cache_dir: str | None,
    weights: dict[str, float] | None = None,
    seed: int = 0,
    data_num_proc: int | None = None,
) -> dict[str, list[str]]:
    """The examples of `sft_examples` as plain columns (no Arrow round trip before tokenization)."""
    rows: list[dict[str, str]] = []
    for name in names:
        part = dataset_rows(name, split, data_files.get(name, {}).get(split), cache_dir, data_num_proc)
        if weights and name in weights:
            part = reweight(part, float(weights[name]), random.Random(f"{name}:{seed}"))
        rows.extend(part)
    if not rows:
        raise DataError(f"the {split} split of {names} holds no examples" + (f" with weights {weights}" if weights else ""))
    return {c: [r[c] for r in rows] for c in COLUMNS}


SPLIT_VERSION = "s1"  # bump when the rows of a split are built differently (order, weights, example ids)


def split_key(names: list[str], split: str, data_files: dict[str, dict[str, list[str]]], tokenizer, settings: TokenizeSettings,
              cache_dir: str, weights: dict[str, float] | None, seed: int) -> str | None:
    """The tokenized split's cache key from its inputs alone, so a hit parses no record: per dataset its name, weight and
    source (the local files' paths and bytes, or the hub dataset's fingerprint), then the tokenizer, settings and seed.

    None for an unknown dataset name (load_records then raises the error naming the valid ones).
    """
    h = hashlib.sha256(f"{SPLIT_VERSION}|{FORMAT_VERSION}|{split}|{seed}|{settings.max_length}|{settings.max_prompt_length}|"
                       f"{tokenizer_fingerprint(tokenizer)}".encode())
    for name in names:
        if name not in LOADERS:
            return None
        files = data_files.get(name, {}).get(split)
        paths = None if files is None else resolve_paths(files)
        weight = float(weights[name]) if weights and name in weights else 1.0
        h.update(json.dumps([name, weight, paths]).encode())
        h.update(records_key(name, split, paths, cache_dir).encode())
    return "split-" + h.hexdigest()[:24]


def build_split(
    names: list[str],
    split: str,
    data_files: dict[str, dict[str, list[str]]],
    tokenizer,
    settings: TokenizeSettings,
    cache_dir: str | None,
    num_proc: int | None = None,
    weights: dict[str, float] | None = None,
    seed: int = 0,
    data_num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenized examples (columns in data/tokenize.py); raises DataError when the split ends up empty.

    With a cache_dir the split is cached under a key of its inputs (split_key): a second build hashes the files and the
    tokenizer, then reads the entry, without parsing records or tokenizing.
    """
    key = split_key(names, split, data_files, tokenizer, settings, cache_dir, weights, seed) if cache_dir is not None else None
    try:
        return tokenize_examples(lambda: sft_columns(names, split, data_files, cache_dir, weights, seed, data_num_proc),
                                 tokenizer, settings, cache_dir=cache_dir, num_proc=num_proc, key=key)
    except EosInTextError as e:
        where = locate_text(data_files.get(e.example_id.split("/")[0], {}).get(split), e.eos_text)
        if where is None:
            raise
        raise EosInTextError(e.example_id, e.part, e.eos_text, where) from None


def locate_text(files: list[str] | None, text: str) -> str | None:
    """file:line of the first local row with `text` in one of its string fields (None for hub data or when not found)."""
    if not files:
        return None
    for where, row in iter_rows(resolve_paths(files)):
        if any(isinstance(v, str) and text in v for v in row.values()):
            return where
    return None
