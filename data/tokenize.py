"""Records -> tokenized SFT examples, with the reference's truncation rules, tokenized in batches and cached on disk.

One example per prompt: (prompt, sft_target). Prompt and response are tokenized separately without special tokens (no BOS),
EOS is appended to the response and supervised. With L = len(response) + 1:
  1. if len(prompt) + L > max_length: keep the prompt's last (keep_end) or first (keep_start) max_prompt_length tokens;
  2. if still too long: keep the response's first max_length - max_prompt_length tokens (the EOS is then cut off).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets

from data.files import DataError

log = logging.getLogger(__name__)


@dataclass
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


def tokenize_batch(batch: dict[str, list], tokenizer, settings: TokenizeSettings) -> dict[str, list]:
    """`datasets.map` function: prompt/target/mode/example_id columns -> prompt_ids/response_ids (truncated)."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
    responses = tokenizer(batch["target"], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"prompt_ids": [], "response_ids": [], "truncated": []}
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if eos in p or eos in r:
            where = "prompt" if eos in p else "response"
            raise DataError(f"example {batch['example_id'][i]}: the {where} text contains the EOS token {tokenizer.eos_token!r}")
        full = len(p) + len(r) + 1
        p, r = truncate(p, r + [eos], batch["mode"][i], settings.max_length, settings.max_prompt_length)
        out["prompt_ids"].append(p)
        out["response_ids"].append(r)
        out["truncated"].append(len(p) + len(r) < full)
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would produce other ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def tokenize_examples(
    examples: datasets.Dataset,
    tokenizer,
    settings: TokenizeSettings,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenize a dataset with columns prompt, target, mode, example_id; cached by tokenizer, settings and data fingerprint.

    Examples with no supervised token (a response cut to nothing) are dropped with a warning.
    """
    key = hashlib.sha256(
        f"{tokenizer_fingerprint(tokenizer)}|{settings}|{examples._fingerprint}|v1".encode()
    ).hexdigest()[:24]
    cache_file = None
    if cache_dir is not None:
        Path(cache_dir, "tokenized").mkdir(parents=True, exist_ok=True)
        cache_file = str(Path(cache_dir, "tokenized", f"{key}.arrow"))
    tokenized = examples.map(
        tokenize_batch,
        batched=True,
        batch_size=1000,
        fn_kwargs={"tokenizer": tokenizer, "settings": settings},
        cache_file_name=cache_file,
        load_from_cache_file=cache_file is not None,
        new_fingerprint=key,
        num_proc=num_proc if num_proc and num_proc > 1 and len(examples) >= 2 * num_proc else None,
        desc="tokenizing",
    )
    empty = [i for i, n in enumerate(tokenized["response_ids"]) if len(n) == 0]
    if empty:
        log.warning(
            "dropping %d example(s) with no supervised token (max_length - max_prompt_length = %d), e.g. %s",
            len(empty), settings.max_length - settings.max_prompt_length, tokenized[empty[0]]["example_id"],
        )
        keep = sorted(set(range(len(tokenized))) - set(empty))
        tokenized = tokenized.select(keep)
    return tokenized
