"""The supervised-positions-only loss path equals the full-logits path (values and gradients), and falls back when a model
changes its logits after the head."""

from __future__ import annotations

import pytest
import torch
import transformers

from data.batches import collate
from data.packing import collate_packed
from modeling.loss import sequence_nll, transforms_logits
from tests.tiny import tiny_model_dir


def batch_examples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (3, 9), (10, 2), (1, 5)]
    return [{"prompt_ids": torch.randint(1, 300, (p,), generator=g).tolist(),
             "response_ids": torch.randint(1, 300, (r,), generator=g).tolist()} for p, r in shapes]


def tiny_llama(tmp_path) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir(tmp_path, tied=False))
    return transformers.AutoModelForCausalLM.from_config(config)


def nll_and_grads(model, batch, **kwargs) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    nll, counts = sequence_nll(model, batch, **kwargs)
    (nll.sum() / 7).backward()
    return nll.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk_tokens", [1024, 3])
def test_supervised_only_equals_full_logits(tmp_path, packed, chunk_tokens):
    model = tiny_llama(tmp_path)
    examples = batch_examples()
    batch = collate_packed(examples, 0, 16) if packed else collate(examples, 0)
    full, full_counts, full_grads = nll_and_grads(model, batch, supervised_only=False)
    ours, counts, grads = nll_and_grads(model, batch, supervised_only=True, chunk_tokens=chunk_tokens)
    assert counts.tolist() == full_counts.tolist() == [4, 9, 2, 5]
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=1e-5)
    assert set(grads) == set(full_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    head = model.get_output_embeddings()
    assert "forward" not in head.__dict__  # the replaced forward is gone afterwards


def test_head_forward_restored_after_an_error(tmp_path):
    model = tiny_llama(tmp_path)
    batch = collate(batch_examples(), 0)
    batch["input_ids"][0, 0] = 10_000  # out of the embedding's range: the forward raises
    with pytest.raises(IndexError):
        sequence_nll(model, batch)
    assert "forward" not in model.get_output_embeddings().__dict__


class DoubledLogits(transformers.LlamaForCausalLM):
    """A model whose forward changes the head's output without saying so in its config."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_model_that_changes_logits_falls_back(tmp_path):
    torch.manual_seed(0)
    model = DoubledLogits(transformers.AutoConfig.from_pretrained(tiny_model_dir(tmp_path)))
    batch = collate(batch_examples(), 0)
    assert not transforms_logits(model)
    with torch.no_grad():
        ours, _ = sequence_nll(model, batch, supervised_only=True)
        full, _ = sequence_nll(model, batch, supervised_only=False)
    torch.testing.assert_close(ours, full)
    assert transforms_logits(model)  # remembered: later calls go straight to full logits


def test_softcapped_model_uses_full_logits(tmp_path):
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert transforms_logits(model)
    batch = collate(batch_examples(), 0)
    with torch.no_grad():
        ours, _ = sequence_nll(model, batch, supervised_only=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    assert logits.abs().max() <= 3.0  # the cap applied: these are the logits the loss must use
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, batch["labels"][:, 1:].clamp(min=0).unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(ours, -(logps * (batch["labels"][:, 1:] != -100)).sum(-1))
