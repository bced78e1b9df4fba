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
