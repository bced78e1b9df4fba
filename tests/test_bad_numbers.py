"""A non-finite loss stops the run at once, naming the update, the examples whose loss broke, the batch and the last checkpoint.

The data-dependent case: an archive whose embedding row of one token is NaN (untied head, so only sequences that contain the
token go NaN). Training runs normally, saving checkpoints, until the first batch with that token.
"""

from __future__ import annotations

import re

import pytest
import torch

import sft_train
from data.batches import plan_batches
from data.sft import build_split
from data.tokenize import TokenizeSettings
from modeling.load import load_model, load_tokenizer
from tests.tiny import tiny_data, tiny_model_dir, tiny_run_args
from training.config import load_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_numbers")
    model = tiny_model_dir(root / "model", tied=False)
    train, test = tiny_data(root, n_train=24, n_test=4)
    return root, model, train, test


def args(tiny, run: str, **overrides) -> list[str]:
    root, model, train, test = tiny
    return tiny_run_args(root, model, train, test, run_dir=root / run, batch_size=4, eval_every=4, **overrides)


def test_nan_in_one_token_names_update_examples_and_last_checkpoint(tiny):
    root = tiny[0]
    config = load_config(args(tiny, "nan-token"))
    tokenizer = load_tokenizer(config.model)
    examples = build_split(["hh"], "train", {"hh": {"train": [str(tiny[2])]}}, tokenizer,
                           TokenizeSettings(config.max_length, config.max_prompt_length), str(root / "cache"))
    batches = [p.indices for p in plan_batches(len(examples), 4, config.seed, 1, None)]
    tokens = [set(examples[i]["prompt_ids"] + examples[i]["response_ids"]) for i in range(len(examples))]
    seen_early = set().union(*(tokens[i] for b in batches[:2] for i in b))
    evals = build_split(["hh"], "test", {"hh": {"test": [str(tiny[3])]}}, tokenizer,
                        TokenizeSettings(config.max_length, config.max_prompt_length), str(root / "cache"))
    in_eval = set().union(*(set(e["prompt_ids"] + e["response_ids"]) for e in evals))
    # a token first met in the third batch and absent from the eval set (so step-8's eval stays finite);
    # that batch's examples without it must train fine
    token = min(set().union(*(tokens[i] for i in batches[2])) - seen_early - in_eval)
    broken = [examples[i]["example_id"] for i in batches[2] if token in tokens[i]]
    assert 0 < len(broken) < 4

    torch.manual_seed(0)
    state = load_model(config.model).state_dict()
    state["model.embed_tokens.weight"][token] = float("nan")
    archive = root / "nan-token.pt"
    torch.save({"step_idx": 0, "state": state, "metrics": {}}, archive)

    with pytest.raises(FloatingPointError) as error:
        sft_train.main(args(tiny, "nan-token", model__archive=archive))
    message = str(error.value)
    assert "non-finite loss at update 3 (8 examples seen)" in message
    assert f"in examples {broken} of the batch {[examples[i]['example_id'] for i in batches[2]]}" in message
    assert message.endswith(f"last good checkpoint: {root / 'nan-token' / 'step-8'}")
    assert not (root / "nan-token" / "LATEST").exists()


def test_huge_learning_rate_stops_at_the_first_non_finite_loss(tiny):
    """lr=1e30 sends the weights to ~1e30 at update 1: the eval at 4 and update 2 overflow. step-4 is written (its eval loss
    is NaN), so it exists but is no good checkpoint."""
    with pytest.raises(FloatingPointError, match=re.escape("non-finite loss at update 2 (4 examples seen)")) as error:
        sft_train.main(args(tiny, "huge-lr", optimizer="SGD", lr=1e30, warmup_steps=0))
    assert (tiny[0] / "huge-lr" / "step-4" / "complete").is_file()
    assert str(error.value).endswith("last good checkpoint: none")
