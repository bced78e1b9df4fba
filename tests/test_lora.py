"""LoRA through peft: trainable adapters on a frozen base, merged into policy.pt, the adapter alone in hf/adapter/, exact
resume, and 2-process runs (DDP, FSDP2) equal to one process.

The runs reuse tests/test_distributed.py's tiny Llama (2 layers, hidden 32, saved with save_pretrained) and its recipe:
3 AdamW updates of 4 examples in 2 micro-batches, evals at 0, 8 and 12 examples, here with packing on.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from modeling.lora import add_adapters
from training.adapters import adapter_layout, merged_state
from tests.test_distributed import assert_same_checkpoint, assert_same_training, launch, metrics
from training.checks import validate
from training.config import ConfigError, LoraConfig, load_config

LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "packing=true"]
# all-linear on the tiny Llama, per layer: q, k, v, o (32 -> 32) and gate, up (32 -> 64), down (64 -> 32); r (in + out) each
EXPECTED_TRAINABLE = 2 * 4 * (4 * (32 + 32) + 2 * (32 + 64) + (64 + 32))


def check_merge(model: torch.nn.Module, lora: LoraConfig, layer_names: list[str], transposed: bool) -> None:
    plain_keys = list(model.state_dict())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = add_adapters(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # peft starts B at zero, which would make every merge trivially right
    state = peft_model.state_dict()
    layout = adapter_layout(peft_model)
    assert sorted(layout) == sorted(f"base_model.model.{n}" for n in layer_names)
    merged = merged_state(state, layout)
    assert list(merged) == plain_keys
    scale = lora.alpha / lora.r
    for name in layer_names:
        a, b = (state[f"base_model.model.{name}.lora_{x}.default.weight"] for x in "AB")
        delta = (b @ a).T if transposed else b @ a
        torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + scale * delta, rtol=0, atol=1e-6)
    for key in plain_keys:
        if not any(key == f"{n}.weight" for n in layer_names):
            assert torch.equal(merged[key], base[key]), key
    ids = torch.tensor([[1, 5, 7, 3, 2]])
    plain = type(model)(model.config)
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain.eval()(ids).logits, peft_model.eval()(ids).logits, rtol=0, atol=1e-5)


def test_merged_state_is_base_plus_scaled_ba_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    names = [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    check_merge(transformers.LlamaForCausalLM(config), LoraConfig(enabled=True, r=4, alpha=8), names, transposed=False)


def test_merged_state_transposes_for_gpt2_conv1d():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40))
    names = [f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    check_merge(model, LoraConfig(enabled=True, r=2, alpha=3, target_modules=["all-linear"]), names, transposed=True)


@pytest.mark.parametrize("over, message", [
    (["lora.r=0"], "lora.r must be at least 1"),
    (["lora.alpha=0"], "lora.alpha must be positive"),
    (["lora.dropout=1"], "lora.dropout must be in [0, 1)"),
    (["lora.target_modules=[]"], "lora.target_modules: give module names"),
    (["lora.enabled=true", "lora.quantize=8bit"], "lora.quantize: '8bit' is not one of 4bit"),
    (["lora.quantize=4bit"], "set lora.enabled=true"),
])
def test_lora_config_errors(over, message):
    with pytest.raises(ConfigError) as e:
        validate(load_config(["exp_name=t", "model.name_or_path=recipes/demo", *over]))
    assert message in str(e.value)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_llama):
    tmp, model = tmp_path_factory.mktemp("lora"), tiny_llama
    return {"tmp": tmp, "model": model, "1proc": launch(tmp, tmp / "1proc", model, "1proc", *LORA, "export=true")}


def test_qlora_is_refused_without_a_gpu_before_loading(lora_runs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    import sft_train
    from tests.test_distributed import recipe

    with pytest.raises(ConfigError, match="lora.quantize=4bit needs a CUDA GPU"):
        sft_train.main([*recipe(lora_runs["model"]), *LORA, "lora.quantize=4bit", f"run_dir={tmp_path / 'r'}",
                        f"local_dirs=[{tmp_path}]"])
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_lora_run_trains_adapters_only_and_merges_them_into_policy(lora_runs):
    from peft import PeftModel

    run = lora_runs["1proc"] / "LATEST"
    base = transformers.AutoModelForCausalLM.from_pretrained(lora_runs["model"])
    base_state = base.state_dict()
    adapter = torch.load(run / "adapter.pt")["state"]
    policy = torch.load(run / "policy.pt")["state"]
    assert sum(v.numel() for v in adapter.values()) == EXPECTED_TRAINABLE
    assert len(torch.load(run / "optimizer.pt")["state"]["state"]) == len(adapter) == 2 * 7 * 2  # AdamW state for adapters only
    assert list(policy) == list(base_state)  # the plain model's keys: DPO loads it as before
    adapted = 0
    for key, value in base_state.items():
        module = key.removesuffix(".weight")
        a = adapter.get(f"base_model.model.{module}.lora_A.default.weight")
        if a is None:
            assert torch.equal(policy[key], value), key  # frozen: bit-identical to the base after 3 updates
            continue
        b = adapter[f"base_model.model.{module}.lora_B.default.weight"]
        assert b.abs().max() > 0  # the adapters did train
        torch.testing.assert_close(policy[key], value + 8 / 4 * (b @ a), rtol=0, atol=1e-6)
        adapted += 1
    assert adapted == 14
    # hf/ is the merged model; hf/adapter/ on the base model gives the same logits
    merged = transformers.AutoModelForCausalLM.from_pretrained(lora_runs["1proc"] / "hf").eval()
    with_adapter = PeftModel.from_pretrained(base, lora_runs["1proc"] / "hf" / "adapter").eval()
    ids = torch.tensor([[3, 17, 42, 5, 9, 11]])
    torch.testing.assert_close(with_adapter(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)
    assert [m["examples_seen"] for m in metrics(lora_runs["1proc"])] == [0, 4, 8, 8, 12, 12]


@pytest.mark.slow
def test_lora_resume_is_bit_exact(lora_runs):
    tmp, model = lora_runs["tmp"], lora_runs["model"]
    stopped = launch(tmp, tmp / "stopped", model, "1proc", *LORA, "export=true", "max_updates_this_run=1")
    launch(tmp, stopped, model, "1proc", *LORA, "export=true", "resume_from=auto")
    for name in ("policy.pt", "adapter.pt", "optimizer.pt", "scheduler.pt"):
        a, b = torch.load(stopped / "LATEST" / name)["state"], torch.load(lora_runs["1proc"] / "LATEST" / name)["state"]
        if name == "optimizer.pt":
            a, b = a["state"], b["state"]
            assert all(torch.equal(a[i][k], b[i][k]) for i in b for k in b[i] if torch.is_tensor(b[i][k])), name
        elif name == "scheduler.pt":
            assert a == b
        else:
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name
    assert [m["loss/train"] for m in metrics(stopped) if "loss/train" in m] == \
        [m["loss/train"] for m in metrics(lora_runs["1proc"]) if "loss/train" in m]


@pytest.mark.slow
def test_lora_ddp_two_processes_match_one_process(lora_runs):
    # forked: the launcher and cpu_2proc.yaml are tests/test_distributed.py's DDP run
    run_dir = launch(lora_runs["tmp"], lora_runs["tmp"] / "ddp", lora_runs["model"], "ddp_forked", *LORA)
    assert_same_training(run_dir, lora_runs["1proc"])


@pytest.mark.slow
def test_lora_fsdp2_two_processes_match_one_process_and_resume(lora_runs):
    tmp, model = lora_runs["tmp"], lora_runs["model"]
    fsdp = launch(tmp, tmp / "fsdp", model, "fsdp", *LORA, "save_full_optimizer=true")
    units = json.loads((fsdp / "parallel.json").read_text())["fsdp_units"]
    assert [name for name, cls in units if cls == "FSDPLlamaDecoderLayer"] == \
        ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]  # wrapped by block_name inside peft's model
    assert_same_training(fsdp, lora_runs["1proc"])
    # from its own sharded resume state: bit-exact
    resumed = launch(tmp, tmp / "fsdp-resumed", model, "fsdp", *LORA, f"resume_from={fsdp / 'step-8'}")
    assert [m["examples_seen"] for m in metrics(resumed)] == [12, 12]
    for name in ("policy.pt", "adapter.pt"):
        a, b = torch.load(resumed / "LATEST" / name)["state"], torch.load(fsdp / "LATEST" / name)["state"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name
    # from the 1-process run's full files (adapter.pt broadcast into the shards): its last step, to float rounding
    crossed = launch(tmp, tmp / "fsdp-from-1proc", model, "fsdp", *LORA, "save_full_optimizer=true",
                     f"resume_from={lora_runs['1proc'] / 'step-8'}")
    assert metrics(crossed)[0]["loss/train"] == pytest.approx(metrics(lora_runs["1proc"])[4]["loss/train"], rel=1e-5)
    assert_same_checkpoint(crossed / "LATEST", lora_runs["1proc"] / "LATEST")
