"""One optimizer step gives the same loss, gradient and weights however the global batch is split over gradient-accumulation
micro-batches and processes; the lr schedule, the first-step loss and eval samples also hold with 2 processes.

Every run is the real `sft_train.main` (2 processes through `accelerate.debug_launcher`, gloo on CPU). With SGD, lr=1, no
warmup and no clipping, the weights after one update are w0 - g, so comparing them compares the gradients; the expected g
comes from autograd on an independent formula: each example forwarded alone, L = sum_i S_i / D.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher

import sft_train
import stage
from data.sft import build_split
from data.tokenize import TokenizeSettings
from modeling.load import load_model, load_tokenizer
from tests.test_schedule import expected as expected_lr
from tests.tiny import tiny_data, tiny_model_dir, tiny_run_args
from training.checkpoint import load_archive
from training.config import load_config

B = 8  # the global batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("invariance")
    model = tiny_model_dir(root / "model")
    train, test = tiny_data(root, n_train=B, n_test=8)
    return root, model, train, test


def one_step_args(tiny, run: str, normalize: str, ga: int, **overrides) -> list[str]:
    root, model, train, test = tiny
    return tiny_run_args(root, model, train, test, run_dir=root / run, batch_size=B, gradient_accumulation_steps=ga,
                         loss__normalize=normalize, optimizer="SGD", lr=1.0, warmup_steps=0, max_grad_norm=1e9,
                         n_epochs=1, do_first_eval=False, **overrides)


def reset_accelerate() -> None:
    """A forked process inherits the parent's single-process accelerate state: start from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_main(*argvs: list[str]) -> None:
    reset_accelerate()
    for argv in argvs:
        sft_train.main(argv)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss/train" in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_archive(run_dir / "LATEST" / "policy.pt")["state"]


def expected_step(tiny, normalize: str) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(loss, w0, w0 - g) with g the gradient of sum_i S_i / D, every example forwarded on its own."""
    root, model_dir, train, test = tiny
    config = load_config(one_step_args(tiny, "unused", normalize, 1))
    tokenizer = load_tokenizer(config.model)
    examples = build_split(["hh"], "train", {"hh": {"train": [str(train)]}}, tokenizer,
                           TokenizeSettings(config.max_length, config.max_prompt_length), str(root / "cache"))
    torch.manual_seed(config.seed)  # as main() does right before building the model
    model = load_model(config.model)
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sums, n_tokens = [], 0
    for e in examples:
        ids = torch.tensor([e["prompt_ids"] + e["response_ids"]])
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        supervised = torch.arange(len(targets)) >= len(e["prompt_ids"]) - 1
        sums.append(-(logps.gather(1, targets[:, None])[:, 0] * supervised).sum())
        n_tokens += int(supervised.sum())
    assert len(sums) == B
    total = torch.stack(sums).sum()
    loss = total / (B if normalize == "example" else n_tokens)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one parameter: step through parameters, read the state dict
            p -= p.grad
    return loss.item(), w0, {k: v.detach().clone() for k, v in model.state_dict().items()}


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], w0: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b - w0| over all weights: the gap relative to the size of the update."""
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b)
    den = sum(((b[k].double() - w0[k].double()) ** 2).sum() for k in b)
    return float((num / den).sqrt())


@pytest.mark.slow
def test_one_step_is_the_same_for_every_split(tiny):
    root = tiny[0]
    splits = {"1x1": 1, "1x4": 4}
    for normalize in ("example", "token"):
        for name, ga in splits.items():
            run_main(one_step_args(tiny, f"{normalize}-{name}", normalize, ga))
    debug_launcher(run_main, args=tuple(one_step_args(tiny, f"{n}-2x2", n, 2) for n in ("example", "token")), num_processes=2)

    updates = {}
    for normalize in ("example", "token"):
        loss, w0, w1 = expected_step(tiny, normalize)
        updates[normalize] = {k: w1[k] - w0[k] for k in w0}
        first = None
        for name in ("1x1", "1x4", "2x2"):
            run_dir = root / f"{normalize}-{name}"
            (step,) = train_records(run_dir)  # exactly one update
            assert step["loss/train"] == pytest.approx(loss, rel=1e-6), (normalize, name)
            assert relative_gap(weights(run_dir), w1, w0) < 1e-6, (normalize, name)
            if first is None:
                first = step
            assert step["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-6), (normalize, name)
            assert step["nll_per_token/train"] == pytest.approx(first["nll_per_token/train"], rel=1e-6), (normalize, name)
    # The check can tell the two normalisations apart: these lengths make them give clearly different updates.
    zero = {k: torch.zeros_like(v) for k, v in updates["example"].items()}
    assert relative_gap(updates["token"], updates["example"], zero) > 1e-3


@pytest.mark.slow
def test_two_processes_schedule_loss_and_samples(tiny):
    """lr at update k follows the schedule's formula with 1 and 2 processes (3 warmup updates, then cosine down to 0.1 x lr);
    both processes' samples land; a 2-process run stopped after 4 updates (mid-decay) and resumed ends bit-identical,
    samples included (per-process RNG)."""
    root, model, train, test = tiny
    common = dict(batch_size=4, gradient_accumulation_steps=1, n_epochs=3, warmup_steps=3, lr=1e-3, eval_every=8,
                  lr_schedule="cosine", min_lr_ratio=0.1,
                  sample_during_eval=True, n_eval_model_samples=3, max_new_tokens=4, n_eval_examples=8)
    one, two, chunked = root / "sched-1", root / "sched-2", root / "chunked-2"
    run_main(tiny_run_args(root, model, train, test, run_dir=one, **common))
    debug_launcher(run_main, num_processes=2, args=(
        tiny_run_args(root, model, train, test, run_dir=two, **common),
        tiny_run_args(root, model, train, test, run_dir=chunked, max_updates_this_run=4, **common),
        tiny_run_args(root, model, train, test, run_dir=chunked, resume_from="auto", **common),
    ))
    a, b = weights(two), weights(chunked)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (chunked / "samples.jsonl").read_text() == (two / "samples.jsonl").read_text()

    for run_dir in (one, two):
        steps = train_records(run_dir)
        assert [r["counters/updates"] for r in steps] == list(range(1, 7))  # 3 epochs of 2 batches
        for r in steps:
            k = r["counters/updates"] - 1
            assert r["lr"] == pytest.approx(1e-3 * expected_lr("cosine", k, 3, 6, 0.1), rel=1e-12), (run_dir.name, k)
    assert train_records(two)[0]["loss/train"] == pytest.approx(train_records(one)[0]["loss/train"], rel=1e-6)

    # eval order: the first n_eval_model_samples of the fixed eval order, at every eval (0, 8, 16, final 24)
    for run_dir in (one, two):
        rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        by_eval: dict[int, list[str]] = {}
        for row in rows:
            by_eval.setdefault(row["examples_seen"], []).append(row["example_id"])
            assert row["prompt"].startswith("\n\nHuman:") and isinstance(row["sample"], str)
        assert sorted(by_eval) == [0, 8, 16, 24], run_dir.name
        assert all(len(ids) == 3 and len(set(ids)) == 3 for ids in by_eval.values()), by_eval
        assert len({tuple(ids) for ids in by_eval.values()}) == 1  # the same prompts every time
    assert [json.loads(x)["example_id"] for x in (one / "samples.jsonl").read_text().splitlines()] == \
        [json.loads(x)["example_id"] for x in (two / "samples.jsonl").read_text().splitlines()]


def run_forced_fsdp(*argvs: list[str]) -> None:
    """sft_train.main under forced FSDP2 (tests/forcing.py); after every backward that is not a step's last, each process
    writes what it holds of the gradients to {run_dir}/grads-{rank}.json."""
    from tests.forcing import forced_accelerator, gradient_bytes

    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")

    def build(config):
        accelerator = forced_accelerator("fsdp", config)
        backward, calls, held = accelerator.backward, [], []

        def recording_backward(loss, **kwargs):
            backward(loss, **kwargs)
            calls.append(1)
            if len(calls) % config.gradient_accumulation_steps:  # not the step's last micro-batch
                held.append(gradient_bytes(accelerator._models[-1]))
                Path(config.run_dir, f"grads-{accelerator.process_index}.json").write_text(json.dumps(held))

        accelerator.backward = recording_backward
        return accelerator

    stage.build_accelerator = build  # this process is a fork: the patch ends with it
    run_main(*argvs)


@pytest.mark.slow
def test_fsdp2_accumulates_sharded_fp32_gradients_and_steps_as_the_formula(tiny):
    """2 processes x 2 micro-batches under forced FSDP2, in float32 and with fsdp_policy_mp=bfloat16: after the first
    micro-batch no process holds an unsharded gradient, only its float32 shard (half the model); the update equals the
    formula's (float32 to 1e-5 of its size, bf16 within bf16 tolerance)."""
    root, _, train, test = tiny
    untied = (root, tiny_model_dir(root / "model-untied", tied=False), train, test)  # FSDP2 units hold untied weights
    fsdp = dict(model__block_name="LlamaDecoderLayer")
    debug_launcher(run_forced_fsdp, num_processes=2, args=(
        one_step_args(untied, "fsdp-fp32", "token", 2, **fsdp),
        one_step_args(untied, "fsdp-bf16", "token", 2, model__fsdp_policy_mp="bfloat16", **fsdp),
    ))
    loss, w0, w1 = expected_step(untied, "token")
    n_params = sum(v.numel() for v in w0.values() if v.is_floating_point())
    for run, tolerance in (("fsdp-fp32", 1e-5), ("fsdp-bf16", 3e-2)):
        (step,) = train_records(root / run)
        assert step["loss/train"] == pytest.approx(loss, rel=tolerance / 3), run
        assert relative_gap(weights(root / run), w1, w0) < tolerance, run
        for rank in (0, 1):
            (held,) = json.loads((root / run / f"grads-{rank}.json").read_text())
            assert held["unsharded_bytes"] == 0, (run, rank, held)
            assert held["sharded_dtypes"] == ["torch.float32"], (run, rank, held)
            assert held["full_numel"] == n_params and held["sharded_bytes"] <= 4 * (n_params // 2 + 1024), (run, rank, held)
