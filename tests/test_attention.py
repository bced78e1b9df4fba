"""The attention-kernel table (training/attention.py): the default kernel per device and dtype, the layout each kernel gets,
and the packing rule."""

from __future__ import annotations

import pytest

from training import attention
from training.attention import (FLEX, PACKED_ROW_KERNELS, SDPA_PACKED, VARLEN, check_attention, is_flash_attention,
                                packed_layout, pick_attention, resolve_attention)
from training.config import ConfigError, build_config


@pytest.fixture(params=[True, False], ids=["varlen", "no-varlen"])
def varlen(request, monkeypatch) -> bool:
    """Both torch builds: with torch.nn.attention.varlen.varlen_attn (>= 2.10) and without."""
    monkeypatch.setattr(attention, "varlen_available", lambda: request.param)
    return request.param


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32", "tf32"])
def test_without_packing_transformers_chooses(varlen, device_type, dtype):
    assert pick_attention(False, device_type, dtype) is None


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "tf32", "bfloat16", "float32"])
def test_packing_off_cuda_is_sdpa_packed_whatever_the_dtype(varlen, dtype):
    assert pick_attention(True, "cpu", dtype) == SDPA_PACKED
    assert pick_attention(True, "mps", dtype) == SDPA_PACKED


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "bfloat16", "float16", "torch.bfloat16"])
def test_packing_on_cuda_in_half_precision_is_varlen_else_flex(varlen, dtype):
    assert pick_attention(True, "cuda", dtype) == (VARLEN if varlen else FLEX)


@pytest.mark.parametrize("dtype", ["fp32", "tf32", "float32"])
def test_packing_on_cuda_in_fp32_is_flex_attention(varlen, dtype):
    """The varlen kernel refuses fp32 q/k/v."""
    assert pick_attention(True, "cuda", dtype) == FLEX


def config(**model) -> object:
    return build_config({"exp_name": "x", "packing": True, "model": {"name_or_path": "m", **model}})


def test_resolve_uses_the_compute_dtype_of_the_parallel_mode(monkeypatch):
    """model.fsdp_policy_mp sets the matmul dtype under FSDP only; elsewhere policy_dtype does."""
    monkeypatch.setattr(attention, "varlen_available", lambda: True)
    for fsdp, expected in ((True, VARLEN), (False, FLEX)):
        c = config(policy_dtype="float32", fsdp_policy_mp="bfloat16")
        resolve_attention(c, "cuda", fsdp)
        assert c.model.attn_implementation == expected
    c = config(policy_dtype="bfloat16")
    resolve_attention(c, "cuda")
    assert c.model.attn_implementation == VARLEN
    c = config(policy_dtype="bfloat16")
    resolve_attention(c, "cpu")
    assert c.model.attn_implementation == SDPA_PACKED


def test_resolve_keeps_a_kernel_that_was_set():
    c = config(attn_implementation="eager")
    resolve_attention(c, "cuda")
    assert c.model.attn_implementation == "eager"
    c = build_config({"exp_name": "x", "model": {"name_or_path": "m"}})
    resolve_attention(c, "cuda")
    assert c.model.attn_implementation is None  # no packing: transformers chooses


def test_layouts():
    for name in PACKED_ROW_KERNELS + (None, "paged|sdpa"):
        assert packed_layout(name) == "rows"
    for name in ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2", VARLEN, FLEX):
        assert packed_layout(name) == "flat"
    assert is_flash_attention("flash_attention_2") and not is_flash_attention(FLEX) and not is_flash_attention(None)


def test_check_attention():
    for name in PACKED_ROW_KERNELS + (VARLEN, FLEX, "flash_attention_2", None):
        check_attention(True, name)
    check_attention(False, "paged|sdpa")
    with pytest.raises(ConfigError, match=r"model.attn_implementation=paged\|sdpa: that kernel is not known to keep packed "
                                          r"examples apart; use one of sdpa_packed, sdpa, eager, varlen_attn, flex_attention"):
        check_attention(True, "paged|sdpa")
