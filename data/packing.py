"""Padding-free packing: a micro-batch's examples concatenated into rows of at most max_length tokens.

    batch = collate_packed(examples, pad_id, max_length=512)
    nll, counts = sequence_nll(model, batch)          # per example, in the order of `examples`

Each example is placed whole (never split); rows are as few and as evenly filled as pack_rows finds. Its position_ids restart
at 0, so the model's attention treats the row as separate sequences: transformers derives the block-diagonal causal mask from
position_ids when no attention_mask and no cache are passed (sdpa/eager/flex on CPU, flash-attention varlen on GPU). The first
token of each example gets label -100: unpacked, nothing predicts it either, so the loss of every example is the same sum it
would be alone. `example_index` maps each position to its example (-1 on the filler that ends a short row), which lets the
loss return per-example sums in the original order. Packing only regroups the micro-batch it is given, so an optimizer step
holds exactly the examples it holds unpacked.
"""

from __future__ import annotations

import heapq

import torch

from data.batches import collate


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices into `lengths` grouped into as few rows of total length <= max_length as this finds, balanced so the longest
    row (the tensor's width, hence the filler) is short; each row lists its members in index order.

    For R = ceil(total / max_length), R + 1, ...: place the examples longest first, each into the least-filled of R rows; the
    first R where every example fits is used (R = number of examples always fits).
    """
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}: it cannot be packed")
        if n <= 0:
            raise ValueError(f"example {i} has no tokens")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for n_rows in range(max(1, -(-sum(lengths) // max_length)), len(lengths) + 1):
        loads = [(0, r) for r in range(n_rows)]  # a heap of (tokens so far, row)
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        for i in order:
            load, r = heapq.heappop(loads)
            if load + lengths[i] > max_length:
                break
            rows[r].append(i)
            heapq.heappush(loads, (load + lengths[i], r))
        else:
            return [sorted(r) for r in rows if r]
    return [[i] for i in range(len(lengths))]


def collate_packed(examples: list[dict], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Packed rows: input_ids, position_ids, labels, example_index; as wide as the longest row (filler: pad id, label -100)."""
    seqs = [e["prompt_ids"] + e["response_ids"] for e in examples]
    rows = pack_rows([len(s) for s in seqs], max_length)
    width = max(sum(len(seqs[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    example_index = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n, p = len(seqs[i]), len(examples[i]["prompt_ids"])
            input_ids[r, start:start + n] = torch.tensor(seqs[i])
            position_ids[r, start:start + n] = torch.arange(n)
            labels[r, start + p:start + n] = response_labels(examples[i])
            labels[r, start] = -100
            example_index[r, start:start + n] = i
            start += n
        # The filler restarts its positions too, so it is a separate (ignored) sequence rather than part of the last example.
        position_ids[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "example_index": example_index}


def response_labels(example: dict) -> torch.Tensor:
    """The response ids, -100 where `response_mask` (when present) marks a token as unsupervised."""
    response = torch.tensor(example["response_ids"], dtype=torch.long)
    if example.get("response_mask") is not None:
        response = response.masked_fill(torch.tensor(example["response_mask"], dtype=torch.long) == 0, -100)
    return response


def collate_batch(examples: list[dict], pad_id: int, packing: bool, max_length: int) -> dict[str, torch.Tensor]:
    """The model input of one micro-batch: packed rows or right-padded rows (data/batches.py collate)."""
    return collate_packed(examples, pad_id, max_length) if packing else collate(examples, pad_id)


def tensor_tokens(lengths: list[int], packing: bool, max_length: int) -> int:
    """Positions (real tokens + padding) of the tensor that collate_batch builds for examples of these lengths."""
    if not lengths:
        return 0
    if not packing:
        return len(lengths) * max(lengths)
    rows = pack_rows(lengths, max_length)
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)
