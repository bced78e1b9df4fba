"""Examples -> token ids with the reference's truncation rules, tokenized in large batches and cached on disk.

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

Tokenizing: one call of the Rust backend per TOKENIZE_CHUNK rows, whose threads use every core (unless TOKENIZERS_PARALLELISM
is false; tokenizers turns them off by itself in a process forked after they ran), written straight into Arrow with fixed
types. With num_proc > 1, datasets.map runs the same function in that many processes instead.

The cache key is the tokenizer (vocabulary, merges, special tokens, chat template), the settings and a hash of the input rows'
content, so a second run with the same data reads the tokenized dataset from disk without tokenizing; data/sft.py keys whole
splits by their input files instead, so it need not even parse them. The cache never fails a run (data/cache.py): a corrupt
entry is rebuilt with a warning, a failed write (disk full) warns and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa

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
        ids = encode_texts(tokenizer, [batch["prompt"][i] for i in plain_rows] + [batch["target"][i] for i in plain_rows])
        prompts, responses = ids[: len(plain_rows)], ids[len(plain_rows) :]
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


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, from one call to the Rust backend without offsets.

    The backend call skips the per-encoding Python conversion of `tokenizer(...)`; it is taken only when the backend is in the
    state that call would put it in (no truncation or padding, the tokenizer's own split_special_tokens), so the ids are equal.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    direct = (
        backend is not None and hasattr(backend, "encode_batch_fast") and backend.truncation is None
        and backend.padding is None and getattr(backend, "encode_special_tokens", False) == split_special
    )
    if not direct:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


# The files a tokenizer directory defines the vocabulary, merges, special tokens and chat template with.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
_SOURCE_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would produce other ids or render chats differently.

    Two parts. The source, hashed once per tokenizer object: the bytes of its files when it was loaded from a directory with a
    tokenizer.json (as they are at this object's first fingerprint; 3 ms), else the serialized backend (vocabulary and
    merges: 70 ms for a 49k vocabulary). And the in-memory state, read on every call (microseconds), so changes made after
    loading are seen: added and special tokens (a pad token added), EOS, the chat template, split_special_tokens, the
    normalizer, pre-tokenizer, post-processor, decoder and the model's options. Not seen: a backend model object replaced in
    memory by another of the same type and vocabulary size (to_str() would see it; nothing in this suite does that).
    """
    try:
        source = _SOURCE_HASHES.get(tokenizer)
    except TypeError:  # not weak-referenceable
        source = None
    if source is None:
        source = _source_hash(tokenizer)
        try:
            _SOURCE_HASHES[tokenizer] = source
        except TypeError:
            pass
    return hashlib.sha256(f"{source}|{_in_memory_state(tokenizer)}".encode()).hexdigest()[:16]


def _source_hash(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", None)
    directory = Path(name) if isinstance(name, str) and name else None
    if directory is not None and (directory / "tokenizer.json").is_file():
        h = hashlib.sha256(b"files")
        for file in TOKENIZER_FILES:
            if (directory / file).is_file():
                h.update(file.encode() + b"\0" + (directory / file).read_bytes() + b"\0")
        return h.hexdigest()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


MODEL_ATTRIBUTES = ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback",
                    "ignore_merges", "max_input_chars_per_word")


def _in_memory_state(tokenizer) -> str:
    parts = [type(tokenizer).__name__, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None), len(tokenizer),
             getattr(tokenizer, "split_special_tokens", None),
             sorted((i, repr(t)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items())]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(backend.get_vocab_size(with_added_tokens=True))
        for component in (backend.normalizer, backend.pre_tokenizer, backend.post_processor, backend.decoder):
            parts.append(None if component is None else component.__getstate__())
        model = backend.model
        parts.append([type(model).__name__] + [repr(getattr(model, a, None)) for a in MODEL_ATTRIBUTES])
    return repr(parts)


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
    examples: datasets.Dataset | dict[str, list],
    tokenizer,
    settings: TokenizeSettings,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    key: str | None = None,
) -> datasets.Dataset:
    """Tokenize (or read from `{cache_dir}/tokenized/{key}`) and drop examples with no supervised token, with a warning.

    `examples` is a Dataset or its columns; `key` (default: `cache_key` of the examples) names the cache entry. A callable
    `examples` is called only when the entry is missing, so a caller that keys by its inputs reads nothing else on a hit.
    Raises DataError when no example is left.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"a fast tokenizer is required (batched tokenization and chat offsets); got {type(tokenizer).__name__}")
    if key is None and cache_dir is not None:
        examples = examples() if callable(examples) else examples
        key = cache_key(as_dataset(examples), tokenizer, settings)
    path = Path(cache_dir, "tokenized", key) if cache_dir is not None else None
    cached = read_entry(path, _load) if path is not None else None
    if cached is not None:
        tokenized, dropped = cached
        log.info("tokenized examples read from the cache %s", path)
    else:
        tokenized, dropped = _tokenize(examples() if callable(examples) else examples, tokenizer, settings, num_proc)
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


INPUT_COLUMNS = ("prompt", "target", "mode", "example_id", "messages")
# The types datasets infers from the Python values (so entries and tokens_fingerprint are what they were), fixed up front.
ARROW_SCHEMA = pa.schema(
    [(c, pa.string()) for c in INPUT_COLUMNS]
    + [(c, pa.list_(pa.int64())) for c in ("prompt_ids", "response_ids", "response_mask")]
    + [("n_supervised", pa.int64()), ("truncated", pa.bool_()), ("full_prompt_length", pa.int64()),
       ("full_response_length", pa.int64())]
)
FEATURES = datasets.Features.from_arrow_schema(ARROW_SCHEMA)
# Rows per backend call: large enough for the Rust threads and few calls, small enough that the Encodings of one chunk
# (ids, offsets and token strings per token) stay a few hundred MB for long rows.
TOKENIZE_CHUNK = 8192


def as_dataset(examples: datasets.Dataset | dict[str, list]) -> datasets.Dataset:
    return examples if isinstance(examples, datasets.Dataset) else datasets.Dataset.from_dict(
        {c: examples[c] for c in INPUT_COLUMNS}, features=datasets.Features({c: FEATURES[c] for c in INPUT_COLUMNS}))


def _tokenize(examples: datasets.Dataset | dict[str, list], tokenizer, settings: TokenizeSettings,
              num_proc: int | None) -> tuple[datasets.Dataset, dict]:
    n = len(examples) if isinstance(examples, datasets.Dataset) else len(examples["prompt"])
    # Several processes only pay off when each gets at least one full map batch (and the backend's threads are not used).
    if num_proc and num_proc > 1 and n >= num_proc * MAP_BATCH_SIZE:
        tokenized = as_dataset(examples).map(
            tokenize_batch,
            batched=True,
            batch_size=MAP_BATCH_SIZE,
            fn_kwargs={"tokenizer": tokenizer, "settings": settings},
            num_proc=num_proc,
            keep_in_memory=True,
            load_from_cache_file=False,
            features=FEATURES,
            desc="tokenizing",
        )
    else:
        # In this process, a chunk at a time straight into Arrow with the output's types (no datasets.map: no per-batch
        # writer or type inference); the backend spreads each chunk's rows over its threads.
        columns = examples.to_dict() if isinstance(examples, datasets.Dataset) else examples
        schema = ARROW_SCHEMA
        chunks = []
        for start in range(0, n, TOKENIZE_CHUNK):
            batch = {c: columns[c][start : start + TOKENIZE_CHUNK] for c in INPUT_COLUMNS}
            batch.update(tokenize_batch(batch, tokenizer, settings))
            chunks.append(pa.table({c: pa.array(batch[c], type=schema.field(c).type) for c in schema.names}, schema=schema))
        table = pa.concat_tables(chunks) if chunks else schema.empty_table()
        tokenized = datasets.Dataset(table, info=datasets.DatasetInfo(features=FEATURES))
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
