"""Padding-free packing: a micro-batch's examples concatenated, with each example's attention and loss kept to itself.

    collate = collate_for(config, pad_id)         # the run's packing, max_length and attention kernel
    batch = collate(examples)                      # packed (in the kernel's layout) or right-padded rows
    nll, counts = sequence_nll(model, to_device(batch, device))   # per example, in the order of `examples`
    positions = collate.positions(lengths)         # tensor positions (tokens + padding) of such a batch

Each example is placed whole (never split); position_ids restart at 0 per example. The first token of each example gets
label -100: unpacked, nothing predicts it either, so the loss of every example is the same sum it would be alone.
`example_index` maps each position to its example (-1 on filler), which lets the loss return per-example sums in the
original order. Packing only regroups the micro-batch it is given, so an optimizer step holds exactly the examples it holds
unpacked. Every key but `labels`, `example_index` and `n_examples` is a model input. What else a packed batch carries
depends on the attention kernel (training/attention.py `packed_layout`), because transformers detects packing differently
per kernel:

- "rows" (sdpa_packed, sdpa, eager): rows of at most max_length tokens, as few and as evenly filled as pack_rows finds,
  filler (pad id, label -100, its own positions) at the end of short rows; shape (rows, width). sdpa and eager build a
  block-diagonal mask from position_ids. `packed_spans` (a tuple per row of (start, end) pairs, filler included) is
  computed here once, so `sdpa_packed` splits rows without reading position_ids back from the device in every layer.
- "flat" (flash-attention kernels, varlen_attn, flex_attention): ONE row of all the micro-batch's examples, no filler,
  shape (1, total), plus `cu_seq_lens_q`/`cu_seq_lens_k` (int32 offsets [0, len_0, len_0 + len_1, ...]) and
  `max_length_q`/`max_length_k` (Python ints), the kwargs transformers' flash path hands to the varlen kernel, and
  `n_examples` (a Python int, so the loss needs no device read to count them). transformers only infers packing from
  position_ids when the batch has one row; several packed rows would run as plain causal attention across examples.

Other kernels are refused with packing (training/attention.py check_attention).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from data.batches import collate, response_labels
from training.attention import packed_layout
from training.config import Config


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


def collate_packed(examples: list[dict], pad_id: int, max_length: int, attention: str | None = "sdpa_packed") -> dict:
    """The packed micro-batch in the layout `attention` needs (see the module docstring for both contracts)."""
    seqs = [e["prompt_ids"] + e["response_ids"] for e in examples]
    lengths = [len(s) for s in seqs]
    flat = packed_layout(attention) == "flat"
    rows = [list(range(len(seqs)))] if flat else pack_rows(lengths, max_length)
    if flat:
        for i, n in enumerate(lengths):
            if n <= 0:
                raise ValueError(f"example {i} has no tokens")
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    example_index = torch.full((len(rows), width), -1, dtype=torch.long)
    spans = []
    for r, row in enumerate(rows):
        start, row_spans = 0, []
        for i in row:
            n, p = lengths[i], len(examples[i]["prompt_ids"])
            input_ids[r, start:start + n] = torch.tensor(seqs[i])
            position_ids[r, start:start + n] = torch.arange(n)
            labels[r, start + p:start + n] = response_labels(examples[i])
            labels[r, start] = -100
            example_index[r, start:start + n] = i
            row_spans.append((start, start + n))
            start += n
        if start < width:
            # The filler restarts its positions too, so it is a separate (ignored) sequence rather than part of the last example.
            position_ids[r, start:] = torch.arange(width - start)
            row_spans.append((start, width))
        spans.append(tuple(row_spans))
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "example_index": example_index,
             "n_examples": len(examples)}
    if flat:
        offsets = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        longest = max(lengths)
        batch.update(cu_seq_lens_q=offsets, cu_seq_lens_k=offsets.clone(), max_length_q=longest, max_length_k=longest)
    else:
        batch["packed_spans"] = tuple(spans)
    return batch


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Tensors moved to `device`; Python values (spans, max lengths) stay on the host, which is the point of them."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass(frozen=True)
class Collate:
    """A run's micro-batch collate: its packing, max_length and attention kernel fixed once (collate_for)."""

    pad_id: int
    packing: bool
    max_length: int
    attention: str | None

    def __call__(self, examples: list[dict]) -> dict:
        """The model input of one micro-batch: packed (in the kernel's layout) or right-padded rows (data/batches.py)."""
        if self.packing:
            return collate_packed(examples, self.pad_id, self.max_length, self.attention)
        return collate(examples, self.pad_id)

    def positions(self, lengths: list[int]) -> int:
        """Positions (real tokens + padding) of the tensor this builds for examples of these lengths."""
        if not lengths:
            return 0
        if not self.packing:
            return len(lengths) * max(lengths)
        if packed_layout(self.attention) == "flat":
            return sum(lengths)
        rows = pack_rows(lengths, self.max_length)
        return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def collate_for(config: Config, pad_id: int) -> Collate:
    """The collate of a run with this config (model.attn_implementation already resolved for the device)."""
    return Collate(pad_id, config.packing, config.max_length, config.model.attn_implementation)
