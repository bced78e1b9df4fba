"""compile=true: the same losses as eager, a graph count that stops growing after the first steps although the batches keep
changing shape, graph breaks counted and reported once, plain policy.pt keys, and refusals before any work.

Each compiled run costs compile time on CPU, so there are few of them: SFT padded (GA 2, evals, samples, a stop and a
resume), SFT packed (sdpa_packed), DPO, and one 2-process FSDP2 run (tests/test_distributed.py's recipe); LoRA's compiled
blocks are checked on three packed micro-batches, without a run. tests/conftest.py has inductor build scalar CPU kernels.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

import dpo_train
import sft_train
import stage
from data.packing import Collate
from tests.tiny import tiny_data, tiny_model_dir, tiny_run_args
from training.checkpoint import load_archive
from training.compilation import check_compile
from training.checks import validate
from training.config import ConfigError, load_config


def has_cpp_compiler() -> bool:
    """inductor's CPU kernels need one (torch's own search: $CXX, else g++); without it compile=true is refused."""
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return False
    return True


compiles = pytest.mark.skipif(not has_cpp_compiler(), reason="no C++ compiler for inductor's CPU kernels")

BLOCK = {"model__block_name": "LlamaDecoderLayer"}


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(eager: list[dict], compiled: list[dict], keys: tuple[str, ...], rel: float = 1e-4,
                       abs: float = 1e-5) -> None:  # noqa: A002  abs: DPO's rewards start at 0 (policy == reference)
    assert [r["examples_seen"] for r in eager] == [r["examples_seen"] for r in compiled]
    for a, b in zip(eager, compiled):
        for key in keys:
            assert (key in a) == (key in b)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=abs), (a["examples_seen"], key)


def reports(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("torch.compile: ")]



def record_collate(monkeypatch, record) -> None:
    """A run's collate calls `record(batch)` on every micro-batch it builds."""
    collate_for = stage.collate_for

    class Recording(Collate):
        def __call__(self, examples):
            batch = super().__call__(examples)
            record(batch)
            return batch

    monkeypatch.setattr(stage, "collate_for", lambda config, pad_id: Recording(**vars(collate_for(config, pad_id))))


@pytest.mark.slow
@compiles
def test_compiled_padded_run_matches_eager_stops_compiling_and_resumes(tmp_path, caplog, monkeypatch):
    """Padded batches (width = the longest example of each micro-batch, so nearly every micro-batch has a new shape), GA 2,
    evals with samples; the compiled run stops after 4 updates and resumes (compiling again in the resumed process)."""
    model = tiny_model_dir(tmp_path / "model")
    train, test = tiny_data(tmp_path, n_train=32, n_test=8)
    common = dict(batch_size=4, gradient_accumulation_steps=2, n_epochs=1, eval_every=16, loss__logits_chunk_tokens=16,
                  sample_during_eval=True, n_eval_model_samples=2, **BLOCK)
    sft_train.main(tiny_run_args(tmp_path, model, train, test, run_dir=tmp_path / "eager", **common))

    shapes = []
    record_collate(monkeypatch, lambda batch: shapes.append(tuple(batch["input_ids"].shape)))
    run_dir = tmp_path / "compiled"
    with caplog.at_level(logging.INFO, logger="training.loop"):
        sft_train.main(tiny_run_args(tmp_path, model, train, test, run_dir=run_dir, compile=True, max_updates_this_run=5,
                                     **common))
        first = records(run_dir)
        sft_train.main(tiny_run_args(tmp_path, model, train, test, run_dir=run_dir, compile=True, resume_from="auto",
                                     **common))
    eager, compiled = records(tmp_path / "eager"), records(run_dir)
    assert_same_losses(eager, compiled, ("loss/train", "grad_norm", "loss/eval", "nll_per_token/eval"))

    steps = [r for r in first if "compile/graphs" in r]
    assert len(steps) == 5
    graphs = [r["compile/graphs"] for r in steps]
    # the micro-batches keep changing shape, yet from the second step on (through the eval at 16) no graph is added
    assert graphs[0] > 0 and graphs[1:] == [graphs[1]] * 4, graphs
    assert len({width for _, width in shapes}) >= 3, shapes
    resumed = [r["compile/graphs"] for r in records(run_dir) if "compile/graphs" in r][5:]
    assert len(resumed) == 3 and resumed[0] > 0 and resumed[1:] == [resumed[1]] * 2, resumed  # compiled afresh, then flat
    assert all(r["compile/graph_breaks"] == 0 for r in steps)  # padded: the blocks compile whole
    lines = reports(caplog)
    assert len(lines) == 2 and all(line.startswith("torch.compile: ") and "graphs compiled, 0 graph breaks" in line
                                   for line in lines), lines  # once per invocation

    state = load_archive(run_dir / "LATEST" / "policy.pt")["state"]
    reference = load_archive(tmp_path / "eager" / "LATEST" / "policy.pt")["state"]
    assert list(state) == list(reference) and not any("_orig_mod" in k for k in state)
    for key in reference:
        torch.testing.assert_close(state[key], reference[key], atol=1e-5, rtol=1e-4, msg=key)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["examples_seen"] for s in samples] == [0, 0, 16, 16, 32, 32]


@pytest.mark.slow
@compiles
def test_compiled_packed_run_matches_eager_without_a_recompile_per_packing(tmp_path, caplog, monkeypatch):
    """packing=true with sdpa_packed: each micro-batch packs its 8 examples into other rows and spans; the attention call
    runs outside the graph (one break per block frame, reported), and the graph count is flat after the first step."""
    model = tiny_model_dir(tmp_path / "model")
    train, test = tiny_data(tmp_path, n_train=32, n_test=8)
    common = dict(batch_size=8, n_epochs=1, eval_every=16, packing=True, **BLOCK)
    sft_train.main(tiny_run_args(tmp_path, model, train, test, run_dir=tmp_path / "eager", **common))
    layouts = []
    record_collate(monkeypatch, lambda batch: layouts.append(tuple(len(row) for row in batch["packed_spans"])))
    with caplog.at_level(logging.INFO, logger="training.loop"):
        sft_train.main(tiny_run_args(tmp_path, model, train, test, run_dir=tmp_path / "compiled", compile=True, **common))
    eager, compiled = records(tmp_path / "eager"), records(tmp_path / "compiled")
    assert_same_losses(eager, compiled, ("loss/train", "grad_norm", "loss/eval", "nll_per_token/eval"))
    steps = [r for r in compiled if "compile/graphs" in r]
    graphs, breaks = [r["compile/graphs"] for r in steps], [r["compile/graph_breaks"] for r in steps]
    assert len(steps) == 4 and graphs[1:] == [graphs[1]] * 3 and breaks[1:] == [breaks[1]] * 3, (graphs, breaks)
    assert len(set(layouts)) >= 3, layouts  # examples per row differ from batch to batch
    (line,) = reports(caplog)
    assert f"{breaks[0]} graph breaks" in line and "torch.compiler.disable" in line and breaks[0] > 0, line


@compiles
def test_compiled_lora_blocks_match_eager_lora(tmp_path, monkeypatch):
    """lora.enabled=true with compile=true: the blocks are compiled with their adapters inside (the base frozen). On packed
    micro-batches of three different packings, the per-example NLL and every adapter's gradient equal eager LoRA's, and the
    graph count does not grow after the first. The blocks go through dynamo and AOT autograd (what captures peft's layers
    and guards on them) with the aot_eager backend: inductor's C++ kernels for LoRA's extra matmuls would cost a minute on
    2 cores, and inductor itself is what the whole compiled runs above check."""
    import transformers

    from data.packing import collate_packed
    from modeling.compile import compile_model
    from modeling.lora import add_adapters
    from modeling.loss import sequence_nll
    from training.compilation import compile_metrics

    config = load_config(["exp_name=t", "compile=true", "lora.enabled=true", "lora.r=4", "lora.alpha=8", "packing=true",
                          "model.block_name=LlamaDecoderLayer"])
    model_config = transformers.AutoConfig.from_pretrained(tiny_model_dir(tmp_path / "model", layers=1))

    def lora_model():
        torch.manual_seed(0)
        model = add_adapters(transformers.AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa_packed"),
                             config.lora)
        with torch.no_grad():  # B starts at zero: give it values, so the adapters change the outputs and get A gradients
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        return model

    eager, compiled = lora_model(), lora_model()
    module_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: module_compile(self, backend="aot_eager", **kw))
    assert compile_model(config, compiled) == model_config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    graphs = []
    for n_examples in (5, 8, 6):
        lengths = torch.randint(3, 14, (n_examples, 2), generator=g).tolist()
        examples = [{"prompt_ids": torch.randint(1, 300, (p,), generator=g).tolist(),
                     "response_ids": torch.randint(1, 300, (r,), generator=g).tolist()} for p, r in lengths]
        batch = collate_packed(examples, 0, 32)
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            nll, _ = sequence_nll(model, batch)
            nll.sum().backward()
            results.append((nll.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
        (nll_e, grads_e), (nll_c, grads_c) = results
        torch.testing.assert_close(nll_c, nll_e, rtol=1e-4, atol=1e-5)
        assert set(grads_c) == set(grads_e) and any("lora_A" in k for k in grads_e) and grads_e
        assert not any("lora" not in k for k in grads_e)  # the base is frozen
        for key in grads_e:
            torch.testing.assert_close(grads_c[key], grads_e[key], rtol=1e-4, atol=1e-6, msg=key)
        graphs.append(compile_metrics()["compile/graphs"])
    assert graphs[0] > 0 and graphs[2] == graphs[1], graphs


@pytest.mark.slow
@compiles
def test_compiled_dpo_run_matches_eager(tmp_path):
    """The policy's blocks compiled, the reference eager: losses, rewards (so the reference log-probs too) and grad norms
    equal eager's."""
    model = tiny_model_dir(tmp_path / "model")
    train, test = tiny_data(tmp_path, n_train=16, n_test=8)
    common = dict(loss__name="dpo", loss__beta=0.5, model__reference_dtype="float32", batch_size=4,
                  gradient_accumulation_steps=2, eval_every=8, **BLOCK)
    dpo_train.main(tiny_run_args(tmp_path, model, train, test, run_dir=tmp_path / "eager", **common))
    dpo_train.main(tiny_run_args(tmp_path, model, train, test, run_dir=tmp_path / "compiled", compile=True, **common))
    eager, compiled = records(tmp_path / "eager"), records(tmp_path / "compiled")
    assert_same_losses(eager, compiled, ("loss/train", "grad_norm", "rewards_train/chosen", "rewards_train/rejected",
                                         "logps_train/chosen", "loss/eval", "rewards_eval/chosen", "rewards_eval/margins"))
    graphs = [r["compile/graphs"] for r in compiled if "compile/graphs" in r]
    assert len(graphs) == 4 and graphs[0] > 0, graphs


def test_compile_needs_a_block_name():
    with pytest.raises(ConfigError, match="compile=true compiles each transformer block: set model.block_name"):
        validate(load_config(["exp_name=t", "model.name_or_path=recipes/demo", "compile=true"]))
    validate(load_config(["exp_name=t", "model.name_or_path=recipes/demo", "compile=true", "model.block_name=X"]))


def test_compile_is_refused_with_tensor_parallelism():
    config = load_config(["exp_name=t", "compile=true"])
    with pytest.raises(ConfigError, match="compile=true with tensor parallelism is not supported"):
        check_compile(config, torch.device("cpu"), "tp")
    check_compile(config, torch.device("cpu"), "fsdp")


def test_compile_without_a_cpp_compiler_fails_before_any_work(tmp_path, monkeypatch):
    """torch's own compiler search (its cpp.cxx setting, from $CXX or g++) finds nothing: one line, before the run dir is
    claimed or anything is loaded."""
    import torch._inductor.config as inductor

    model = tiny_model_dir(tmp_path / "model")
    train, test = tiny_data(tmp_path, n_train=8, n_test=4)
    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-compiler-here",))
    with pytest.raises(ConfigError, match="compile=true on CPU needs a C\\+\\+ compiler"):
        sft_train.main(tiny_run_args(tmp_path, model, train, test, compile=True, **BLOCK))
    assert not (tmp_path / "run").exists()
    config = load_config(["exp_name=t", "compile=false"])
    check_compile(config, torch.device("cpu"), "single")  # compile=false: nothing is asked of the toolchain


@pytest.mark.slow
@compiles
def test_compiled_fsdp2_two_processes_match_one_eager_process(dist_runs, tmp_path):
    """Blocks compiled before accelerator.prepare shards them (FSDP2 forced on 2 CPU processes): the losses, grad norms,
    evals, samples and the full policy.pt and optimizer.pt equal one eager process's (tests/conftest.py dist_runs)."""
    from tests.test_distributed import assert_same_training, launch, metrics

    eager = dist_runs["1proc"]
    # dist_runs["tmp"]: the data cache of the 1-process run, so the 2 processes do not tokenize the demo's rows again
    fsdp = launch(dist_runs["tmp"], tmp_path / "fsdp", dist_runs["model"], "fsdp", "compile=true", "save_full_optimizer=true")
    assert_same_training(fsdp, eager, rel=1e-4)
    assert [m["compile/graphs"] > 0 for m in metrics(fsdp) if "loss/train" in m] == [True] * 3
    units = dict(json.loads((fsdp / "parallel.json").read_text())["fsdp_units"])
    assert {name for name, cls in units.items() if cls == "FSDPLlamaDecoderLayer"} == {"model.layers.0", "model.layers.1"}
