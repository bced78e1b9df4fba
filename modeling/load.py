"""Tokenizer and policy model from the config's `model` section.

    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, cache_dir)
"""

from __future__ import annotations

import logging

import torch
import transformers

from training.checkpoint import load_archive
from training.config import ModelConfig

log = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def load_tokenizer(model_config: ModelConfig):
    name = model_config.tokenizer_name_or_path or model_config.name_or_path
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=model_config.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no EOS token; SFT appends EOS to every response")
    if tokenizer.pad_token_id is None:
        # Safe here: labels are built from unpadded sequences, so padding never masks the supervised EOS.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_model(model_config: ModelConfig, cache_dir: str | None = None, **kwargs) -> transformers.PreTrainedModel:
    """The policy in `policy_dtype`, dropout off, `archive` loaded strictly. kwargs go to from_pretrained (e.g. device_map)."""
    dtype = torch_dtype(model_config.policy_dtype)
    common = dict(trust_remote_code=model_config.trust_remote_code)
    if model_config.attn_implementation:
        common["attn_implementation"] = model_config.attn_implementation
    if model_config.random_init:
        config = transformers.AutoConfig.from_pretrained(model_config.name_or_path, **common)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_config.name_or_path, cache_dir=cache_dir, dtype=dtype, **common, **kwargs
        )
    disable_dropout(model)
    if model_config.archive is not None and not receives_weights_from_rank0():
        archive = load_archive(model_config.archive)
        log.info("loading archive %s (step %s, metrics %s)", model_config.archive, archive["step_idx"], archive["metrics"])
        model.load_state_dict(archive["state"])
    return model


def receives_weights_from_rank0() -> bool:
    """FSDP with cpu_ram_efficient_loading: only local rank 0 holds real weights and sends them out when the model is
    prepared, so the other processes skip reading the archive too (one CPU copy per machine, not one per GPU)."""
    from transformers.distributed.fsdp import is_fsdp_enabled
    from transformers.distributed.utils import is_local_dist_rank_0

    return is_fsdp_enabled() and not is_local_dist_rank_0()
