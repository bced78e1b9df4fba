"""modeling.legacy_keys against facts from transformers 4.29.2 (recorded by fixtures/keys_transformers_4.29/record.py).

    python -m pytest tests/test_legacy_keys.py
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modeling.legacy_keys import to_transformers_429

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "keys_transformers_4.29"
CASES = json.loads((FIXTURES / "configs.json").read_text())["cases"]
BUFFERS = json.loads((FIXTURES / "buffers.json").read_text())
DTYPES = ["float32", "bfloat16", "float16"]


def tiny_config(case: str, **overrides):
    spec = CASES[case]
    return AutoConfig.for_model(spec["model_type"], **{**spec["kwargs"], **overrides})


def tiny_state(case: str, dtype: str = "float32") -> tuple[dict[str, torch.Tensor], object]:
    torch.manual_seed(0)
    config = tiny_config(case)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.state_dict(), config


def recorded_keys(case: str, dtype: str) -> list[tuple[str, list[int], str]]:
    lines = (FIXTURES / f"{case}.{dtype}.keys.txt").read_text().splitlines()
    return [(key, json.loads(shape), dtype_name) for key, shape, dtype_name in (line.split(" ") for line in lines)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers_429(case: str, dtype: str) -> None:
    state, config = tiny_state(case, dtype)
    converted = to_transformers_429(state, config)

    recorded = recorded_keys(case, dtype)
    assert list(converted) == [key for key, _, _ in recorded]
    for key, shape, dtype_name in recorded:
        assert list(converted[key].shape) == shape, key
        assert str(converted[key].dtype) == f"torch.{dtype_name}", key

    # Weights pass through untouched (the same tensors), GPT-NeoX's head under its 4.29 name.
    old_name = {"lm_head.weight": "embed_out.weight"} if config.model_type == "gpt_neox" else {}
    for key, value in state.items():
        assert converted[old_name.get(key, key)] is value, key

    # Every other key is a buffer 4.29 saved, with the recorded values.
    facts = BUFFERS[case][dtype]
    assert set(converted) - {old_name.get(key, key) for key in state} == set(facts)
    for key, fact in facts.items():
        value = converted[key]
        assert value.double().sum().item() == fact["sum"], key
        if "rows" in fact:
            rows = value.reshape(-1, value.shape[-1])
            assert ["".join("1" if bit else "0" for bit in row.tolist()) for row in rows] == fact["rows"], key
        else:
            assert value.double().flatten().tolist() == fact["values"], key


def test_pythia_head_is_renamed() -> None:
    state, config = tiny_state("gpt_neox")
    converted = to_transformers_429(state, config)
    assert "lm_head.weight" not in converted
    assert converted["embed_out.weight"] is state["lm_head.weight"]


def test_tied_head_missing_from_state_is_filled_from_embedding() -> None:
    state, config = tiny_state("llama_tied")
    assert config.tie_word_embeddings
    del state["lm_head.weight"]
    converted = to_transformers_429(state, config)
    assert list(converted) == [key for key, _, _ in recorded_keys("llama_tied", "float32")]
    assert converted["lm_head.weight"] is state["model.embed_tokens.weight"]


def test_untied_head_missing_from_state_raises() -> None:
    state, config = tiny_state("llama")
    del state["lm_head.weight"]
    with pytest.raises(ValueError, match=r"llama state_dict .* missing \['lm_head.weight'\]"):
        to_transformers_429(state, config)


def test_layer_buffers_follow_the_config() -> None:
    # 4.29 sizes the mask by max_position_embeddings and reads GPT-NeoX's rotary fraction and base from the config.
    config = tiny_config("gpt_neox", max_position_embeddings=7, rotary_pct=1.0, rotary_emb_base=10)
    state = AutoModelForCausalLM.from_config(config).state_dict()
    converted = to_transformers_429(state, config)
    assert torch.equal(converted["gpt_neox.layers.1.attention.bias"][0, 0], torch.ones(7, 7, dtype=torch.bool).tril())
    head_size = config.hidden_size // config.num_attention_heads
    expected = torch.tensor([10.0 ** (-2 * j / head_size) for j in range(head_size // 2)], dtype=torch.float32)
    torch.testing.assert_close(converted["gpt_neox.layers.0.attention.rotary_emb.inv_freq"], expected)


def test_unsupported_family_raises() -> None:
    config = AutoConfig.for_model("opt", num_hidden_layers=1, hidden_size=16, num_attention_heads=2, ffn_dim=32)
    with pytest.raises(ValueError, match=r"'opt'.*supported: gpt2, gpt_neox, gptj, llama"):
        to_transformers_429({}, config)


def test_state_with_keys_429_cannot_hold_raises() -> None:
    config = tiny_config("llama", attention_bias=True)
    state = AutoModelForCausalLM.from_config(config).state_dict()
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.self_attn.k_proj.bias'"):
        to_transformers_429(state, config)


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        ({"rope_theta": 500000.0}, "rope_theta 500000.0"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ],
)
def test_llama_config_429_cannot_express_raises(overrides: dict, culprit: str) -> None:
    config = tiny_config("llama", **overrides)
    state = AutoModelForCausalLM.from_config(config).state_dict()
    with pytest.raises(ValueError, match=culprit):
        to_transformers_429(state, config)
