"""`varlen_attn`: packed examples through PyTorch's own varlen flash attention, one kernel call per layer.

    python sft_train.py recipes/pythia28_hh.yaml packing=true model.attn_implementation=varlen_attn   # CUDA, bf16/fp16

A packed micro-batch in the flat layout (data/packing.py) is ONE row of all its examples with `cu_seq_lens_q/k` (int32
offsets [0, len_0, len_0 + len_1, ...], computed on the host in collate) and `max_length_q/k` (Python ints). The model's
forward hands those keyword arguments down to every attention layer, and here they go straight to
`torch.nn.attention.varlen.varlen_attn`: causal attention inside each example, no pair across examples computed, no mask
built (the mask function below returns None), nothing read back from the device (no `.item()`, no `tolist()`). varlen_attn
is a torch custom op with a fake (meta) implementation, so torch.compile traces it inside the block's graph; the offsets are
a tensor and the max lengths ints, which `dynamic=True` makes symbols: no recompile per packing.

The kernel's signature changed between releases and is read once, at import (`detect`): torch 2.10 takes `is_causal=True`,
2.11+ takes `window_size=(-1, 0)`; `enable_gqa` where it exists, else K/V heads are repeated for grouped-query models. The
kernel takes bf16/fp16 only: q/k/v are cast to the compute dtype (autocast's, else the projections'), since rotary
embedding with fp32 cos/sin upcasts q and k under autocast. The output stays in the compute dtype, which is what the output
projection takes (and what sdpa returns under autocast).

Everything that is not a packed training forward goes to transformers' sdpa with sdpa's mask, unchanged: no
`cu_seq_lens_q` (a padded batch, a plain forward), a padding mask, a KV cache or decoding. Where the kernel is missing or
cannot take the dtype (fp32 compute: fp32 weights without autocast), the same flat row runs FlexAttention with a
document mask built from `cu_seq_lens_q` (`document_block_mask`, once per forward), outside any compiled graph; the
suite picks `flex_attention` (transformers' own, which builds the same document mask from the restarting position_ids)
for fp32 instead. Models whose attention does not receive the forward's keyword arguments, or that use a sliding window,
are not served here: use sdpa_packed (rows layout) for them.

Importing this module registers the name; modeling/load.py imports it. `reference_varlen_attn` is a CPU stand-in for the
kernel (per-example causal sdpa over the offsets) with which tests run this whole path on CPU (`stand_in_kernel`).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from training.attention import VARLEN

log = logging.getLogger(__name__)

NAME = VARLEN
HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class VarlenKernel:
    """How to call one varlen attention function: its causal keyword(s), whether it takes enable_gqa and scale, and the
    dtypes it accepts."""

    call: Callable
    causal: dict  # {"is_causal": True} (torch 2.10) or {"window_size": (-1, 0)} (2.11+)
    gqa: bool  # takes enable_gqa (else K/V heads are repeated)
    scale: bool  # takes scale (else only the default 1/sqrt(head_dim) is possible)
    dtypes: tuple[torch.dtype, ...] = HALF


def detect(fn: Callable, dtypes: tuple[torch.dtype, ...] = HALF) -> VarlenKernel:
    """The calling convention of `fn` from its signature (torch.nn.attention.varlen.varlen_attn of any release)."""
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        raise TypeError(f"{getattr(fn, '__qualname__', fn)} takes neither window_size nor is_causal: cannot ask it for "
                        f"causal attention")
    return VarlenKernel(fn, causal, "enable_gqa" in params, "scale" in params, dtypes)


def torch_kernel() -> VarlenKernel | None:
    """torch's varlen_attn, or None where this torch has none (before 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return detect(varlen_attn)


KERNEL: VarlenKernel | None = torch_kernel()  # tests replace it with stand_in_kernel()


def compute_dtype(module: torch.nn.Module, value: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's where it is on; else that of the value projection's output (rotary
    embedding never touches V); if that is fp32, the dtype of the module's weights (a bf16 module whose q/k/v came in
    fp32). Under FSDP mixed precision V comes out of the projection in the compute dtype, so the weights (sharded, in
    the master dtype) are not asked then."""
    device = value.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if value.dtype in HALF:
        return value.dtype
    weight = next(module.parameters(), None)
    return weight.dtype if weight is not None and weight.is_floating_point() else value.dtype


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                             cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers attention function: query/key/value (1, heads, total, dim) of the flat packed row -> output
    (1, total, heads, dim). Anything else goes to sdpa (see the module docstring)."""
    if cu_seq_lens_q is None or attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(f"{NAME}: {type(module).__name__} uses a sliding window; use sdpa_packed")
    if dropout and module.training:
        raise NotImplementedError(f"{NAME} has no attention dropout (dropout={dropout}); the suite trains with dropout off")
    cu_seq_lens_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    max_length_k = max_length_q if max_length_k is None else max_length_k
    dtype = compute_dtype(module, value)
    kernel = KERNEL
    if kernel is None or dtype not in kernel.dtypes:
        warn_once(f"{NAME}: {'no varlen kernel in this torch' if kernel is None else f'the kernel takes no {dtype}'}; "
                  f"the packed row runs FlexAttention with a document mask (slower; compute in bf16 for the kernel)")
        return document_flex_attention(module, query, key, value, cu_seq_lens_q, scaling)
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1 and not kernel.gqa:
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    options = dict(kernel.causal)
    if kernel.gqa:
        options["enable_gqa"] = n_rep > 1
    if kernel.scale:
        options["scale"] = scaling
    elif scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-6 * scaling:
        raise NotImplementedError(f"{NAME}: this torch's varlen_attn takes no scale, and {type(module).__name__} scales "
                                  f"attention by {scaling}")
    # (1, heads, total, dim) -> (total, heads, dim), the kernel's layout: a view of the projections' output.
    q, k, v = (t.transpose(1, 2)[0].to(dtype) for t in (query, key, value))
    out = kernel.call(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **options)
    return out.unsqueeze(0), None


def varlen_mask(**kwargs):
    """No mask where attention needs none: a flat packed row (the kernel separates the examples by cu_seq_lens) or a plain
    causal batch (sdpa's causal kernel); sdpa's mask for a padding mask or a cache."""
    if kwargs.get("attention_mask") is None and kwargs["q_length"] == kwargs["kv_length"] \
            and not kwargs.get("q_offset") and not kwargs.get("kv_offset"):
        return None
    return sdpa_mask(**kwargs)


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                          enable_gqa=False):
    """What varlen_attn computes, on CPU, in any dtype: (total, heads, dim) split at cu_seq_q, causal within each sequence
    when window_size is (-1, 0). Reads the offsets back (tolist): tests only."""
    if window_size not in ((-1, 0), (-1, -1)):
        raise ValueError(f"window_size {window_size}: only full (-1, -1) or causal (-1, 0) here")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"{query.shape[1]} query heads, {key.shape[1]} key heads: needs enable_gqa=True")
    bounds = cu_seq_q.tolist()
    parts = [F.scaled_dot_product_attention(query[s:e].transpose(0, 1), key[s:e].transpose(0, 1), value[s:e].transpose(0, 1),
                                            is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa)
             for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=1).transpose(0, 1).contiguous()  # the kernel's output is contiguous


def stand_in_kernel(dtypes: tuple[torch.dtype, ...] = (torch.float32, *HALF)) -> VarlenKernel:
    """reference_varlen_attn as the kernel (tests: `monkeypatch.setattr(varlen_attention, "KERNEL", stand_in_kernel())`)."""
    return detect(reference_varlen_attn, dtypes)


_BLOCK_MASK: list = [None, None]  # (cu_seq_lens tensor, its BlockMask): every layer of one forward gets the same tensor


def document_block_mask(cu_seq_lens: torch.Tensor, total: int):
    """FlexAttention BlockMask of causal attention inside each sequence of the flat row, from the offsets on the device
    (searchsorted: nothing read back); built once per forward, reused by the forward's other layers."""
    from torch.nn.attention.flex_attention import create_block_mask

    if _BLOCK_MASK[0] is cu_seq_lens and _BLOCK_MASK[1].shape[-1] == total:
        return _BLOCK_MASK[1]
    positions = torch.arange(total, device=cu_seq_lens.device)
    document = torch.searchsorted(cu_seq_lens[1:].to(positions.dtype), positions, right=True)

    def causal_document(batch, head, q, kv):
        return (document[q] == document[kv]) & (q >= kv)

    mask = create_block_mask(causal_document, 1, None, total, total, device=cu_seq_lens.device)
    _BLOCK_MASK[:] = [cu_seq_lens, mask]
    return mask


@torch.compiler.disable
def document_flex_attention(module, query, key, value, cu_seq_lens, scaling):
    """The flat row through transformers' flex_attention with the document mask (CPU: forward only, flex has no CPU
    backward)."""
    from transformers.integrations.flex_attention import flex_attention_forward

    dtype = compute_dtype(module, value)
    query, key, value = (t.to(dtype) for t in (query, key, value))
    return flex_attention_forward(module, query, key, value, document_block_mask(cu_seq_lens, query.shape[2]),
                                  scaling=scaling)


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


AttentionInterface.register(NAME, varlen_attention_forward)
AttentionMaskInterface.register(NAME, varlen_mask)
