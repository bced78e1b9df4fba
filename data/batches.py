"""Deterministic data order, batching and collation, as the reference's batch iterator.

Order: a list of per-epoch seeds is drawn once from numpy seeded with `seed`; before epoch k the example list is shuffled in place
with Python's `random` seeded with seed_k, so shuffles accumulate across epochs. Full batches are yielded in that order; a partial
batch at an epoch's end is dropped. With n_examples, iteration stops after the first batch at which the example counter (which also
counts the dropped examples) reaches n_examples. The position (epoch, offset) of a batch is all resume needs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from data.files import DataError

N_EPOCH_SEEDS = 1_000_000  # the reference draws this many; the first draws do not depend on the count but keep it identical


@dataclass(frozen=True)
class BatchPlan:
    epoch: int
    offset: int  # index of the batch's first example in this epoch's order
    indices: list[int]
    examples_counted: int  # the reference's example counter after this batch (dropped examples included)


def epoch_seeds(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 2**32, size=N_EPOCH_SEEDS)


def epoch_order(n: int, seed: int, epoch: int, seeds: np.ndarray | None = None) -> list[int]:
    """The order of epoch `epoch`: shuffles of epochs 0..epoch applied in turn to range(n)."""
    seeds = epoch_seeds(seed) if seeds is None else seeds
    order = list(range(n))
    for k in range(epoch + 1):
        random.Random(int(seeds[k])).shuffle(order)  # int(): Python >= 3.11 refuses numpy integers as seeds
    return order


def check_plan(n: int, batch_size: int, n_epochs: int | None, n_examples: int | None, what: str = "") -> None:
    """Settings under which iteration would never start or never end (`what` names the split in the message)."""
    if n_epochs is None and n_examples is None:
        raise ValueError("n_epochs or n_examples must be set")
    if n == 0:
        raise DataError("no examples to batch")
    if n < batch_size:
        raise DataError(f"only {n} {what + ' ' if what else ''}example(s), fewer than one batch of {batch_size}: no batch can ever be formed")


def plan_batches(n: int, batch_size: int, seed: int, n_epochs: int | None, n_examples: int | None, start_epoch: int = 0,
                 start_offset: int = 0, groups: list[list[int]] | None = None) -> Iterator[BatchPlan]:
    """Batches of example indices in the reference's order, from position (start_epoch, start_offset).

    `groups` (DPO: the pair indices of each prompt) makes the groups the units that are shuffled; an epoch's order is then the
    shuffled groups' examples in turn, as the reference iterates the pairs of each shuffled prompt."""
    check_plan(n, batch_size, n_epochs, n_examples)
    units = n if groups is None else len(groups)
    seeds = epoch_seeds(seed)
    order = epoch_order(units, seed, start_epoch, seeds) if start_epoch > 0 else None
    epoch = start_epoch
    while n_epochs is None or epoch < n_epochs:
        if epoch > start_epoch or order is None:
            order = list(range(units)) if order is None else order
            random.Random(int(seeds[epoch])).shuffle(order)
        flat = order if groups is None else [i for unit in order for i in groups[unit]]
        offset = start_offset if epoch == start_epoch else 0
        while offset + batch_size <= n:
            counted = epoch * n + offset + batch_size
            yield BatchPlan(epoch, offset, flat[offset : offset + batch_size], counted)
            if n_examples is not None and counted >= n_examples:
                return
            offset += batch_size
        epoch += 1


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt+response sequences; labels are -100 on the prompt, on padding and where `response_mask` (when present)
    is 0. Labels come from the unpadded ids, so a pad id equal to EOS never hides the supervised EOS."""
    seqs = [e["prompt_ids"] + e["response_ids"] for e in examples]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (e, s) in enumerate(zip(examples, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        labels[i, len(e["prompt_ids"]) : len(s)] = response_labels(e)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_labels(example: dict) -> torch.Tensor:
    """The response ids, -100 where `response_mask` (when present) marks a token as unsupervised (multi-turn chats: later
    user turns sit in the response unsupervised)."""
    response = torch.tensor(example["response_ids"], dtype=torch.long)
    if example.get("response_mask") is not None:
        response = response.masked_fill(torch.tensor(example["response_mask"], dtype=torch.long) == 0, -100)
    return response


def collate_prompts(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation."""
    width = max(len(e["prompt_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        p = e["prompt_ids"]
        if p:
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def plan_length_bucketed(lengths: list[int], batch_size: int, seed: int, n_epochs: int | None, n_examples: int | None,
                         start_epoch: int = 0, start_offset: int = 0, window_batches: int = 64) -> Iterator[BatchPlan]:
    """Batches of similar-length examples, so a padded batch wastes little; same examples per epoch as the reference order.

    Each epoch takes the reference order's full batches (the same partial batch is dropped), cuts them into windows of
    `window_batches` batches, sorts each window by length (ties by position) and cuts it into batches again; the epoch's
    batches are then shuffled with a generator seeded by the epoch's seed. The order is a function of (seed, epoch) alone,
    so (epoch, offset), offset = batch number x batch_size, is a resumable position as in plan_batches.
    """
    n = len(lengths)
    check_plan(n, batch_size, n_epochs, n_examples)
    if window_batches < 1:
        raise ValueError(f"window_batches must be at least 1, got {window_batches}")
    seeds = epoch_seeds(seed)
    order = epoch_order(n, seed, start_epoch, seeds)
    epoch = start_epoch
    while n_epochs is None or epoch < n_epochs:
        if epoch > start_epoch:
            random.Random(int(seeds[epoch])).shuffle(order)
        batches = bucketed_batches(order, lengths, batch_size, window_batches, int(seeds[epoch]))
        first = start_offset // batch_size if epoch == start_epoch else 0
        for b in range(first, len(batches)):
            counted = epoch * n + (b + 1) * batch_size
            yield BatchPlan(epoch, b * batch_size, batches[b], counted)
            if n_examples is not None and counted >= n_examples:
                return
        epoch += 1


def bucketed_batches(order: list[int], lengths: list[int], batch_size: int, window_batches: int, seed: int) -> list[list[int]]:
    """One epoch's batches for plan_length_bucketed."""
    kept = order[: len(order) - len(order) % batch_size]
    window = window_batches * batch_size
    batches = []
    for start in range(0, len(kept), window):
        chunk = sorted(range(start, min(start + window, len(kept))), key=lambda k: (lengths[kept[k]], k))
        batches += [[kept[k] for k in chunk[b:b + batch_size]] for b in range(0, len(chunk), batch_size)]
    # A separate generator (not seeded with the epoch seed itself) so the batch order is not tied to the example shuffle.
    random.Random(seed ^ 0x5EED).shuffle(batches)
    return batches


def plan_train_batches(batching: str, dataset, batch_size: int, seed: int, n_epochs: int | None, n_examples: int | None,
                       start_epoch: int = 0, start_offset: int = 0, window_batches: int = 64) -> Iterator[BatchPlan]:
    """The training batches of `batching` (reference or length_bucketed) for a tokenized split, from (start_epoch, start_offset)."""
    if batching == "reference":
        return plan_batches(len(dataset), batch_size, seed, n_epochs, n_examples, start_epoch, start_offset)
    if batching == "length_bucketed":
        lengths = [len(p) + len(r) for p, r in zip(dataset["prompt_ids"], dataset["response_ids"])]
        return plan_length_bucketed(lengths, batch_size, seed, n_epochs, n_examples, start_epoch, start_offset, window_batches)
    raise ValueError(f"batching: unknown batching {batching!r}; use reference or length_bucketed")


def run_plan(config, dataset, epoch: int = 0, offset: int = 0, groups: list[list[int]] | None = None) -> tuple[Iterator[BatchPlan], int]:
    """The run's remaining training batches from (epoch, offset), and the number of batches of the whole run. `groups`: see
    plan_batches (preference pairs); length-bucketed batching is for SFT examples."""
    if groups is not None:
        if config.batching != "reference":
            raise ValueError(f"batching={config.batching} is not available for preference pairs; use batching=reference")
        plans = plan_batches(len(dataset), config.batch_size, config.seed, config.n_epochs, config.n_examples, epoch, offset, groups)
    else:
        plans = plan_train_batches(config.batching, dataset, config.batch_size, config.seed, config.n_epochs, config.n_examples,
                                   epoch, offset, config.length_bucket_window)
    n_planned = sum(1 for _ in plan_batches(len(dataset), config.batch_size, config.seed, config.n_epochs, config.n_examples))
    return plans, n_planned


def eval_plan(config, n: int, groups: list[list[int]] | None = None) -> list[list[int]]:
    """The fixed eval set's batches: the first n_eval_examples of the seeded order, in eval_batch_size batches."""
    return [p.indices for p in plan_batches(n, config.eval_batch_size, config.seed, None, config.n_eval_examples, groups=groups)]
