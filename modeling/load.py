"""Tokenizer and policy model from the config's `model` section.

    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, cache_dir)
"""

from __future__ import annotations

import contextlib
import logging

import torch
import transformers

import modeling.packed_attention  # noqa: F401  registers model.attn_implementation=sdpa_packed for every model built here
import modeling.varlen_attention  # noqa: F401  and varlen_attn
from modeling.legacy_keys import from_transformers_429
from training.checkpoint import CheckpointError, load_archive
from training.config import ModelConfig
from training.tokenizer import load_tokenizer  # noqa: F401  (where callers of modeling.load expect it)

log = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def model_kwargs(model_config: ModelConfig) -> dict:
    """Arguments every transformers model construction of a run shares."""
    kwargs = dict(trust_remote_code=model_config.trust_remote_code)
    if model_config.attn_implementation:
        kwargs["attn_implementation"] = model_config.attn_implementation
    return kwargs


def model_from_config(model_config: ModelConfig, device: str | torch.device | None = None) -> transformers.PreTrainedModel:
    """The model's architecture from its config.json with fresh (random) weights in `policy_dtype`, built on `device`
    ("meta": structure only, no memory)."""
    common = model_kwargs(model_config)
    config = transformers.AutoConfig.from_pretrained(model_config.name_or_path, **common)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype(model_config.policy_dtype), **common)


def load_model(model_config: ModelConfig, cache_dir: str | None = None, role: str = "policy",
               **kwargs) -> transformers.PreTrainedModel:
    """The policy in `policy_dtype`, dropout off, `archive` loaded strictly. `role` names the model in the log (DPO loads
    the reference too). kwargs go to from_pretrained (e.g. device_map)."""
    if model_config.random_init:
        model = model_from_config(model_config)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_config.name_or_path, cache_dir=cache_dir, dtype=torch_dtype(model_config.policy_dtype),
            **model_kwargs(model_config), **kwargs,
        )
    disable_dropout(model)
    if model_config.archive is not None and not receives_weights_from_rank0():
        load_archive_state(model, model_config.archive, role)
    return model


def load_archive_state(model: torch.nn.Module, path: str, role: str = "policy") -> None:
    """policy.pt's state into `model`, strictly. A file written under transformers 4.29 (the reference's own policy.pt) loads
    too: exactly its known extra buffers are dropped, after checking they hold their defaults (modeling/legacy_keys.py)."""
    archive = load_archive(path)
    log.info("loading archive %s into the %s (step %s, metrics %s)", path, role, archive["step_idx"], archive["metrics"])
    try:
        state, dropped = from_transformers_429(archive["state"], model.config, set(model.state_dict()))
    except ValueError as e:
        raise CheckpointError(f"model.archive {path}: {e}") from None
    if dropped:
        log.info("model.archive %s: dropped %d transformers-4.29 buffers holding their defaults (%s, ...)", path, len(dropped), dropped[0])
    problem = state_mismatch(state, model.state_dict())
    if problem:
        raise CheckpointError(f"model.archive {path} does not fit {type(model).__name__} ({model.config.model_type} from "
                              f"{model.config.name_or_path or 'its config'}): {problem}; give the archive of a run of this model, "
                              "or set model.name_or_path to the model the archive was trained from")
    model.load_state_dict(state)


def state_mismatch(state: dict, expected: dict, show: int = 3) -> str | None:
    """What keeps `state` from loading strictly into a model whose state dict is `expected`: counts, and the first few
    keys of each kind (a 7B archive of another architecture misses hundreds)."""
    def few(keys: list[str]) -> str:
        return ", ".join(keys[:show]) + (", ..." if len(keys) > show else "")

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in expected
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = [f"{what}: {len(keys)} ({few(keys)})" for what, keys in (("keys missing from the archive", missing),
                                                                    ("keys the model does not have", unexpected),
                                                                    ("shapes that differ (archive vs model)", shapes)) if keys]
    return "; ".join(parts) or None


def receives_weights_from_rank0() -> bool:
    """FSDP with cpu_ram_efficient_loading: only local rank 0 holds real weights and sends them out when the model is
    prepared, so the other processes skip reading the archive too (one CPU copy per machine, not one per GPU)."""
    from transformers.distributed.fsdp import is_fsdp_enabled
    from transformers.distributed.utils import is_local_dist_rank_0

    return is_fsdp_enabled() and not is_local_dist_rank_0()
