"""Checkpoints of LoRA runs (peft adapters on a frozen base): what policy.pt and adapter.pt hold.

    layout = adapter_layout(model)                 # per adapted module: scale alpha / r and weight orientation
    policy = merged_state(full_state, layout)      # policy.pt: the plain model's keys, W + alpha / r * B A
    adapter = adapter_state(full_state)            # adapter.pt: what resume loads back (the frozen base is reloaded)

A LoRA layer computes W x + (alpha / r) * B A x with W frozen. Merging writes W + (alpha / r) * B A into W, so policy.pt stays
a plain state dict that DPO (or anything else) loads without peft. GPT-2's Conv1D stores W transposed (in x out), so its
update is transposed too; the orientation is read from peft's own layer (`fan_in_fan_out`), never guessed from shapes
(square matrices would be ambiguous). The adapters are built in modeling/lora.py.
"""

from __future__ import annotations

import torch

PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the transformers model)
ADAPTER = "default"  # peft's adapter name
WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")  # names that activation checkpointing and compile insert


def is_lora_key(key: str) -> bool:
    return f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers (or peft) model inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers (FSDP2 wraps in
    place)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def adapter_layout(model: torch.nn.Module) -> dict[str, tuple[float, bool]]:
    """{module name as in the peft state dict: (alpha / r, fan_in_fan_out)} for every adapted module."""
    from peft.tuners.lora import LoraLayer

    layout = {}
    for name, module in unwrap(model).named_modules():
        if isinstance(module, LoraLayer):
            for prefix in WRAPPERS:
                name = name.replace(prefix, "")
            layout[name] = (float(module.scaling[ADAPTER]), bool(getattr(module, "fan_in_fan_out", False)))
    return layout


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merged_state(state: dict[str, torch.Tensor], layout: dict[str, tuple[float, bool]]) -> dict[str, torch.Tensor]:
    """The plain model's state dict from a peft model's full one: every adapted weight becomes W + scale * B A (computed
    in fp32, stored in W's dtype), the adapter tensors are dropped and the peft prefixes removed."""
    merged = {}
    for key, value in state.items():
        if is_lora_key(key):
            continue
        module, _, leaf = key.rpartition(".base_layer.")
        if module in layout and leaf == "weight":
            scale, transposed = layout[module]
            delta = state[f"{module}.lora_B.{ADAPTER}.weight"].float() @ state[f"{module}.lora_A.{ADAPTER}.weight"].float()
            value = (value.float() + scale * (delta.T if transposed else delta)).to(value.dtype)
        plain = f"{module}.{leaf}" if module in layout else key
        merged[plain.removeprefix(PEFT_PREFIX)] = value
    return merged


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a peft model's state dict, under the peft model's own keys (what resume loads back)."""
    return {k: v for k, v in state.items() if is_lora_key(k)}


def dequantized(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """QLoRA: the state dict with every 4-bit base weight of an adapted module replaced by its dense value (in the compute
    dtype) and its quantization statistics dropped, so merged_state can add the adapters. Unsharded models only."""
    from peft.tuners.lora import LoraLayer

    dense = {}
    for name, module in unwrap(model).named_modules():
        weight = getattr(getattr(module, "base_layer", None), "weight", None)
        if isinstance(module, LoraLayer) and getattr(weight, "quant_state", None) is not None:
            import bitsandbytes.functional as bnbf

            dense[f"{name}.base_layer.weight"] = bnbf.dequantize_4bit(weight.data, weight.quant_state).cpu()
    if not dense:
        return state
    out = {k: v for k, v in state.items() if not any(k.startswith(d + ".") for d in dense)}
    return {k: dense.get(k, v) for k, v in out.items()}


def checkpoint_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], lora: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The weight files of a checkpoint from the gathered full state: {"policy.pt": ...} and, for a LoRA run, the merged
    policy plus {"adapter.pt": the adapters}."""
    if not lora:
        return {"policy.pt": state}
    state = dequantized(model, state)
    return {"policy.pt": merged_state(state, adapter_layout(model)), "adapter.pt": adapter_state(state)}
