"""Token-budget micro-batches (training/loop.py token_budget_micro_batches): every example once, the budget kept unless
one example alone exceeds it, the same number of micro-batches on every process, equal shares, the gathered order, and a
plan that depends on the batch alone."""

from __future__ import annotations

import random

import pytest
import torch

from training.loop import plan_gather_order, token_budget_micro_batches


def padded(lengths: list[int]) -> int:
    return len(lengths) * max(lengths)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("positions", [sum, padded])
@pytest.mark.parametrize("seed", range(5))
def test_every_example_once_within_budget_same_count_everywhere(world, positions, seed):
    rng = random.Random(seed)
    lengths = [int(16 * 32 ** rng.random()) for _ in range(32)]  # 16 to 512, log-uniform like the GPU check's data
    budget = 1024
    plan = token_budget_micro_batches(lengths, world, budget, positions)
    assert len(plan) == world
    assert len({len(micros) for micros in plan}) == 1  # FSDP: the same number of forwards on every process
    assert all(len(sum(micros, [])) == len(lengths) // world for micros in plan)  # equal shares: results are gathered
    assert sorted(plan_gather_order(plan)) == list(range(len(lengths)))  # every example exactly once
    for micros in plan:
        for micro in micros:
            assert micro and micro == sorted(micro)
            assert positions([lengths[i] for i in micro]) <= budget or len(micro) == 1
    assert plan == token_budget_micro_batches(list(lengths), world, budget, positions)  # from the batch alone


def test_budget_fills_micro_batches_and_a_long_example_goes_alone():
    # Longest first, first fit into 10 tokens: 9 alone, 6 + 4, 5 + 3 + 2 (as indices: [1], [3, 2], [5, 0, 4]).
    plan = token_budget_micro_batches([3, 9, 4, 6, 2, 5], 1, 10)
    assert plan == [[[0, 4, 5], [1], [2, 3]]]
    assert token_budget_micro_batches([3, 9, 4, 6, 2, 5], 1, 100) == [[[0, 1, 2, 3, 4, 5]]]


def test_processes_with_fewer_micro_batches_split_their_fullest():
    # Snake dealing, longest first: process 0 gets lengths 12, 4, 3, 1 and process 1 gets 8, 6, 2, 2. Budget 12: process 0
    # makes 12 | 4 3 1 and process 1 8 2 2 | 6, two each already.
    lengths = [12, 8, 6, 4, 3, 2, 2, 1]
    plan = token_budget_micro_batches(lengths, 2, 12)
    assert [len(m) for m in plan] == [2, 2]
    assert sorted(sum(plan[0], [])) == [0, 3, 4, 7] and sorted(sum(plan[1], [])) == [1, 2, 5, 6]
    plan = token_budget_micro_batches(lengths, 2, 18)
    assert [len(m) for m in plan] == [2, 2]  # process 1 (8 6 2 2 = 18) fits one but splits to match process 0 (12 | 4 3 1)


def test_gathered_results_follow_the_plan_order():
    """Per-example values computed per process in micro-batch order, gathered over processes, line up with
    plan_gather_order, as raise_if_not_finite and the metrics expect."""
    lengths = [7, 3, 9, 1, 4, 4, 8, 2]
    plan = token_budget_micro_batches(lengths, 2, 10)
    values = torch.tensor([float(i) for i in range(len(lengths))]) * 10  # value of example i: 10 i
    gathered = torch.cat([torch.cat([values[micro] for micro in micros]) for micros in plan])
    assert (gathered == values[plan_gather_order(plan)]).all()


def test_refuses_unequal_shares_and_an_empty_budget():
    with pytest.raises(ValueError, match="cannot be shared equally by 2"):
        token_budget_micro_batches([1, 2, 3], 2, 10)
    with pytest.raises(ValueError, match="must be positive"):
        token_budget_micro_batches([1, 2], 1, 0)


def test_config_refuses_a_budget_below_max_length_or_with_accumulation():
    from training.checks import validate
    from training.config import ConfigError, load_config

    base = ["exp_name=t", "model=blank_model", "model.name_or_path=recipes/demo", "max_length=64", "max_prompt_length=32"]
    validate(load_config([*base, "max_tokens_per_micro_batch=64"]))
    validate(load_config([*base, "max_tokens_per_micro_batch=500", "packing=true"]))
    with pytest.raises(ConfigError, match=r"max_tokens_per_micro_batch \(63\) is less than max_length \(64\).*"
                                          r"use max_tokens_per_micro_batch=64 or more"):
        validate(load_config([*base, "max_tokens_per_micro_batch=63"]))
    with pytest.raises(ConfigError, match=r"drop gradient_accumulation_steps=2 \(or set max_tokens_per_micro_batch=null"):
        validate(load_config([*base, "max_tokens_per_micro_batch=128", "gradient_accumulation_steps=2", "batch_size=8"]))
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch"):
        validate(load_config([*base, "max_tokens_per_micro_batch=0"]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny import tiny_data, tiny_model_dir

    root = tmp_path_factory.mktemp("budget")
    return root, tiny_model_dir(root / "model"), *tiny_data(root, n_train=16, n_test=4)


def budget_run(tiny, monkeypatch, name: str, **overrides) -> tuple[list[dict], list[int]]:
    """A tiny fp32 run in this process: its training records and the micro-batch count of each step on process 0. The
    device gets a peak of 1 TFLOP/s, so both stages report mfu on CPU too."""
    import json

    import stage
    from accelerate.state import AcceleratorState, GradientState
    from tests.tiny import tiny_run_args
    from training.loop import micro_batch_plan as plan

    root, model, train, test = tiny
    counts = []

    def counting(*args, **kwargs):
        result = plan(*args, **kwargs)
        counts.append(len(result[0]))
        return result

    monkeypatch.setattr(stage, "micro_batch_plan", counting)
    monkeypatch.setattr(stage, "device_peak_flops", lambda device, dtype: 1e12)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    argv = tiny_run_args(root, model, train, test, run_dir=root / name, batch_size=8, n_epochs=1, eval_every=8, lr=1e-2,
                         do_first_eval=False, **overrides)
    main = __import__("dpo_train" if overrides.get("loss__name") == "dpo" else "sft_train").main
    main(argv)
    lines = (root / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "grad_norm" in r], counts


TRAIN_KEYS = ("loss/train", "grad_norm")


@pytest.mark.parametrize("packing", [False, True])
def test_sft_token_budget_steps_equal_fixed_micro_batches(tiny, monkeypatch, packing):
    """The same SFT steps (losses, gradient norms, eval losses) whether a step's 8 examples are 2 fixed micro-batches or
    as many as a budget of max_length positions needs: the loss denominator is the whole step's."""
    fixed, fixed_counts = budget_run(tiny, monkeypatch, f"sft-fixed-{packing}", gradient_accumulation_steps=2, packing=packing)
    budget, budget_counts = budget_run(tiny, monkeypatch, f"sft-budget-{packing}", max_tokens_per_micro_batch=64,
                                       packing=packing)
    assert fixed_counts == [2, 2] and all(n > 2 for n in budget_counts)
    assert len(fixed) == len(budget) == 2 and all(r["mfu"] > 0 for r in fixed + budget)
    for a, b in zip(fixed, budget):
        for key in TRAIN_KEYS + ("nll_per_token/train",):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
    assert budget[-1]["padding_fraction"] < fixed[-1]["padding_fraction"] or packing  # narrower padded micro-batches


def test_dpo_token_budget_steps_equal_fixed_micro_batches(tiny, monkeypatch):
    """DPO plans on pairs, a pair costing the positions of both its sides; the steps equal those of fixed micro-batches."""
    dpo = dict(loss__name="dpo", loss__beta=0.5, model__reference_dtype="float32")
    fixed, _ = budget_run(tiny, monkeypatch, "dpo-fixed", **dpo)
    budget, budget_counts = budget_run(tiny, monkeypatch, "dpo-budget", max_tokens_per_micro_batch=128, **dpo)
    assert all(n > 1 for n in budget_counts)
    assert len(fixed) == len(budget) == 2 and all(r["mfu"] > 0 for r in fixed + budget)  # the same accounting as SFT
    for a, b in zip(fixed, budget):
        for key in TRAIN_KEYS + ("rewards_train/margins", "logps_train/chosen"):  # fp32: narrower rows reorder sums
            assert b[key] == pytest.approx(a[key], rel=5e-6, abs=1e-7), key
