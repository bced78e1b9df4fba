"""`sdpa_packed`: attention that costs only the pairs inside each packed example.

    python sft_train.py recipes/demo.yaml packing=true      # picks model.attn_implementation=sdpa_packed

With packing, plain sdpa/eager attention gets a dense block-diagonal mask: every query-key pair of a 512-token row is computed
and most are then thrown away, and a masked sdpa call cannot use the fused causal kernel. `sdpa_packed` runs causal sdpa on
each example alone, so the work is sum(len_i^2) instead of row_length^2. The examples of each row come from the batch's
`packed_spans` (data/packing.py computes them once per micro-batch on the host; the model's forward hands them to every
attention layer as a keyword argument), so no layer reads position_ids back from the GPU. Anything that is not a packed
training forward (no spans, a padding mask, a KV cache, decoding) goes to transformers' sdpa with its mask, unchanged; so
does a model that does not hand keyword arguments down to attention, whose mask from position_ids still separates examples.
Importing this module registers the name; modeling/load.py imports it, so every model a run builds (training, export,
generate) and any config can set model.attn_implementation=sdpa_packed. Which kernel a packed run gets on which device,
and the batch layout of each, is training/attention.py's table. Under torch.compile (compile=true) this function runs outside the graph
and the spans reach it boxed (HostSpans): as Python values inside the graph, every new packing would recompile.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from training.attention import SDPA_PACKED as NAME


class HostSpans:
    """The batch's packed_spans in a box that torch.compile passes through without looking inside: as plain tuples, dynamo
    would guard on every row's number of examples and recompile for each new packing."""

    __slots__ = ("rows",)

    def __init__(self, rows):
        self.rows = rows


@torch.compiler.disable
def packed_sdpa_forward(module, query, key, value, attention_mask, packed_spans=None, **kwargs):
    """transformers attention function: query/key/value (batch, heads, positions, dim) -> output (batch, positions, heads, dim).
    Under torch.compile (compile=true) it runs outside the graph: one graph break per block, the spans stay host values."""
    if isinstance(packed_spans, HostSpans):
        packed_spans = packed_spans.rows
    if packed_spans is None or not getattr(attention_mask, "packed_only", False) or key.shape[2] != query.shape[2] \
            or len(packed_spans) != query.shape[0]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # unbind/split rather than slicing: the backward of a slice writes a zero tensor of the whole input for every example
    # and layer (the step's largest copy cost on CPU), that of a split is one concatenation. The spans cover each row.
    rows = []
    for spans, q, k, v in zip(packed_spans, query.unbind(0), key.unbind(0), value.unbind(0)):
        sizes = [e - s for s, e in spans]
        rows.append(torch.cat([
            sdpa_attention_forward(module, qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), None, **kwargs)[0]
            for qs, ks, vs in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))
        ], dim=1))
    return torch.cat(rows, dim=0), None


def packed_sdpa_mask(**kwargs):
    """sdpa's mask; when it only separates packed examples (no padding mask, no cache) it is marked, and the attention function
    splits by the spans instead of applying it."""
    mask = sdpa_mask(**kwargs)
    if isinstance(mask, torch.Tensor) and kwargs.get("attention_mask") is None and kwargs["q_length"] == kwargs["kv_length"] \
            and not kwargs.get("kv_offset") and not kwargs.get("q_offset"):
        mask.packed_only = True
    return mask


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, packed_sdpa_mask)
