"""The supervised-positions-only loss path equals the full-logits path (values and gradients), and falls back when a model
changes its logits after the head."""

from __future__ import annotations

import pytest
import torch
import transformers

from data.batches import collate
from data.packing import collate_packed
from modeling.loss import sequence_nll, token_nll_sums, transforms_logits
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


def reference_nll_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's per-example log-prob sum: log_softmax over every shifted position, gathered, masked, summed."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:].clone()
    mask = labels != -100
    labels[~mask] = 0
    logps = torch.gather(torch.log_softmax(logits, dim=-1), 2, labels.unsqueeze(2)).squeeze(2)
    return -(logps * mask).sum(-1), mask.sum(-1)


def test_full_logits_path_is_the_reference_formula_with_softmax_only_at_supervised_positions(tmp_path):
    """Values and gradients equal the reference's log_softmax-then-gather, and no softmax-like op sees a tensor holding
    every position's logits (those of the prompt and padding positions are never normalised)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    batch = collate(batch_examples(), 0)
    rows, width = batch["labels"].shape
    vocab = 320  # above every id batch_examples draws
    logits = torch.randn(rows, width, vocab, generator=torch.Generator().manual_seed(1), requires_grad=True)
    expected, expected_counts = reference_nll_sums(logits, batch["labels"])
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)

    class SoftmaxSizes(TorchDispatchMode):
        sizes: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(k in func.__name__ for k in ("softmax", "logsumexp", "exp")):
                self.sizes.append(max(a.numel() for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    with SoftmaxSizes() as mode:
        nll, counts = token_nll_sums(logits, batch["labels"])
        (grad,) = torch.autograd.grad(nll.sum(), logits)
    assert counts.tolist() == expected_counts.tolist() == [4, 9, 2, 5]
    torch.testing.assert_close(nll, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)
    assert mode.sizes and max(mode.sizes) <= sum(counts.tolist()) * vocab, mode.sizes


class HeadMatmuls:
    """Context recording the shapes of every matmul with the vocabulary as a dimension (the LM head's, forward and backward)
    and the names of the out-of-place ops whose output has `full` elements (every position's logits)."""

    def __init__(self, vocab: int, full: int = -1):
        from torch.utils._python_dispatch import TorchDispatchMode

        shapes, full_outputs = self.shapes, self.full_outputs = [], []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if name in ("mm", "addmm", "bmm", "matmul"):
                    dims = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
                    if any(vocab in d for d in dims):
                        shapes.append(dims)
                out = func(*args, **(kwargs or {}))
                inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
                if isinstance(out, torch.Tensor) and out.numel() == full and out.untyped_storage().data_ptr() not in inputs:
                    full_outputs.append(name)  # a new full-size tensor (not a view, not in place)
                return out

        self.mode = Mode()

    def __enter__(self):
        self.shapes.clear()
        self.full_outputs.clear()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def softcapped_model():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", ["llama", "softcapped"])
def test_full_logits_path_differentiates_the_head_only_at_supervised_positions(tmp_path, arch):
    """loss.supervised_logits_only=false (and every model that transforms its logits): values and gradients are those of the
    plain masked forward through the reference formula, but the head's backward matmuls cover the supervised rows only."""
    model = tiny_llama(tmp_path) if arch == "llama" else softcapped_model()
    batch = collate(batch_examples(), 0)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    expected, _ = reference_nll_sums(logits, batch["labels"])
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    vocab = model.config.vocab_size
    model.zero_grad(set_to_none=True)
    nll, counts = sequence_nll(model, batch, supervised_only=False)
    rows, width = batch["labels"].shape
    with HeadMatmuls(vocab, full=rows * width * vocab) as backward:
        nll.sum().backward()
    torch.testing.assert_close(nll, expected, rtol=1e-6, atol=1e-5)
    for name, p in model.named_parameters():  # rounding only (differently grouped sums): 1e-6 on gradients up to ~5
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    supervised = int(counts.sum())
    # No more full-vocabulary tensors in backward than the plain path (model logits -> token_nll_sums) makes.
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    with HeadMatmuls(vocab, full=rows * width * vocab) as plain:
        token_nll_sums(logits, batch["labels"])[0].sum().backward()
    assert len(backward.full_outputs) <= len(plain.full_outputs), (backward.full_outputs, plain.full_outputs)
    assert backward.shapes, "the head's backward ran no matmul"
    for dims in backward.shapes:
        assert rows * width not in (d[0] for d in dims), dims  # no matmul over every position
        assert supervised in (d[0] for d in dims) or supervised in (d[-1] for d in dims), dims
    assert "forward" not in model.get_output_embeddings().__dict__


def test_padded_batches_reach_the_model_without_their_mask_and_give_the_masked_results(tmp_path, monkeypatch):
    """Right padding is invisible to a causal LM's real positions, so the mask is dropped (the causal kernel is the faster
    one) and the per-example losses and gradients are those of the masked forward."""
    model = tiny_llama(tmp_path)
    batch = collate(batch_examples(), 0)
    assert (batch["attention_mask"] == 0).any()  # really padded
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    expected, expected_counts = reference_nll_sums(logits, batch["labels"])
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    seen = []
    forward = type(model).forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("attention_mask"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    for supervised_only in (True, False):
        model.zero_grad(set_to_none=True)
        nll, counts = sequence_nll(model, batch, supervised_only=supervised_only)
        nll.sum().backward()
        assert counts.tolist() == expected_counts.tolist()
        torch.testing.assert_close(nll, expected, rtol=1e-6, atol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert seen == [None, None]


def test_the_last_logits_chunk_is_not_recomputed(tmp_path):
    """Supervised-only head in chunks of 3 positions: every chunk's head forward runs once, and again in backward for all
    but the last (whose logits backward needs first, with nothing allocated after them)."""
    model = tiny_llama(tmp_path)
    batch = collate(batch_examples(), 0)
    vocab = model.config.vocab_size
    with HeadMatmuls(vocab) as ops:
        nll, counts = sequence_nll(model, batch, supervised_only=True, chunk_tokens=3)
        nll.sum().backward()
    hidden = model.config.hidden_size
    forwards = [dims for dims in ops.shapes if dims[-1] == (hidden, vocab)]  # hidden @ W.T; backward's have other shapes
    n_chunks = -(-int(counts.sum()) // 3)
    assert n_chunks > 2
    assert len(forwards) == 2 * n_chunks - 1, ops.shapes
