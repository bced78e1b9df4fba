"""The preference pairs of a split, tokenized as the reference's DPO stage does: one example per (chosen, rejected) pair.

    from data.pairs import build_pair_split, pair_sides
    train = build_pair_split(["hh"], "train", data_files, tokenizer, TokenizeSettings(512, 256), cache_dir)
    batch = collate_for(config, pad_id)(pair_sides([train[i] for i in indices]))   # chosen rows, then rejected

Pairs are listed record by record in the datasets' order, and within a record in its `pairs` order; `prompt_index` numbers the
records, so the data order (data/batches.py) shuffles prompts and keeps each prompt's pairs together, as the reference does.
Columns: prompt_ids, chosen_ids, rejected_ids (each response ends with EOS), n_supervised_chosen, n_supervised_rejected,
truncated, identical (chosen and rejected equal after truncation: such a pair has zero loss gradient), example_id, prompt_index.

Truncation (the reference's tokenize_batch_element): with L the longer response (with EOS),
  1. if len(prompt) + L > max_length: keep the prompt's last (keep_end, hh) or first (keep_start) max_prompt_length tokens;
  2. if still too long: both responses keep their first max_length - max_prompt_length tokens.
Tokenized pairs are cached like the SFT examples (keyed by the tokenizer, the settings and the rows' content).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import datasets

from data.files import DataError, resolve_paths
from data.chat import is_chat_data
from data.records import TRUNCATION_MODE, load_records
from data.sft import reweight
from data.tokenize import MAP_BATCH_SIZE, TokenizeSettings, _save, cache_key, truncate

log = logging.getLogger(__name__)

COLUMNS = ("prompt", "chosen", "rejected", "mode", "example_id", "prompt_index")


def pair_rows(names: list[str], split: str, data_files: dict[str, dict[str, list[str]]], cache_dir: str | None,
              weights: dict[str, float] | None = None, seed: int = 0, data_num_proc: int | None = None) -> list[dict]:
    """One row per preference pair, record by record; weights (train mixtures) apply to a dataset's records."""
    rows: list[dict] = []
    n_prompts = 0
    for name in names:
        files = data_files.get(name, {}).get(split)
        if name == "jsonl" and files is not None and is_chat_data(resolve_paths(files)):
            raise DataError(f"data_files.jsonl.{split}: chat `messages` rows hold no (chosen, rejected) pairs; DPO needs "
                            "rows with prompt, chosen and rejected")
        records = list(load_records(name, split, files=files, cache_dir=cache_dir, num_proc=data_num_proc).items())
        numbered = list(enumerate(records))
        if weights and name in weights:
            numbered = reweight(numbered, float(weights[name]), random.Random(f"{name}:{seed}"))
        for i, (prompt, record) in numbered:
            for k, (a, b) in enumerate(record["pairs"]):
                rows.append({"prompt": prompt, "chosen": record["responses"][a], "rejected": record["responses"][b],
                             "mode": TRUNCATION_MODE[name], "example_id": f"{name}/{split}/{i}/{k}", "prompt_index": n_prompts})
            n_prompts += 1  # records without a pair still count: the reference shuffles all of them
    if not rows:
        raise DataError(f"the {split} split of {names} holds no preference pairs (records without a rejected response)")
    return rows


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], mode: str, max_length: int,
                  max_prompt_length: int) -> tuple[list[int], list[int], list[int]]:
    """The reference's truncation of a pair: data/tokenize.py's two steps, decided by the longer response and applied to
    both; responses already end with EOS."""
    longer = chosen if len(chosen) >= len(rejected) else rejected
    prompt, kept = truncate(prompt, longer, mode, max_length, max_prompt_length)
    if len(kept) < len(longer):  # still too long after the prompt was cut: both responses are cut alike
        chosen, rejected = chosen[: max_length - max_prompt_length], rejected[: max_length - max_prompt_length]
    return prompt, chosen, rejected


def supervised(prompt: list[int], response: list[int]) -> int:
    """Tokens the shifted log-prob scores (a response token at position 0 has nothing to predict it)."""
    return len(response) - (1 if not prompt and response else 0)


def tokenize_pair_batch(batch: dict[str, list], tokenizer, settings: TokenizeSettings) -> dict[str, list]:
    """`datasets.map` function (batched): the columns of the module docstring."""
    eos = tokenizer.eos_token_id
    ids = {key: tokenizer(batch[key], add_special_tokens=False)["input_ids"] for key in ("prompt", "chosen", "rejected")}
    out: dict[str, list] = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "n_supervised_chosen",
                                            "n_supervised_rejected", "truncated", "identical")}
    for i, (p, c, r) in enumerate(zip(ids["prompt"], ids["chosen"], ids["rejected"])):
        for where, seq in (("prompt", p), ("chosen", c), ("rejected", r)):
            if eos in seq:
                raise DataError(f"example {batch['example_id'][i]}: the {where} text contains the EOS token {tokenizer.eos_token!r}")
        tp, tc, tr = truncate_pair(p, c + [eos], r + [eos], batch["mode"][i], settings.max_length, settings.max_prompt_length)
        out["prompt_ids"].append(tp)
        out["chosen_ids"].append(tc)
        out["rejected_ids"].append(tr)
        out["n_supervised_chosen"].append(supervised(tp, tc))
        out["n_supervised_rejected"].append(supervised(tp, tr))
        out["truncated"].append(len(tp) + len(tc) + len(tr) < len(p) + len(c) + len(r) + 2)
        out["identical"].append(tc == tr)
    return out


def tokenize_pairs(rows: datasets.Dataset, tokenizer, settings: TokenizeSettings, cache_dir: str | None = None,
                   num_proc: int | None = None) -> datasets.Dataset:
    """Tokenized pairs, read from `{cache_dir}/tokenized/{key}` when this tokenizer, these settings and rows were seen."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"a fast tokenizer is required (batched tokenization); got {type(tokenizer).__name__}")
    path = Path(cache_dir, "tokenized", cache_key(rows, tokenizer, settings)) if cache_dir is not None else None
    if path is not None and (path / "dropped.json").is_file():
        log.info("tokenized pairs read from the cache %s", path)
        return datasets.load_from_disk(str(path))
    procs = num_proc if num_proc and num_proc > 1 and len(rows) >= num_proc * MAP_BATCH_SIZE else None
    tokenized = rows.map(tokenize_pair_batch, batched=True, batch_size=MAP_BATCH_SIZE, num_proc=procs, keep_in_memory=True,
                         fn_kwargs={"tokenizer": tokenizer, "settings": settings}, load_from_cache_file=False,
                         desc="tokenizing pairs")
    if path is not None:
        _save(tokenized, {"count": 0, "example": None}, path)  # pairs are never dropped (the reference keeps them all)
    return tokenized


def build_pair_split(names: list[str], split: str, data_files: dict[str, dict[str, list[str]]], tokenizer,
                     settings: TokenizeSettings, cache_dir: str | None, num_proc: int | None = None,
                     weights: dict[str, float] | None = None, seed: int = 0, data_num_proc: int | None = None) -> datasets.Dataset:
    rows = pair_rows(names, split, data_files, cache_dir, weights, seed, data_num_proc)
    table = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS})
    return tokenize_pairs(table, tokenizer, settings, cache_dir, num_proc)


def prompt_groups(pairs: datasets.Dataset) -> list[list[int]]:
    """Pair indices per prompt, prompts in order (a record without pairs is an empty group, except at the very end): the
    units the data order shuffles."""
    index = pairs.data.column("prompt_index").to_pylist()
    groups: list[list[int]] = [[] for _ in range(max(index) + 1 if index else 0)]
    for i, p in enumerate(index):
        groups[p].append(i)
    return groups


def identical_pairs(pairs: datasets.Dataset) -> tuple[int, str | None]:
    """(count, first example id) of pairs whose chosen and rejected are the same tokens after truncation."""
    flags = pairs.data.column("identical").to_pylist()
    hits = [i for i, same in enumerate(flags) if same]
    return len(hits), (pairs[hits[0]]["example_id"] if hits else None)


def pair_sides(pairs: list[dict]) -> list[dict]:
    """The 2B sequences of B pairs in the reference's concatenated order: all chosen, then all rejected, as SFT examples
    (prompt_ids, response_ids) for data/packing.py collate_for. Padded, each side is as wide as the longer one."""
    return [{"prompt_ids": p["prompt_ids"], "response_ids": p[f"{side}_ids"]} for side in ("chosen", "rejected") for p in pairs]


def pair_positions(pairs: list[dict]) -> list[int]:
    """Sequence lengths of pair_sides(pairs), for throughput counts."""
    return [len(p["prompt_ids"]) + len(p[f"{side}_ids"]) for side in ("chosen", "rejected") for p in pairs]


def describe(pairs: datasets.Dataset) -> str:
    """One line for the start of a run: pairs, prompts, truncated and identical pairs."""
    n_same, first = identical_pairs(pairs)
    n_truncated = sum(pairs.data.column("truncated").to_pylist())
    n_prompts = sum(1 for g in prompt_groups(pairs) if g)
    line = f"{len(pairs)} pairs of {n_prompts} prompts, {n_truncated} truncated"
    if n_same:
        line += f"; {n_same} pair(s) have identical chosen and rejected after truncation and teach nothing (e.g. {first})"
    return line

