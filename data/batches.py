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


def plan_batches(
    n: int,
    batch_size: int,
    seed: int,
    n_epochs: int | None,
    n_examples: int | None,
    start_epoch: int = 0,
    start_offset: int = 0,
) -> Iterator[BatchPlan]:
    """Batches of example indices in the reference's order, from position (start_epoch, start_offset)."""
    if n_epochs is None and n_examples is None:
        raise ValueError("n_epochs or n_examples must be set")
    if n == 0:
        raise ValueError("no examples to batch")
    if n_examples is not None and n < batch_size and n_epochs is None:
        raise ValueError(f"only {n} example(s), fewer than one batch of {batch_size}: no batch can ever be formed")
    seeds = epoch_seeds(seed)
    order = epoch_order(n, seed, start_epoch, seeds) if start_epoch > 0 else None
    epoch = start_epoch
    while n_epochs is None or epoch < n_epochs:
        if epoch > start_epoch or order is None:
            order = list(range(n)) if order is None else order
            random.Random(int(seeds[epoch])).shuffle(order)
        offset = start_offset if epoch == start_epoch else 0
        while offset + batch_size <= n:
            counted = epoch * n + offset + batch_size
            yield BatchPlan(epoch, offset, order[offset : offset + batch_size], counted)
            if n_examples is not None and counted >= n_examples:
                return
            offset += batch_size
        epoch += 1


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt+response sequences; labels are -100 on the prompt and padding, so the pad id never hides a real token."""
    seqs = [e["prompt_ids"] + e["response_ids"] for e in examples]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (e, s) in enumerate(zip(examples, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        p = len(e["prompt_ids"])
        labels[i, p : len(s)] = torch.tensor(e["response_ids"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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
