"""The precision the recipe asks for and no other, and an MFU that can be quoted (its formula checked by hand on CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers

import sft_train
from tests.tiny import tiny_data, tiny_model_dir, tiny_run_args
from training.config import ConfigError, build_config
from training.distributed import set_matmul_precision
from training.throughput import compute_dtype, device_peak_flops, model_flops, step_throughput


@pytest.fixture
def fresh_accelerate():
    """A new AcceleratorState before and after: these tests build Accelerators with other settings than the rest."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("env, extra, message", [
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, [], r"the launcher asks for mixed_precision=bf16 .* model.policy_dtype .* "
                                                r"model.fsdp_policy_mp .* Launch with --mixed_precision no"),
    ({}, ["model.policy_dtype=float16"], r"model.policy_dtype=float16 on CPU: use float32 or bfloat16"),
])
def test_precision_the_recipe_does_not_ask_for_is_refused_before_loading(tmp_path, monkeypatch, fresh_accelerate, env,
                                                                         extra, message):
    """`accelerate launch --mixed_precision bf16` (or a config file saying so) would add autocast and change the losses."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model = tiny_model_dir(tmp_path / "model")
    train, test = tiny_data(tmp_path, n_train=8, n_test=4)
    with pytest.raises(ConfigError, match=message):
        sft_train.main([*tiny_run_args(tmp_path, model, train, test), *extra])
    assert not (tmp_path / "run").exists()


def test_tf32_for_float32_matmuls_on_ampere_unless_switched_off():
    before = torch.get_float32_matmul_precision()
    config = build_config({"exp_name": "x", "model": {"name_or_path": "m"}})
    try:
        torch.set_float32_matmul_precision("highest")
        assert set_matmul_precision(config, torch.device("cpu")) is None
        assert set_matmul_precision(config, torch.device("cuda"), capability=(7, 0)) is None  # V100: no TF32
        assert torch.get_float32_matmul_precision() == "highest"
        assert config.allow_tf32 is True
        assert set_matmul_precision(config, torch.device("cuda"), capability=(8, 0)).startswith("float32 matmuls use TF32")
        assert torch.get_float32_matmul_precision() == "high"
        config.allow_tf32 = False
        assert set_matmul_precision(config, torch.device("cuda"), capability=(9, 0)) == \
            "float32 matmuls in full float32 (allow_tf32=false)"
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_model_flops_count_blocks_attention_pairs_and_the_head_where_it_ran(tmp_path):
    """By hand for a tiny untied Llama (hidden d=32, MLP 64, 2 layers, 2 heads x 16, vocab V): embeddings are not matmuls,
    the head counts at the positions it ran, attention counts the causal pairs inside each example."""
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir(tmp_path / "llama", tied=False))
    d, mlp, layers, vocab = 32, 64, 2, config.vocab_size
    flops = model_flops(transformers.AutoModelForCausalLM.from_config(config))
    per_layer = 4 * d * d + 3 * d * mlp + 2 * d  # q, k, v, o; gate, up, down; two RMSNorm weights
    assert (flops.dense_params, flops.layers, flops.attention_width, flops.head_params) == (
        layers * per_layer + d, 2, 32, vocab * d)
    lengths, head_positions = [3, 5], 4
    expected = 6 * (layers * per_layer + d) * 8 + 12 * layers * 32 * (6 + 15) + 6 * vocab * d * head_positions
    assert flops.step(lengths, head_positions) == expected
    # GPT-2: the position table is an embedding too, and the tied head is the token embedding (counted once, as the head).
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(
        tiny_model_dir(tmp_path / "gpt2", arch="gpt2", tied=True)))
    g = model_flops(gpt2)
    n_all = sum(p.numel() for p in gpt2.parameters())
    assert g.dense_params == n_all - gpt2.transformer.wte.weight.numel() - gpt2.transformer.wpe.weight.numel()
    assert g.head_params == gpt2.transformer.wte.weight.numel()


def test_mfu_divides_by_every_device_of_the_job_at_the_compute_dtype_peak(monkeypatch):
    examples = [{"prompt_ids": [1, 2], "response_ids": [3], "n_supervised": 1}, {"prompt_ids": [4], "response_ids": [5, 6, 7],
                                                                                 "n_supervised": 3}]
    metrics = step_throughput(examples, tensor_positions=8, elapsed=2.0, device=torch.device("cpu"), step_flops=96e12,
                              n_devices=8, peak_flops=1e12)
    assert metrics["mfu"] == pytest.approx(96e12 / 2.0 / 8e12)  # 8 devices: under TP too, not the data-parallel size
    assert metrics["tokens_per_second"] == 3.5 and metrics["padding_fraction"] == pytest.approx(1 / 8)
    assert "mfu" not in step_throughput(examples, 8, 2.0, torch.device("cpu"), step_flops=96e12, n_devices=8)  # no peak known

    assert compute_dtype("float32", "bfloat16", fsdp=True, allow_tf32=True) == "bf16"
    assert compute_dtype("float32", "bfloat16", fsdp=False, allow_tf32=True) == "tf32"  # fsdp_policy_mp is FSDP's only
    assert compute_dtype("bfloat16", None, fsdp=False, allow_tf32=True) == "bf16"
    assert compute_dtype("float32", None, fsdp=True, allow_tf32=False) == "fp32"
    assert device_peak_flops(torch.device("cpu"), "bf16") is None
    before = torch.get_float32_matmul_precision()
    try:
        for name, dtype, precision, peak in [("NVIDIA H100 80GB HBM3", "bf16", "high", 989e12),
                                             ("NVIDIA H100 PCIe", "bf16", "high", 756e12),
                                             ("NVIDIA A100-SXM4-80GB", "tf32", "high", 156e12),
                                             ("NVIDIA A100-SXM4-80GB", "tf32", "highest", 19.5e12),  # TF32 off: plain fp32
                                             ("NVIDIA H200", "fp32", "highest", 67e12), ("Tesla T4", "bf16", "high", None)]:
            monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, _name=name: _name)
            torch.set_float32_matmul_precision(precision)
            assert device_peak_flops(torch.device("cuda"), dtype) == peak, (name, dtype)
    finally:
        torch.set_float32_matmul_precision(before)
