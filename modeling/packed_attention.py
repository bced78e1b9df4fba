"""`sdpa_packed`: attention that costs only the pairs inside each packed example.

    python sft_train.py recipes/demo.yaml packing=true      # picks model.attn_implementation=sdpa_packed

With packing, plain sdpa/eager attention gets a dense block-diagonal mask: every query-key pair of a 512-token row is computed
and most are then thrown away, and a masked sdpa call cannot use the fused causal kernel. `sdpa_packed` finds the examples of
a row from position_ids (a new example wherever a position is not the previous one plus one, as transformers does) and runs
causal sdpa on each example alone, so the work is sum(len_i^2) instead of row_length^2. Anything that is not a packed training
forward (a padding mask, a KV cache, decoding, a model that does not hand position_ids to attention) goes to transformers' sdpa
with its mask, unchanged. Importing this module registers the name;
modeling/load.py imports it, so every model a run builds (training, export, generate) and any config can set model.attn_implementation=sdpa_packed. On GPU prefer flash_attention_2,
whose varlen kernel does the same from position_ids.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_packed"


def example_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each run of consecutive positions."""
    spans = []
    for row in position_ids.tolist():
        starts = [t for t in range(len(row)) if t == 0 or row[t] != row[t - 1] + 1] + [len(row)]
        spans.append(list(zip(starts[:-1], starts[1:])))
    return spans


def packed_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: query/key/value (batch, heads, positions, dim) -> output (batch, positions, heads, dim)."""
    position_ids = kwargs.get("position_ids")
    if not getattr(attention_mask, "packed_only", False) or position_ids is None or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for b, spans in enumerate(example_spans(position_ids.expand(query.shape[0], -1))):
        rows.append(torch.cat([
            sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], None,
                                   **kwargs)[0]
            for s, e in spans
        ], dim=1))
    return torch.cat(rows, dim=0), None


def packed_sdpa_mask(**kwargs):
    """sdpa's mask; when it only separates packed examples (no padding mask, no cache) it is marked, and the attention function
    splits by position_ids instead of applying it. A model that does not pass position_ids down gets the mask applied."""
    mask = sdpa_mask(**kwargs)
    if isinstance(mask, torch.Tensor) and kwargs.get("attention_mask") is None and kwargs["q_length"] == kwargs["kv_length"] \
            and not kwargs.get("kv_offset") and not kwargs.get("q_offset"):
        mask.packed_only = True
    return mask


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, packed_sdpa_mask)
