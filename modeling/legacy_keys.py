"""A current state_dict in the layout of transformers 4.29, for DPO codebases pinned to that release.

Those codebases load `policy.pt["state"]` with `load_state_dict(strict=True)` into a 4.29 model, whose state_dict also
holds buffers that current transformers no longer saves (causal masks, `masked_bias`, RoPE `inv_freq`) and names
GPT-NeoX's head `embed_out`. Usage:

    from modeling.legacy_keys import to_transformers_429
    state = to_transformers_429(model.state_dict(), model.config)
    torch.save({"step_idx": examples_seen, "state": state, "metrics": metrics}, "LATEST/policy.pt")

The layouts below were read off transformers 4.29.2; tests/fixtures/keys_transformers_4.29/ holds the recorded facts.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

# Keys in 4.29's state_dict order: (before the layers, per layer with "{i}" the layer index, after the layers).
_LAYOUTS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "gpt2": (
        ["transformer.wte.weight", "transformer.wpe.weight"],
        [
            "transformer.h.{i}.ln_1.weight",
            "transformer.h.{i}.ln_1.bias",
            "transformer.h.{i}.attn.bias",
            "transformer.h.{i}.attn.masked_bias",
            "transformer.h.{i}.attn.c_attn.weight",
            "transformer.h.{i}.attn.c_attn.bias",
            "transformer.h.{i}.attn.c_proj.weight",
            "transformer.h.{i}.attn.c_proj.bias",
            "transformer.h.{i}.ln_2.weight",
            "transformer.h.{i}.ln_2.bias",
            "transformer.h.{i}.mlp.c_fc.weight",
            "transformer.h.{i}.mlp.c_fc.bias",
            "transformer.h.{i}.mlp.c_proj.weight",
            "transformer.h.{i}.mlp.c_proj.bias",
        ],
        ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"],
    ),
    # GPT-J's mask and masked_bias were already non-persistent in 4.29: same keys as today.
    "gptj": (
        ["transformer.wte.weight"],
        [
            "transformer.h.{i}.ln_1.weight",
            "transformer.h.{i}.ln_1.bias",
            "transformer.h.{i}.attn.k_proj.weight",
            "transformer.h.{i}.attn.v_proj.weight",
            "transformer.h.{i}.attn.q_proj.weight",
            "transformer.h.{i}.attn.out_proj.weight",
            "transformer.h.{i}.mlp.fc_in.weight",
            "transformer.h.{i}.mlp.fc_in.bias",
            "transformer.h.{i}.mlp.fc_out.weight",
            "transformer.h.{i}.mlp.fc_out.bias",
        ],
        ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight", "lm_head.bias"],
    ),
    "gpt_neox": (
        ["gpt_neox.embed_in.weight"],
        [
            "gpt_neox.layers.{i}.input_layernorm.weight",
            "gpt_neox.layers.{i}.input_layernorm.bias",
            "gpt_neox.layers.{i}.post_attention_layernorm.weight",
            "gpt_neox.layers.{i}.post_attention_layernorm.bias",
            "gpt_neox.layers.{i}.attention.bias",
            "gpt_neox.layers.{i}.attention.masked_bias",
            "gpt_neox.layers.{i}.attention.rotary_emb.inv_freq",
            "gpt_neox.layers.{i}.attention.query_key_value.weight",
            "gpt_neox.layers.{i}.attention.query_key_value.bias",
            "gpt_neox.layers.{i}.attention.dense.weight",
            "gpt_neox.layers.{i}.attention.dense.bias",
            "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight",
            "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias",
            "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight",
            "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias",
        ],
        ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"],
    ),
    # 4.29 registered down_proj before up_proj.
    "llama": (
        ["model.embed_tokens.weight"],
        [
            "model.layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
            "model.layers.{i}.self_attn.o_proj.weight",
            "model.layers.{i}.self_attn.rotary_emb.inv_freq",
            "model.layers.{i}.mlp.gate_proj.weight",
            "model.layers.{i}.mlp.down_proj.weight",
            "model.layers.{i}.mlp.up_proj.weight",
            "model.layers.{i}.input_layernorm.weight",
            "model.layers.{i}.post_attention_layernorm.weight",
        ],
        ["model.norm.weight", "lm_head.weight"],
    ),
}

# 4.29 name -> current name, where they differ.
_RENAMED = {"gpt_neox": {"embed_out.weight": "lm_head.weight"}}

# (output head, input embedding) under current names, for states that leave out a tied head.
_HEAD_AND_EMBEDDING = {
    "gpt2": ("lm_head.weight", "transformer.wte.weight"),
    "gptj": ("lm_head.weight", "transformer.wte.weight"),
    "gpt_neox": ("lm_head.weight", "gpt_neox.embed_in.weight"),
    "llama": ("lm_head.weight", "model.embed_tokens.weight"),
}


def _causal_mask(positions: int, device: torch.device) -> torch.Tensor:
    mask = torch.tril(torch.ones((positions, positions), dtype=torch.bool, device=device))
    return mask.view(1, 1, positions, positions)


def _inv_freq(dim: int, base: float, device: torch.device) -> torch.Tensor:
    # The exact float32 expression 4.29 evaluates, so the values match bit for bit.
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))


def _rope_parameters(config: PretrainedConfig) -> dict:
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"{config.model_type}: rope_type {rope['rope_type']!r} has no transformers 4.29 equivalent"
            " (it has plain RoPE only)"
        )
    return rope


def _layer_buffers(config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """4.29's per-layer buffers, keyed like the layout templates.

    Masks are bool, `masked_bias` has the model's dtype (4.29 built it with the default dtype that `torch_dtype` sets)
    and `inv_freq` is always float32. Every layer shares one tensor: the values are identical, and torch.save then
    writes each buffer once.
    """
    model_type = config.model_type
    if model_type == "gpt2":
        return {
            "transformer.h.{i}.attn.bias": _causal_mask(config.max_position_embeddings, device),
            "transformer.h.{i}.attn.masked_bias": torch.tensor(-1e4, dtype=dtype, device=device),
        }
    if model_type == "gpt_neox":
        rope = _rope_parameters(config)
        head_size = config.hidden_size // config.num_attention_heads
        rotary_dim = int(head_size * rope["partial_rotary_factor"])
        return {
            "gpt_neox.layers.{i}.attention.bias": _causal_mask(config.max_position_embeddings, device),
            # -1e9 overflows to -inf in float16; 4.29 stored it that way too.
            "gpt_neox.layers.{i}.attention.masked_bias": torch.tensor(-1e9, dtype=dtype, device=device),
            "gpt_neox.layers.{i}.attention.rotary_emb.inv_freq": _inv_freq(rotary_dim, rope["rope_theta"], device),
        }
    if model_type == "llama":
        rope = _rope_parameters(config)
        # 4.29's Llama hard-codes base 10000 and computes its cos/sin cache at init, so a loaded inv_freq would not
        # even take effect: a model trained with another theta cannot run there.
        if rope["rope_theta"] != 10000:
            raise ValueError(
                f"llama: rope_theta {rope['rope_theta']} differs from the 10000 that transformers 4.29 hard-codes"
            )
        head_dim = config.hidden_size // config.num_attention_heads
        if config.num_key_value_heads != config.num_attention_heads or config.head_dim != head_dim:
            raise ValueError(
                f"llama: transformers 4.29 needs num_key_value_heads == num_attention_heads and head_dim == hidden_size"
                f" / num_attention_heads (got {config.num_key_value_heads}, {config.num_attention_heads},"
                f" {config.head_dim}, {config.hidden_size})"
            )
        return {"model.layers.{i}.self_attn.rotary_emb.inv_freq": _inv_freq(head_dim, 10000, device)}
    return {}


def to_transformers_429(state: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """`state` (a current `AutoModelForCausalLM.state_dict()`) with 4.29's keys, order and extra buffers.

    Weight tensors are passed through, not copied. A tied head missing from `state` is filled with the input embedding,
    as 4.29 lists both. Raises ValueError for an unsupported model_type, a config 4.29 cannot express, or a state whose
    keys do not match the layout (naming the missing and unexpected keys).
    """
    model_type = config.model_type
    if model_type not in _LAYOUTS:
        raise ValueError(
            f"no transformers 4.29 layout for model_type {model_type!r}; supported: {', '.join(sorted(_LAYOUTS))}"
        )
    before, per_layer, after = _LAYOUTS[model_type]
    renamed = _RENAMED.get(model_type, {})
    head, embedding = _HEAD_AND_EMBEDDING[model_type]
    source = dict(state)
    if head not in source and config.tie_word_embeddings and embedding in source:
        source[head] = source[embedding]
    if embedding not in source:
        raise ValueError(f"{model_type} state_dict has no {embedding!r}")

    reference = source[embedding]
    buffers = _layer_buffers(config, reference.dtype, reference.device)
    # (4.29 key, layout template) in 4.29 order.
    order = (
        [(key, key) for key in before]
        + [(template.format(i=i), template) for i in range(config.num_hidden_layers) for template in per_layer]
        + [(key, key) for key in after]
    )
    wanted = {renamed.get(key, key) for key, template in order if template not in buffers}
    missing, unexpected = sorted(wanted - source.keys()), sorted(source.keys() - wanted)
    if missing or unexpected:
        raise ValueError(
            f"{model_type} state_dict does not match the transformers 4.29 layout for this config:"
            f" missing {missing[:5]} ({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    return {
        key: buffers[template] if template in buffers else source[renamed.get(key, key)] for key, template in order
    }


def from_transformers_429(state: dict[str, torch.Tensor], config: PretrainedConfig,
                          expected: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A policy.pt state written under transformers 4.29 (e.g. by the reference DPO code), made loadable strictly.

    Only the buffers 4.29 saved and current transformers does not (`expected` is the current model's state_dict keys) are
    dropped, each after checking it holds 4.29's default value, and GPT-NeoX's `embed_out.weight` is renamed to
    `lm_head.weight`. Every other key is left alone, so a strict load still refuses anything else that does not fit. Returns
    (state, dropped keys); raises ValueError naming a legacy buffer whose value is not the default (a modified model).
    """
    model_type = config.model_type
    if model_type not in _LAYOUTS:
        return state, []
    source = state
    for old, new in _RENAMED.get(model_type, {}).items():
        if old in source and old not in expected and new not in source and new in expected:
            source = {(new if k == old else k): v for k, v in source.items()}
    legacy = [k for k in source if k not in expected and _legacy_template(k, model_type) is not None]
    if not legacy:
        return source, []
    sample = next((v for k, v in source.items() if v.is_floating_point() and k not in legacy), None)
    buffers = _layer_buffers(config, sample.dtype if sample is not None else torch.float32, torch.device("cpu"))
    for key in legacy:
        template = _legacy_template(key, model_type)
        value, default = source[key].cpu(), buffers.get(template)
        if default is None:
            continue
        if default.dtype == torch.bool:
            same = value.shape == default.shape and bool(((value == 0) | (value == 1)).all()) and torch.equal(value.bool(), default)
        else:
            same = value.shape == default.shape and torch.equal(value.float(), default.to(value.dtype).float())
        if not same:
            raise ValueError(f"{key}: this transformers 4.29 buffer does not hold its default value, so the weights were made "
                             f"for a modified model; refusing to drop it")
    return {k: v for k, v in source.items() if k not in legacy}, legacy


def _legacy_template(key: str, model_type: str) -> str | None:
    """The layout template of a per-layer 4.29-only buffer key (`...h.{i}.attn.bias`), or None."""
    parts = key.split(".")
    for n, part in enumerate(parts):
        if part.isdigit():
            template = ".".join(parts[:n] + ["{i}"] + parts[n + 1:])
            if template in _LEGACY_BUFFERS.get(model_type, ()):
                return template
    return None


# Per-layer buffers that 4.29 saved and current transformers keeps out of state_dict (or no longer has).
_LEGACY_BUFFERS = {
    "gpt2": ("transformer.h.{i}.attn.bias", "transformer.h.{i}.attn.masked_bias"),
    "gpt_neox": ("gpt_neox.layers.{i}.attention.bias", "gpt_neox.layers.{i}.attention.masked_bias",
                 "gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"),
    "llama": ("model.layers.{i}.self_attn.rotary_emb.inv_freq",),
}
