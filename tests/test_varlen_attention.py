"""varlen_attn (modeling/varlen_attention.py) on CPU: the signature detection of both torch releases, the dtype cast, GQA,
per-example losses of a flat packed row equal to each example alone (the kernel replaced by a per-example sdpa stand-in),
sdpa for everything that is not a packed forward, no mask built, no device read per layer, one graph under torch.compile
(the real varlen_attn custom op, given a CPU kernel), the FlexAttention fallback, and DPO pairs on the flat row."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import modeling.varlen_attention as varlen
from data.batches import collate
from data.packing import collate_packed
from data.pairs import pair_sides
from modeling.dpo import pair_logps
from modeling.loss import sequence_nll
from tests.tiny import tiny_model_dir
from training.attention import VARLEN

FLAT = VARLEN  # the flat layout: one row + cu_seq_lens
SHAPES = [(5, 3), (7, 9), (2, 4), (12, 6), (3, 1), (1, 2)]


def example(prompt: list[int], response: list[int]) -> dict:
    return {"prompt_ids": prompt, "response_ids": response}


def random_examples(shapes=SHAPES) -> list[dict]:
    return [example(torch.randint(1, 300, (p,)).tolist(), torch.randint(1, 300, (r,)).tolist()) for p, r in shapes]


def tiny_model(tmp_path, attention: str = varlen.NAME, arch: str = "llama", kv_heads: int | None = None, layers: int = 2):
    path = tiny_model_dir(tmp_path / f"{arch}-{kv_heads}-{layers}", arch=arch, layers=layers)
    if kv_heads is not None:
        config = json.loads((path / "config.json").read_text())
        config.update(num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8)
        (path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path),
                                                         attn_implementation=attention)


class Recorder:
    """A kernel with the given keyword arguments that records its calls, computing with the CPU stand-in."""

    def __init__(self, style: str):
        self.calls = []
        if style == "2.10":
            def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, scale=None):
                self.calls.append(dict(dtypes=(query.dtype, key.dtype, value.dtype), heads=(query.shape[1], key.shape[1]),
                                       is_causal=is_causal, max=(max_q, max_k)))
                return varlen.reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                                    window_size=(-1, 0) if is_causal else (-1, -1))
        else:
            def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                       enable_gqa=False):
                self.calls.append(dict(dtypes=(query.dtype, key.dtype, value.dtype), heads=(query.shape[1], key.shape[1]),
                                       window_size=window_size, enable_gqa=enable_gqa, max=(max_q, max_k)))
                return varlen.reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                                    window_size=window_size, enable_gqa=enable_gqa)
        self.kernel = kernel


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(varlen, "KERNEL", varlen.stand_in_kernel())


def test_signature_detection_of_both_releases():
    def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False, scale=None):
        pass

    def torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), enable_gqa=False):
        pass

    def no_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1)):
        pass

    assert varlen.detect(torch_2_10) == varlen.VarlenKernel(torch_2_10, {"is_causal": True}, gqa=False, scale=True)
    assert varlen.detect(torch_2_11) == varlen.VarlenKernel(torch_2_11, {"window_size": (-1, 0)}, gqa=True, scale=True)
    assert varlen.detect(no_gqa) == varlen.VarlenKernel(no_gqa, {"window_size": (-1, 0)}, gqa=False, scale=False)
    with pytest.raises(TypeError, match="neither window_size nor is_causal"):
        varlen.detect(lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k: None)
    if varlen.KERNEL is not None:  # this torch's own kernel: fp16/bf16 only
        assert varlen.KERNEL.dtypes == (torch.bfloat16, torch.float16) and varlen.KERNEL.causal in (
            {"is_causal": True}, {"window_size": (-1, 0)})


@pytest.mark.parametrize("style", ["2.10", "2.11"])
def test_each_release_gets_its_causal_keyword_and_gqa_its_heads(tmp_path, monkeypatch, style):
    """A grouped-query model (4 query heads, 1 K/V head): 2.11's enable_gqa gets the K/V head as it is, 2.10's kernel gets
    K/V repeated to 4 heads; the losses agree with each example alone either way."""
    recorder = Recorder(style)
    monkeypatch.setattr(varlen, "KERNEL", varlen.detect(recorder.kernel, (torch.float32,)))
    model = tiny_model(tmp_path, kv_heads=1).eval()
    examples = random_examples()
    with torch.no_grad():
        packed, _ = sequence_nll(model, collate_packed(examples, 0, 64, attention=FLAT))
        alone = torch.cat([sequence_nll(model, collate([e], 0))[0] for e in examples])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert len(recorder.calls) == 2  # one call per layer
    longest = max(p + r for p, r in SHAPES)
    for call in recorder.calls:
        assert call["max"] == (longest, longest)
        if style == "2.10":
            assert call["is_causal"] is True and call["heads"] == (4, 4)
        else:
            assert call["window_size"] == (-1, 0) and call["enable_gqa"] is True and call["heads"] == (4, 1)


def test_fp32_query_and_key_reach_the_kernel_in_the_compute_dtype(monkeypatch):
    """Rotary embedding with fp32 cos/sin upcasts q and k; the kernel takes bf16/fp16 only, so they arrive cast to the
    dtype the layer computes in: its weights' (bf16 module), or autocast's (fp32 module under bf16 autocast)."""
    recorder = Recorder("2.11")
    monkeypatch.setattr(varlen, "KERNEL", varlen.detect(recorder.kernel))  # bf16/fp16 only, like torch's
    q, k, v = (torch.randn(1, 2, 7, 8) for _ in range(3))
    offsets = torch.tensor([0, 3, 7], dtype=torch.int32)
    args = dict(scaling=8 ** -0.5, cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=4, max_length_k=4)
    bf16_module = torch.nn.Linear(8, 8).to(torch.bfloat16)
    out, _ = varlen.varlen_attention_forward(bf16_module, q, k, v, None, **args)
    assert recorder.calls[-1]["dtypes"] == (torch.bfloat16,) * 3 and out.dtype == torch.bfloat16
    assert out.shape == (1, 7, 2, 8)  # (batch, positions, heads, dim) like every transformers attention function
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = varlen.varlen_attention_forward(torch.nn.Linear(8, 8), q, k, v.bfloat16(), None, **args)
    assert recorder.calls[-1]["dtypes"] == (torch.bfloat16,) * 3 and out.dtype == torch.bfloat16
    reference = varlen.reference_varlen_attn(*(t.transpose(1, 2)[0].bfloat16() for t in (q, k, v)), offsets, offsets, 4, 4,
                                             scale=8 ** -0.5, window_size=(-1, 0))
    torch.testing.assert_close(out[0], reference)

    # fp32 compute (fp32 weights, no autocast): the kernel cannot take it, the document-masked FlexAttention runs instead.
    flex = []
    monkeypatch.setattr(varlen, "document_flex_attention", lambda *a: flex.append(a) or (a[1].transpose(1, 2), None))
    n_calls = len(recorder.calls)
    varlen.varlen_attention_forward(torch.nn.Linear(8, 8), q, k, v, None, **args)
    assert len(flex) == 1 and len(recorder.calls) == n_calls


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_flat_packed_row_losses_and_gradients_equal_each_example_alone(tmp_path, stand_in, arch):
    """The flat row (one row, cu_seq_lens) through varlen_attn, the kernel a per-example sdpa: every example's loss (fp32)
    and the gradient of their sum equal those of the examples run alone."""
    model = tiny_model(tmp_path, arch=arch)
    examples = random_examples()
    batch = collate_packed(examples, 0, 64, attention=FLAT)
    assert batch["input_ids"].shape[0] == 1 and batch["n_examples"] == len(examples)
    packed, counts = sequence_nll(model, batch)
    packed.sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = torch.cat([sequence_nll(model, collate([e], 0))[0] for e in examples])
    alone.sum().backward()
    assert counts.tolist() == [r for _, r in SHAPES]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    for got, want in zip(packed_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_everything_but_a_packed_forward_runs_sdpa_with_its_mask(tmp_path, monkeypatch):
    """A padded batch with its mask, a plain batch and generation with a cache never reach the kernel and give sdpa's
    results."""
    recorder = Recorder("2.11")
    monkeypatch.setattr(varlen, "KERNEL", varlen.detect(recorder.kernel, (torch.float32,)))
    model, sdpa = tiny_model(tmp_path).eval(), tiny_model(tmp_path, attention="sdpa").eval()
    batch = collate(random_examples(), 0)
    with torch.no_grad():
        for inputs in ({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                       {"input_ids": batch["input_ids"]}):
            torch.testing.assert_close(model(**inputs).logits, sdpa(**inputs).logits)
        prompt = {"input_ids": torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]),
                  "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, sdpa.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert recorder.calls == []


def test_no_mask_is_built_and_nothing_is_read_back_per_layer(tmp_path, monkeypatch):
    """On the packed path the mask function returns None without asking sdpa for a mask, the attention function gets
    None, and host reads (tolist/item/nonzero/bool: each a device sync on GPU) in a forward and backward do not grow with
    the number of layers."""

    def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        return query * 1.0  # reads nothing (the stand-in reads the offsets back)

    monkeypatch.setattr(varlen, "KERNEL", varlen.detect(kernel, (torch.float32,)))
    asked, masks = [], []
    monkeypatch.setattr(varlen, "sdpa_mask", lambda **kwargs: asked.append(kwargs))
    forward = varlen.varlen_attention_forward
    transformers.AttentionInterface.register(varlen.NAME, lambda m, q, k, v, mask, **kw: masks.append(mask) or
                                             forward(m, q, k, v, mask, **kw))
    batch = collate_packed(random_examples(), 0, 64, attention=FLAT)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_index", "n_examples")}
    reads = {}
    try:
        for layers in (1, 4):
            model = tiny_model(tmp_path, layers=layers)
            calls = []
            with monkeypatch.context() as patch:
                for name in ("tolist", "item", "nonzero", "__bool__"):
                    original = getattr(torch.Tensor, name)
                    patch.setattr(torch.Tensor, name, lambda self, *a, _original=original, _name=name, **k:
                                  calls.append(_name) or _original(self, *a, **k))
                model(**inputs, use_cache=False).logits.sum().backward()
            reads[layers] = calls
    finally:
        transformers.AttentionInterface.register(varlen.NAME, forward)
    assert asked == [] and len(masks) == 5 and all(mask is None for mask in masks)
    assert len(reads[1]) == len(reads[4]), reads


@pytest.fixture
def cpu_varlen_op():
    """torch's own varlen_attn custom op (torch_attn::_varlen_attn and its backward) given a CPU kernel: the stand-in, and
    its autograd for the backward. The op's fake implementation is torch's, as under compile on GPU."""
    if varlen.KERNEL is None or not hasattr(torch.ops.torch_attn, "_varlen_attn_backward"):
        pytest.skip("this torch has no varlen_attn custom op")
    lib = torch.library.Library("torch_attn", "IMPL")

    def forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None, window_size=None,
                enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        out = varlen.reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                           window_size=(-1, 0) if is_causal else (-1, -1), enable_gqa=enable_gqa)
        return out, query.new_zeros(query.shape[1], query.shape[0], dtype=torch.float32), torch.zeros(2, dtype=torch.uint64)

    def backward(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, rng_state, scale=None,
                 window_size=None):
        # Softmax attention's backward by hand (the op runs below autograd), per sequence, K/V groups summed for GQA.
        grads = [torch.zeros_like(t) for t in (query, key, value)]
        bounds = cu_seq_q.tolist()
        rep = query.shape[1] // key.shape[1]
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        for s, e in zip(bounds[:-1], bounds[1:]):
            q, do = query[s:e].transpose(0, 1), grad_out[s:e].transpose(0, 1)
            k, v = (t[s:e].transpose(0, 1).repeat_interleave(rep, 0) for t in (key, value))
            scores = scale * q @ k.transpose(1, 2)
            if is_causal:
                scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
            p = scores.softmax(-1)
            dp = do @ v.transpose(1, 2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True))
            parts = (scale * ds @ k, scale * ds.transpose(1, 2) @ q, p.transpose(1, 2) @ do)
            for grad, part, group in zip(grads, parts, (1, rep, rep)):
                grad[s:e] = part.unflatten(0, (-1, group)).sum(1).transpose(0, 1)
        return tuple(grads)

    lib.impl("_varlen_attn", forward, "CPU")
    lib.impl("_varlen_attn_backward", backward, "CPU")
    yield varlen.detect(varlen.KERNEL.call, (torch.float32, torch.bfloat16, torch.float16))
    lib._destroy()


def test_compiled_blocks_trace_the_kernel_without_a_graph_break_or_a_recompile(tmp_path, monkeypatch, cpu_varlen_op):
    """compile=true's block compile (dynamic shapes) with fullgraph=True over torch's varlen_attn: one graph for every
    block, forward and backward equal to eager, and a second packing (other offsets, total and longest length) reuses it."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(varlen, "KERNEL", cpu_varlen_op)
    model = tiny_model(tmp_path)
    batches = [collate_packed(random_examples(shapes), 0, 64, attention=FLAT) for shapes in (SHAPES, [(4, 2), (9, 5), (3, 3)])]
    eager = []
    for batch in batches:
        nll, _ = sequence_nll(model, batch)
        nll.sum().backward()
        eager.append((nll.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    torch._dynamo.reset()
    counters.clear()
    for layer in model.model.layers:
        layer.compile(dynamic=True, backend="aot_eager", fullgraph=True)
    try:
        for batch, (want, grads) in zip(batches, eager):
            nll, _ = sequence_nll(model, batch)
            nll.sum().backward()
            torch.testing.assert_close(nll.detach(), want, rtol=1e-5, atol=1e-5)
            for p, g in zip(model.parameters(), grads):
                torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
            model.zero_grad()
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()


@pytest.fixture
def vector_kernels(monkeypatch):
    """FlexAttention's CPU lowering needs inductor's AVX2/AVX-512 kernels, which tests/conftest.py turns off for the other
    compiled tests: back to the machine's own choice (inductor caches the list of usable ISAs, so it is asked again)."""
    import torch._inductor.config
    from torch._inductor import cpu_vec_isa

    monkeypatch.setattr(torch._inductor.config.cpp, "vec_isa_ok", None)
    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    yield
    cpu_vec_isa.valid_vec_isa_list.cache_clear()  # the tests after it: scalar kernels again


def test_flex_document_mask_fallback_equals_each_example_alone(tmp_path, monkeypatch, vector_kernels):
    """Where there is no kernel (or it cannot take the dtype), the flat row runs FlexAttention with a document mask made
    from cu_seq_lens on the device, once per forward (forward only here: flex has no backward on CPU)."""
    monkeypatch.setattr(varlen, "KERNEL", None)
    model = tiny_model(tmp_path).eval()
    examples = random_examples()
    batch = collate_packed(examples, 0, 64, attention=FLAT)
    built = []
    create = varlen.document_block_mask
    monkeypatch.setattr(varlen, "document_block_mask", lambda cu, total: built.append(cu) or create(cu, total))
    with torch.no_grad():
        packed, _ = sequence_nll(model, batch)
        alone = torch.cat([sequence_nll(model, collate([e], 0))[0] for e in examples])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert len(built) == 2 and built[0] is built[1]  # every layer asks with the batch's one offsets tensor
    assert create(built[0], batch["input_ids"].shape[1]) is create(built[0], batch["input_ids"].shape[1])


@pytest.mark.slow
def test_transformers_flex_attention_separates_a_flat_row_by_its_positions(tmp_path, vector_kernels):
    """Why the suite can pick transformers' own flex_attention for fp32 packing: on the flat row (no cache) it builds a
    document BlockMask from the restarting position_ids, and every example's loss equals its loss alone."""
    model, sdpa = tiny_model(tmp_path, attention="flex_attention").eval(), tiny_model(tmp_path, attention="sdpa").eval()
    examples = random_examples()
    with torch.no_grad():
        packed, _ = sequence_nll(model, collate_packed(examples, 0, 64, attention=FLAT))
        alone = torch.cat([sequence_nll(sdpa, collate([e], 0))[0] for e in examples])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_dpo_pairs_on_one_flat_row_equal_the_padded_path(tmp_path, stand_in):
    """Chosen and rejected of every pair in one flat row (the policy's and the frozen reference's forward alike): each
    side's summed log-prob, a segment sum over the row, equals the padded path's, and so do the gradients."""
    model = tiny_model(tmp_path)
    reference = tiny_model(tmp_path).eval()
    torch.manual_seed(1)
    pairs = [{"prompt_ids": torch.randint(1, 300, (p,)).tolist(), "chosen_ids": torch.randint(1, 300, (c,)).tolist(),
              "rejected_ids": torch.randint(1, 300, (r,)).tolist()} for p, c, r in [(5, 3, 6), (9, 2, 2), (3, 7, 1)]]
    flat = collate_packed(pair_sides(pairs), 0, 64, attention=FLAT)
    padded = collate(pair_sides(pairs), 0)
    assert flat["input_ids"].shape[0] == 1 and flat["n_examples"] == 6
    results = []
    for batch in (flat, padded):
        chosen, rejected = pair_logps(model, batch, len(pairs))
        (chosen - rejected).sum().backward()
        with torch.no_grad():
            results.append((chosen.detach(), rejected.detach(), *pair_logps(reference, batch, len(pairs)),
                            [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    for got, want in zip(results[0][:4], results[1][:4]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(results[0][4], results[1][4]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_n_examples_spares_the_loss_a_device_read(tmp_path, stand_in, monkeypatch):
    """The per-example sums are sized by the batch's n_examples (a Python int), not by reading owner.max() back."""
    model = tiny_model(tmp_path).eval()
    batch = collate_packed(random_examples(), 0, 64, attention=FLAT)
    batch["example_index"] = batch["example_index"].clone()
    batch["example_index"].max = None  # any call fails
    with torch.no_grad():
        nll, _ = sequence_nll(model, batch)
    assert nll.shape == (len(SHAPES),)
