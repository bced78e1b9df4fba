"""Examples -> token ids with the reference's truncation rules, tokenized in batches by `datasets.map` and cached on disk.

    from data.tokenize import TokenizeSettings, tokenize_examples
    tokenized = tokenize_examples(examples, tokenizer, TokenizeSettings(512, 256), cache_dir=".cache/cache", num_proc=4)

Input columns: prompt, target, mode (keep_end / keep_start), example_id, messages (a JSON chat or ""). Added columns:
  prompt_ids, response_ids   the sequence is prompt_ids + response_ids; prompt positions are never supervised
  response_mask              1 where a response token is supervised (all ones for single-turn; 0 on later user turns of a chat)
  n_supervised               tokens the loss scores (supervised positions after the first; the first token is never predicted)
  truncated                  whether truncation removed any token
  full_prompt_length, full_response_length   lengths before truncation (response counted with its EOS)

Single-turn (prompt, target): prompt and response are tokenized separately without special tokens (no BOS), EOS is appended to
the response and supervised; an EOS inside either text is an error. With L = len(response) + 1:
  1. if len(prompt) + L > max_length: keep the prompt's last (keep_end) or first (keep_start) max_prompt_length tokens;
  2. if still too long: keep the response's first max_length - max_prompt_length tokens (the EOS is then cut off).
Chat rows are rendered and masked by data/chat.py; their prompt is every token before the first supervised one and their response
the rest, so the same two rules apply (the response mask is cut with the response).

The cache key is the tokenizer (vocabulary, merges, special tokens, chat template), the settings and a hash of the input rows'
content, so a second run with the same data reads the tokenized dataset from disk without tokenizing. The cache never fails a
run (data/cache.py): a corrupt entry is rebuilt with a warning, a failed write (disk full) warns and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets

from data.cache import read_entry, write_entry
from data.chat import tokenize_conversations
from data.files import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = "v2"  # bump when the output columns or rules change, so old cache entries are not reused
MAP_BATCH_SIZE = 1000


class EosInTextError(DataError):
    """The text of an example holds the EOS token; data/sft.py adds the file and line of its row."""

    def __init__(self, example_id: str, part: str, eos_text: str, where: str | None = None):
        self.example_id, self.part, self.eos_text = example_id, part, eos_text
        at = f"{where}: " if where else ""
        super().__init__(f"{at}the {part} text of example {example_id} contains the EOS token {eos_text!r}; remove it from the "
                         "data (EOS is appended to every response by training)")


@dataclass(frozen=True)
class TokenizeSettings:
    max_length: int
    max_prompt_length: int


def truncate(prompt: list[int], response: list[int], mode: str, max_length: int, max_prompt_length: int) -> tuple[list[int], list[int]]:
    """The reference's two-step truncation; `response` already ends with EOS."""
    if len(prompt) + len(response) > max_length:
        if mode == "keep_end":
            prompt = prompt[-max_prompt_length:] if max_prompt_length else []
        elif mode == "keep_start":
            prompt = prompt[:max_prompt_length]
        else:
            raise ValueError(f"unknown truncation mode {mode!r}")
    if len(prompt) + len(response) > max_length:
        response = response[: max_length - max_prompt_length]
    return prompt, response


def count_supervised(prompt_ids: list[int], response_mask: list[int]) -> int:
    """Supervised tokens the shifted loss scores: a supervised token at position 0 has nothing before it to predict it."""
    n = sum(response_mask)
    if not prompt_ids and response_mask and response_mask[0]:
        n -= 1
    return n


def tokenize_batch(batch: dict[str, list], tokenizer, settings: TokenizeSettings) -> dict[str, list]:
    """`datasets.map` function (batched): see the module docstring for the columns it adds."""
    eos = tokenizer.eos_token_id
    n = len(batch["prompt"])
    chat_rows = [i for i in range(n) if batch["messages"][i]]
    plain_rows = [i for i in range(n) if not batch["messages"][i]]
    # (prompt ids, response ids with EOS, response mask) per row, before truncation
    segments: list[tuple[list[int], list[int], list[int]] | None] = [None] * n
    if plain_rows:
        prompts = tokenizer([batch["prompt"][i] for i in plain_rows], add_special_tokens=False)["input_ids"]
        responses = tokenizer([batch["target"][i] for i in plain_rows], add_special_tokens=False)["input_ids"]
        for i, p, r in zip(plain_rows, prompts, responses):
            if eos in p or eos in r:
                raise EosInTextError(batch["example_id"][i], "prompt" if eos in p else "response", tokenizer.eos_token)
            segments[i] = (p, r + [eos], [1] * (len(r) + 1))
    if chat_rows:
        chats = tokenize_conversations(
            [json.loads(batch["messages"][i]) for i in chat_rows], [batch["example_id"][i] for i in chat_rows], tokenizer
        )
        for i, (ids, mask) in zip(chat_rows, chats):
            first = mask.index(1) if 1 in mask else len(mask)
            segments[i] = (ids[:first], ids[first:], mask[first:])

    out: dict[str, list] = {k: [] for k in ("prompt_ids", "response_ids", "response_mask", "n_supervised", "truncated",
                                            "full_prompt_length", "full_response_length")}
    for i, (p, r, m) in enumerate(segments):
        tp, tr = truncate(p, r, batch["mode"][i], settings.max_length, settings.max_prompt_length)
        mask = m[: len(tr)]
        out["prompt_ids"].append(tp)
        out["response_ids"].append(tr)
        out["response_mask"].append(mask)
        out["n_supervised"].append(count_supervised(tp, mask))
        out["truncated"].append(len(tp) + len(tr) < len(p) + len(r))
        out["full_prompt_length"].append(len(p))
        out["full_response_length"].append(len(r))
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would produce other ids or render chats differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = f"{tokenizer.eos_token_id}|{getattr(tokenizer, 'chat_template', None)}|{type(tokenizer).__name__}"
    return hashlib.sha256(f"{text}|{extra}".encode()).hexdigest()[:16]


def content_fingerprint(examples: datasets.Dataset) -> str:
    """A hash of the rows' content (columns and values in order); the same data gives the same hash in any process."""
    h = hashlib.sha256()
    for column in sorted(examples.column_names):
        h.update(column.encode() + b"\0")
        for start in range(0, len(examples), 10_000):
            h.update(json.dumps(examples[start : start + 10_000][column], ensure_ascii=False).encode())
    return h.hexdigest()


def tokens_fingerprint(tokenized: datasets.Dataset) -> str:
    """A hash of the token ids and masks of a tokenized split, in order: equal exactly when training would see the same data."""
    import pyarrow.compute as pc

    table = tokenized.with_format("arrow")[:] if len(tokenized) else None
    h = hashlib.sha256(str(len(tokenized)).encode())
    for column in ("prompt_ids", "response_ids", "response_mask"):
        if table is None:
            break
        values = table.column(column)
        h.update(pc.list_value_length(values).to_numpy(zero_copy_only=False).tobytes())
        h.update(pc.list_flatten(values).to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()


def cache_key(examples: datasets.Dataset, tokenizer, settings: TokenizeSettings) -> str:
    text = f"{tokenizer_fingerprint(tokenizer)}|{settings.max_length}|{settings.max_prompt_length}|{content_fingerprint(examples)}"
    return hashlib.sha256(f"{text}|{FORMAT_VERSION}".encode()).hexdigest()[:24]


def tokenize_examples(
    examples: datasets.Dataset,
    tokenizer,
    settings: TokenizeSettings,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenize (or read from `{cache_dir}/tokenized/{key}`) and drop examples with no supervised token, with a warning.

    Raises DataError when no example is left.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"a fast tokenizer is required (batched tokenization and chat offsets); got {type(tokenizer).__name__}")
    key = cache_key(examples, tokenizer, settings)
    path = Path(cache_dir, "tokenized", key) if cache_dir is not None else None
    cached = read_entry(path, _load) if path is not None else None
    if cached is not None:
        tokenized, dropped = cached
        log.info("tokenized examples read from the cache %s", path)
    else:
        tokenized, dropped = _tokenize(examples, tokenizer, settings, num_proc)
        if path is not None:
            write_entry(path, lambda tmp: _save(tokenized, dropped, tmp))
    if dropped["count"]:
        log.warning(
            "dropped %d example(s) with no supervised token (max_length - max_prompt_length = %d), e.g. %s",
            dropped["count"], settings.max_length - settings.max_prompt_length, dropped["example"],
        )
    if len(tokenized) == 0:
        raise DataError(
            f"no example has a supervised token after truncation ({dropped['count']} dropped, e.g. {dropped['example']}); "
            f"raise max_length ({settings.max_length}) above max_prompt_length ({settings.max_prompt_length})"
        )
    return tokenized


def _tokenize(examples: datasets.Dataset, tokenizer, settings: TokenizeSettings, num_proc: int | None) -> tuple[datasets.Dataset, dict]:
    # Several processes only pay off when each gets at least one full map batch.
    procs = num_proc if num_proc and num_proc > 1 and len(examples) >= num_proc * MAP_BATCH_SIZE else None
    tokenized = examples.map(
        tokenize_batch,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        fn_kwargs={"tokenizer": tokenizer, "settings": settings},
        num_proc=procs,
        keep_in_memory=True,
        load_from_cache_file=False,
        desc="tokenizing",
    )
    counts = tokenized.data.column("n_supervised").to_pylist()
    empty = [i for i, c in enumerate(counts) if c <= 0]
    dropped = {"count": len(empty), "example": tokenized[empty[0]]["example_id"] if empty else None}
    if empty:
        tokenized = tokenized.select([i for i, c in enumerate(counts) if c > 0])
    return tokenized, dropped


def _save(tokenized: datasets.Dataset, dropped: dict, tmp: Path) -> None:
    tokenized.save_to_disk(str(tmp))
    (tmp / "dropped.json").write_text(json.dumps(dropped))


def _load(path: Path) -> tuple[datasets.Dataset, dict]:
    """A cache entry, read fully enough that a truncated or garbled file fails here rather than during training."""
    dropped = json.loads((path / "dropped.json").read_text())
    tokenized = datasets.load_from_disk(str(path), keep_in_memory=False)
    if tokenized.data.num_rows != len(tokenized) or not {"prompt_ids", "response_ids", "n_supervised"} <= set(tokenized.column_names):
        raise ValueError("unexpected layout")
    tokenized.data.validate(full=True)
    return tokenized, dropped
