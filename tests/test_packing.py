"""Packing: few balanced rows, exact labels/positions with sentinel ids, the layout each attention kernel needs, no attention
across examples (transformers' real flash-attention path included, with a CPU stand-in for the kernel), no host sync per
layer, and the same training run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

import sft_train
from data.batches import collate
from data.packing import Collate, collate_packed, collate_for, pack_rows
from modeling.loss import sequence_nll
from tests.tiny import tiny_data, tiny_model_dir, tiny_run_args
from training.checks import validate
from training.config import ConfigError, build_config


def example(prompt: list[int], response: list[int], **extra) -> dict:
    return {"prompt_ids": prompt, "response_ids": response, **extra}


def test_pack_rows_few_balanced_rows():
    # 20 tokens need 3 rows of 8: longest first into the least-filled row: 6 -> r0, 5 -> r1, 4 -> r2, 3 -> r2, 2 -> r1.
    assert pack_rows([5, 3, 4, 2, 6], 8) == [[4], [0, 3], [1, 2]]
    # 2 rows would do by count, but 5 and 5 cannot share: the first count where every example fits.
    assert pack_rows([5, 5, 5], 8) == [[0], [1], [2]]
    assert pack_rows([4, 4, 4, 4], 8) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        pack_rows([3, 9], 8)


def test_collate_packed_sentinels():
    examples = [example([11, 12], [13, 14, 15]), example([21], [22]), example([31, 32, 33], [34, 35, 36, 37])]
    batch = collate_packed(examples, pad_id=-8, max_length=8)
    # lengths 5, 2, 7 in 2 rows: the 7 to row 0, the 5 to row 1, the 2 to the less filled row 1.
    assert batch["input_ids"].tolist() == [[31, 32, 33, 34, 35, 36, 37], [11, 12, 13, 14, 15, 21, 22]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 34, 35, 36, 37], [-100, -100, 13, 14, 15, -100, 22]]
    assert batch["example_index"].tolist() == [[2, 2, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1]]
    assert batch["packed_spans"] == (((0, 7),), ((0, 5), (5, 7)))  # computed here, so attention never reads positions back
    assert set(batch) == {"input_ids", "position_ids", "labels", "example_index", "n_examples", "packed_spans"}
    assert batch["n_examples"] == 3  # a Python int: the loss needs no device read to size its per-example sums
    assert collate_packed(examples, pad_id=-8, max_length=8, attention="sdpa").keys() == batch.keys()


@pytest.mark.parametrize("attention", ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2"])
def test_collate_packed_for_flash_attention_is_one_row_with_cu_seq_lens(attention):
    """transformers treats position_ids as packed for flash attention only in a one-row batch, so a flash batch is one row
    with the varlen kernel's offsets (int32) and longest length (a Python int: no device sync to read it)."""
    examples = [example([11, 12], [13, 14, 15]), example([21], [22]), example([31, 32, 33], [34, 35, 36, 37])]
    batch = collate_packed(examples, pad_id=-8, max_length=8, attention=attention)
    assert set(batch) == {"input_ids", "position_ids", "labels", "example_index", "cu_seq_lens_q", "cu_seq_lens_k",
                          "max_length_q", "max_length_k", "n_examples"}
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15, 21, 22, 31, 32, 33, 34, 35, 36, 37]]  # no filler
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 5, 6]]
    assert batch["labels"].tolist() == [[-100, -100, 13, 14, 15, -100, 22, -100, -100, -100, 34, 35, 36, 37]]
    assert batch["example_index"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2]]
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32 and batch[key].tolist() == [0, 5, 7, 14]
    assert batch["max_length_q"] == batch["max_length_k"] == 7 and type(batch["max_length_q"]) is int
    assert batch["n_examples"] == 3 and type(batch["n_examples"]) is int  # the loss counts examples without a device read
    assert Collate(-8, True, 8, attention).positions([5, 2, 7]) == 14


def test_packing_refuses_attention_kernels_that_are_not_known_to_separate_examples():
    config = build_config({"exp_name": "x", "packing": True, "model": {"name_or_path": "m", "attn_implementation": "paged|sdpa"}})
    with pytest.raises(ConfigError, match=r"packing=true with model.attn_implementation=paged\|sdpa: that kernel is not known"):
        validate(config)
    for attention in ("sdpa_packed", "sdpa", "eager", "flash_attention_2", "varlen_attn", "flex_attention", None):
        config.model.attn_implementation = attention
        validate(config)



@pytest.mark.parametrize("attention", ["varlen_attn", "flex_attention", "flash_attention_2"])
def test_collate_for_flat_kernels(attention):
    """The run's collate (pad -8): one row, int32 offsets from 0, host ints for the longest example and the example count,
    -100 at each example's first position (nothing predicts it unpacked either)."""
    config = build_config({"exp_name": "x", "packing": True, "max_length": 8,
                           "model": {"name_or_path": "m", "attn_implementation": attention}})
    collate = collate_for(config, pad_id=-8)
    assert collate == Collate(-8, True, 8, attention)
    examples = [example([11, 12], [13, 14, 15]), example([21], [22]), example([31, 32, 33], [34, 35, 36, 37])]
    batch = collate(examples)
    assert batch["input_ids"].shape == (1, 14)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].dtype == torch.int32 and batch[key].tolist() == [0, 5, 7, 14]
    assert [type(batch[k]) for k in ("max_length_q", "max_length_k", "n_examples")] == [int, int, int]
    assert batch["max_length_q"] == batch["max_length_k"] == 7 and batch["n_examples"] == 3
    starts = batch["cu_seq_lens_q"][:-1].tolist()
    assert batch["labels"][0, starts].tolist() == [-100, -100, -100]
    assert batch["labels"].tolist() == [[-100, -100, 13, 14, 15, -100, 22, -100, -100, -100, 34, 35, 36, 37]]
    assert collate.positions([5, 2, 7]) == 14


def test_collate_for_rows_and_padding_are_unchanged():
    examples = [example([11, 12], [13, 14, 15]), example([21], [22]), example([31, 32, 33], [34, 35, 36, 37])]
    config = build_config({"exp_name": "x", "packing": True, "max_length": 8,
                           "model": {"name_or_path": "m", "attn_implementation": "sdpa_packed"}})
    rows = collate_for(config, -8)(examples)
    expected = collate_packed(examples, pad_id=-8, max_length=8, attention="sdpa_packed")
    assert rows.keys() == expected.keys() and rows["n_examples"] == 3
    assert all(torch.equal(rows[k], expected[k]) if isinstance(rows[k], torch.Tensor) else rows[k] == expected[k] for k in rows)
    assert collate_for(config, -8).positions([5, 2, 7]) == 2 * 7
    config.packing = False
    padded, plain = collate_for(config, -8)(examples), collate(examples, -8)
    assert padded.keys() == plain.keys() and all(torch.equal(padded[k], plain[k]) for k in padded)
    assert collate_for(config, -8).positions([5, 2, 7]) == 3 * 7


def test_collate_packed_filler_and_masks():
    examples = [example([1, 2], [3, 4]), example([], [5, 6, 7], response_mask=[1, 0, 1]), example([8], [9])]
    batch = collate_packed(examples, pad_id=-8, max_length=6)
    # lengths 4, 3, 2 in 2 rows: the 4 to row 0, the 3 to row 1, the 2 to the less filled row 1; row 0 ends in filler.
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, -8], [5, 6, 7, 8, 9]]
    # An example with no prompt: its first token is never predicted, so its label is -100 (as the shift drops it unpacked);
    # response_mask 0 gives -100 too.
    assert batch["labels"].tolist() == [[-100, -100, 3, 4, -100], [-100, -100, 7, -100, 9]]
    # Filler restarts its positions: it is a sequence of its own, not a continuation of the example before it.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["example_index"].tolist() == [[0, 0, 0, 0, -1], [1, 1, 1, 2, 2]]
    assert Collate(-8, True, 6, "sdpa_packed").positions([4, 3, 2]) == 10
    assert Collate(-8, True, 6, "sdpa_packed").positions([5, 1]) == 6
    assert Collate(-8, False, 6, "sdpa_packed").positions([5, 1]) == 10


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("llama", "sdpa_packed"), ("gpt2", "sdpa"), ("gpt2", "sdpa_packed")])
@pytest.mark.parametrize("supervised_only", [True, False])
def test_packed_losses_equal_alone(tmp_path, arch, attn, supervised_only):
    """Each example's loss in a packed row equals its loss computed alone: nothing leaks across the boundaries."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir(tmp_path, arch=arch))
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    shapes = [(5, 3), (7, 9), (2, 4), (12, 6), (3, 1), (1, 2)]
    examples = [example(torch.randint(1, 300, (p,)).tolist(), torch.randint(1, 300, (r,)).tolist()) for p, r in shapes]
    batch = collate_packed(examples, pad_id=0, max_length=24)
    assert batch["input_ids"].shape[0] < len(examples)  # rows hold several examples
    with torch.no_grad():
        packed, counts = sequence_nll(model, batch, supervised_only)
        alone = [sequence_nll(model, collate([e], pad_id=0), supervised_only) for e in examples]
    assert counts.tolist() == [r for _, r in shapes]
    torch.testing.assert_close(packed, torch.cat([nll for nll, _ in alone]), rtol=1e-5, atol=1e-5)


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                     softmax_scale=None, causal=False):
    """What flash_attn_varlen_func computes, on CPU: (tokens, heads, dim) split at cu_seqlens, causal within each sequence."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        out[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                                  is_causal=causal, scale=softmax_scale, enable_gqa=True).transpose(0, 1)
    return out


def reference_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """What flash_attn_func computes, on CPU: (batch, positions, heads, dim), causal per row."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                          scale=softmax_scale, enable_gqa=True).transpose(1, 2)


@pytest.fixture
def cpu_flash(monkeypatch) -> str:
    """An attention name that runs transformers' own flash-attention code path (flash_attention_forward and
    _flash_attention_forward, which choose between the varlen and the plain kernel) with CPU stand-ins for the kernels."""
    from transformers import AttentionInterface, modeling_flash_attention_utils, modeling_utils
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    kernels = ((reference_flash, reference_varlen, None, None, None),
               (modeling_flash_attention_utils._lazy_define_process_function(reference_varlen), dict))
    for module in (modeling_flash_attention_utils, modeling_utils):
        monkeypatch.setattr(module, "lazy_import_flash_attention", lambda *args, **kwargs: kernels)
    AttentionInterface.register("flash_cpu_reference", flash_attention_forward)
    AttentionMaskInterface.register("flash_cpu_reference", flash_attention_mask)
    return "flash_cpu_reference"


def per_example_logits(model, batch) -> list[torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_index", "n_examples")}
    logits = model(**inputs, use_cache=False).logits
    owner = batch["example_index"]
    return [logits[owner == i] for i in range(int(owner.max()) + 1)]


@pytest.mark.parametrize("arch,attention", [("llama", "sdpa_packed"), ("llama", "sdpa"), ("llama", "eager"), ("llama", "flash"),
                                            ("gpt_neox", "sdpa_packed"), ("gpt_neox", "flash"), ("gpt2", "sdpa_packed"),
                                            ("gpt2", "eager")])
def test_packed_logits_equal_alone_for_every_attention_kind(tmp_path, request, arch, attention):
    """Every position's logits in the packed micro-batch equal the example's logits computed alone."""
    attention = request.getfixturevalue("cpu_flash") if attention == "flash" else attention
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir(tmp_path, arch=arch))
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()
    shapes = [(5, 3), (7, 9), (2, 4), (12, 6), (3, 1), (1, 2)]
    examples = [example(torch.randint(1, 300, (p,)).tolist(), torch.randint(1, 300, (r,)).tolist()) for p, r in shapes]
    batch = collate_packed(examples, pad_id=0, max_length=24, attention=attention)
    with torch.no_grad():
        packed = per_example_logits(model, batch)
        for e, got in zip(examples, packed):
            alone = model(input_ids=torch.tensor([e["prompt_ids"] + e["response_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_several_packed_rows_leak_under_flash_attention(tmp_path, cpu_flash):
    """Why flash batches are one row: given the several-row layout, transformers' flash path attends across examples."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tiny_model_dir(tmp_path)),
                                                          attn_implementation=cpu_flash).eval()
    examples = [example([5, 6, 7], [8, 9]), example([10, 11], [12, 13]), example([14, 15, 16, 17], [18, 19, 20, 21])]
    rows = collate_packed(examples, pad_id=0, max_length=9, attention="sdpa_packed")
    assert rows["example_index"].tolist() == [[2, 2, 2, 2, 2, 2, 2, 2, -1], [0, 0, 0, 0, 0, 1, 1, 1, 1]]
    rows.pop("packed_spans")
    with torch.no_grad():
        leaky, clean = per_example_logits(model, rows), per_example_logits(model, collate_packed(examples, 0, 9, cpu_flash))
    assert not torch.allclose(leaky[1], clean[1], atol=1e-3)  # the second example of a row sees the first


def test_sdpa_packed_reads_nothing_back_from_the_device_per_layer(tmp_path, monkeypatch):
    """Host reads (tolist/item/nonzero/bool: each a device-to-host sync on GPU) in one packed forward and backward do not
    grow with the number of layers: attention gets the spans from the collate instead of reading position_ids."""
    examples = [example([5, 6, 7], [8, 9]), example([10, 11], [12, 13]), example([14, 15, 16, 17], [18, 19, 20, 21])]
    batch = collate_packed(examples, pad_id=0, max_length=8)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_index", "n_examples")}
    reads = {}
    for layers in (1, 4):
        torch.manual_seed(0)
        config = transformers.AutoConfig.from_pretrained(tiny_model_dir(tmp_path / str(layers), layers=layers))
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa_packed")
        calls = []
        with monkeypatch.context() as patch:
            for name in ("tolist", "item", "nonzero", "__bool__"):
                original = getattr(torch.Tensor, name)
                patch.setattr(torch.Tensor, name,
                              lambda self, *a, _original=original, _name=name, **k: calls.append(_name) or _original(self, *a, **k))
            model(**inputs, use_cache=False).logits.sum().backward()
        reads[layers] = calls
    assert len(reads[1]) == len(reads[4]), reads


def test_packed_losses_leak_with_a_cache(tmp_path):
    """Why sequence_nll passes use_cache=False: with a cache, transformers ignores the packing in position_ids."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tiny_model_dir(tmp_path))).eval()
    batch = collate_packed([example([5, 6, 7], [8, 9]), example([10, 11], [12, 13])], pad_id=0, max_length=16)
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        leaky = model(**inputs, use_cache=True).logits
        clean = model(**inputs, use_cache=False).logits
    assert torch.equal(leaky[:, :5], clean[:, :5])  # the first example sees nothing else either way
    assert not torch.allclose(leaky[:, 5:], clean[:, 5:], atol=1e-3)


def run_metrics(tmp_path, name: str, **overrides) -> list[dict]:
    model = tiny_model_dir(tmp_path / "model")
    train, test = tiny_data(tmp_path, n_train=16, n_test=8)
    run_dir = tmp_path / name
    sft_train.main(tiny_run_args(tmp_path, model, train, test, run_dir=run_dir, batch_size=8, gradient_accumulation_steps=2,
                                 eval_batch_size=8, n_eval_examples=8, eval_every=8, **overrides))
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_packed_run_equals_padded_run(tmp_path):
    """The real CLI with packing trains on the same examples per step and logs the same losses as the padded run."""
    padded = run_metrics(tmp_path, "padded", packing=False, loss__supervised_logits_only=False)
    packed = run_metrics(tmp_path, "packed", packing=True)
    train_p, train_q = [r for r in padded if "loss/train" in r], [r for r in packed if "loss/train" in r]
    assert len(train_p) == len(train_q) == 2
    for p, q in zip(train_p, train_q):
        assert q["loss/train"] == pytest.approx(p["loss/train"], rel=1e-5)
        assert q["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-4)
        for key in ("tokens_per_second", "supervised_tokens_per_second", "examples_per_second", "padding_fraction",
                    "peak_memory_gb"):
            assert key in p and key in q, key
        assert q["padding_fraction"] < p["padding_fraction"]
        assert "mfu" not in q  # GPU only
    evals_p, evals_q = [r["loss/eval"] for r in padded if "loss/eval" in r], [r["loss/eval"] for r in packed if "loss/eval" in r]
    assert evals_q == pytest.approx(evals_p, rel=1e-5) and len(evals_q) == 3
