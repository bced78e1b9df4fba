"""The attention kernels the suite knows: which one a run uses and how a packed micro-batch is laid out for it.

    name = pick_attention(packing=True, device_type="cuda", dtype="bf16")   # "varlen_attn" (model.attn_implementation=null)
    layout = packed_layout(name)                                            # "flat": one row + cu_seq_lens (data/packing.py)
    check_attention(config.packing, config.model.attn_implementation)      # refuses kernels that would mix packed examples

Packed examples must not attend to each other. Two layouts do that (data/packing.py builds them):
- "rows" (PACKED_ROW_KERNELS): rows of at most max_length tokens. `sdpa_packed` (modeling/packed_attention.py) attends within
  each example from spans computed once per micro-batch; `sdpa` and `eager` get a block-diagonal mask from position_ids.
- "flat" (flash-attention kernels, `varlen_attn`, `flex_attention`): ONE row of the whole micro-batch with int32
  `cu_seq_lens_*` offsets and `max_length_*` host ints. transformers only infers packing from position_ids for one row;
  several packed rows would run as plain causal attention across examples.

`model.attn_implementation=null` is filled in by `resolve_attention` once the device is known (training/loop.py start_run,
after the accelerator is built, before validation): on CUDA the packed kernel depends on the dtype the matmuls run in, and
that depends on the parallel mode (model.fsdp_policy_mp applies under FSDP only), which only the accelerator knows. Under
`accelerate launch` every process resolves it alike from its own accelerator (same device type, same mode), so all ranks
run the same kernel; `--cpu` on a GPU machine gets the CPU kernel. The resolved name is what config.yaml records.
"""

from __future__ import annotations

from training.config import ConfigError

SDPA_PACKED = "sdpa_packed"  # registered by modeling/packed_attention.py: the CPU path for packed rows
PACKED_ROW_KERNELS = (SDPA_PACKED, "sdpa", "eager")  # keep packed examples apart within rows of max_length
VARLEN = "varlen_attn"  # registered by modeling/varlen_attention.py: torch.nn.attention.varlen on the flat row
FLEX = "flex_attention"  # transformers' FlexAttention, a document mask over the flat row
HALF = ("bf16", "fp16", "bfloat16", "float16")  # dtype names for which the varlen kernel runs (it refuses fp32 q/k/v)


def is_flash_attention(name: str | None) -> bool:
    """transformers' flash-attention kernels: flash_attention_2/3, hub kernels such as kernels-community/flash-attn2."""
    return name is not None and "flash" in name


def packed_layout(name: str | None) -> str:
    """`flat` (one row + cu_seq_lens) for flash kernels, varlen_attn and flex_attention; `rows` for the others."""
    return "flat" if is_flash_attention(name) or name in (VARLEN, FLEX) else "rows"


def varlen_available() -> bool:
    """Whether this torch has torch.nn.attention.varlen.varlen_attn (torch >= 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def pick_attention(packing: bool, device_type: str, dtype: str) -> str | None:
    """The kernel for model.attn_implementation=null. `dtype`: the dtype the matmuls run in (training/throughput.py
    compute_dtype's bf16/tf32/fp32, or a torch dtype name). None (no packing) lets transformers choose."""
    if not packing:
        return None
    if device_type != "cuda":
        return SDPA_PACKED
    if str(dtype).removeprefix("torch.") in HALF and varlen_available():
        return VARLEN
    return FLEX


def resolve_attention(config, device_type: str, fsdp: bool = False) -> None:
    """Fill a null model.attn_implementation with pick_attention's kernel for this device and compute dtype (in place)."""
    from training.throughput import compute_dtype

    m = config.model
    if m.attn_implementation is None:
        dtype = compute_dtype(m.policy_dtype, m.fsdp_policy_mp, fsdp, config.allow_tf32)
        m.attn_implementation = pick_attention(config.packing, device_type, dtype)


def check_attention(packing: bool, name: str | None) -> None:
    """With packing, the kernel must keep packed examples apart (null: picked for the device, always one that does)."""
    if packing and name is not None and name not in PACKED_ROW_KERNELS and packed_layout(name) != "flat":
        raise ConfigError(f"packing=true with model.attn_implementation={name}: that kernel is not known to keep packed "
                          f"examples apart; use one of {', '.join(PACKED_ROW_KERNELS + (VARLEN, FLEX))}, a flash-attention "
                          "kernel (flash_attention_2) or packing=false")
