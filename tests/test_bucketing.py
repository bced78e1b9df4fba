"""Length-bucketed batching: the reference's examples per epoch, less padding, a function of the seed, resumable anywhere."""

from __future__ import annotations

import json
import random

import pytest
import torch

import sft_train
from data.batches import plan_batches, plan_length_bucketed, plan_train_batches
from tests.tiny import tiny_data, tiny_model_dir, tiny_run_args
from training import checkpoint as ckpt

RNG = random.Random(7)
LENGTHS = [RNG.randint(5, 500) for _ in range(103)]


def plans(**kwargs):
    args = dict(lengths=LENGTHS, batch_size=4, seed=0, n_epochs=3, n_examples=None, window_batches=5) | kwargs
    return list(plan_length_bucketed(**args))


def padding(batches: list[list[int]]) -> int:
    return sum(len(b) * max(LENGTHS[i] for i in b) - sum(LENGTHS[i] for i in b) for b in batches)


def test_same_examples_per_epoch_as_the_reference():
    reference = list(plan_batches(len(LENGTHS), 4, 0, 3, None))
    ours = plans()
    assert len(ours) == len(reference) == 3 * 25  # 103 examples: 25 full batches an epoch, 3 dropped
    for epoch in range(3):
        ref_ids = sorted(i for p in reference if p.epoch == epoch for i in p.indices)
        our_ids = sorted(i for p in ours if p.epoch == epoch for i in p.indices)
        assert our_ids == ref_ids
    assert [(p.epoch, p.offset, p.examples_counted) for p in ours] == [(p.epoch, p.offset, p.examples_counted) for p in reference]
    assert [p.indices for p in ours] != [p.indices for p in reference]


def test_batches_hold_similar_lengths():
    ours, reference = plans(), list(plan_batches(len(LENGTHS), 4, 0, 3, None))
    assert padding([p.indices for p in ours]) < padding([p.indices for p in reference]) / 3
    # One window for the whole epoch: it is sorted before being cut, so the batches' length ranges do not overlap.
    epoch0 = sorted(plans(n_epochs=1, window_batches=100), key=lambda p: min(LENGTHS[i] for i in p.indices))
    assert all(max(LENGTHS[i] for i in a.indices) <= min(LENGTHS[i] for i in b.indices) for a, b in zip(epoch0, epoch0[1:]))


def test_a_function_of_the_seed():
    assert [p.indices for p in plans()] == [p.indices for p in plans()]
    assert [p.indices for p in plans(seed=1)] != [p.indices for p in plans()]
    # Not sorted globally: the batch order is shuffled.
    first = [max(LENGTHS[i] for i in p.indices) for p in plans(n_epochs=1)]
    assert first != sorted(first)


@pytest.mark.parametrize("k", [0, 7, 24, 25, 40, 74])
def test_resume_from_any_position(k):
    full = plans()
    resumed = plans(start_epoch=full[k].epoch, start_offset=full[k].offset)
    assert resumed == full[k:]


def test_stops_at_n_examples_like_the_reference():
    ours = plans(n_epochs=None, n_examples=110)
    reference = list(plan_batches(len(LENGTHS), 4, 0, None, 110))
    assert [(p.epoch, p.offset, p.examples_counted) for p in ours] == [(p.epoch, p.offset, p.examples_counted) for p in reference]
    assert ours[-1].examples_counted == 111  # 103 + 2 batches of 4 in epoch 1 reach 110 at 111


def test_reference_mode_is_plan_batches():
    dataset = {"prompt_ids": [[1] * n for n in LENGTHS], "response_ids": [[2]] * len(LENGTHS)}
    assert list(plan_train_batches("reference", LENGTHS, 4, 0, 2, None, 1, 8)) == list(plan_batches(len(LENGTHS), 4, 0, 2, None, 1, 8))
    bucketed = list(plan_train_batches("length_bucketed", dataset, 4, 0, 2, None, window_batches=5))
    assert bucketed == list(plan_length_bucketed([n + 1 for n in LENGTHS], 4, 0, 2, None, window_batches=5))
    with pytest.raises(ValueError, match="unknown batching 'sorted'"):
        plan_train_batches("sorted", LENGTHS, 4, 0, 2, None)


def test_bucketed_run_resumes_bit_identical(tmp_path):
    """The CLI with batching=length_bucketed, stopped inside the second epoch and resumed, ends as the uninterrupted run."""
    model = tiny_model_dir(tmp_path / "model")
    train, test = tiny_data(tmp_path, n_train=18, n_test=4)

    def run(run_dir, **overrides):
        sft_train.main(tiny_run_args(tmp_path, model, train, test, run_dir=run_dir, batching="length_bucketed", n_epochs=2,
                                     length_bucket_window=2, **overrides))
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full")
    run(tmp_path / "part", max_updates_this_run=5)
    resumed = run(tmp_path / "part", resume_from="auto")
    losses = [r["loss/train"] for r in full if "loss/train" in r]
    assert len(losses) == 8
    assert [r["loss/train"] for r in resumed if "loss/train" in r] == losses
    a = ckpt.load_archive(tmp_path / "full" / "LATEST" / "policy.pt")["state"]
    b = ckpt.load_archive(tmp_path / "part" / "LATEST" / "policy.pt")["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
