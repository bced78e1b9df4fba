"""The DPO stage: the reference's own DPO run reproduced, its loss formulas, pair data and legacy archives.

    python -m pytest tests/test_dpo.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import dpo_train
import stage
from data.batches import plan_batches
from data.pairs import describe, identical_pairs, pair_sides, prompt_groups, truncate_pair
from modeling.dpo import preference_loss
from modeling.load import load_archive_state, load_model
from training.checkpoint import CheckpointError
from training.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def reference_dpo_args(hh: Path, reference: Path, run_dir: Path, **extra) -> list[str]:
    """The settings of the reference's recorded DPO run (shared/data/reference/dpo/README.md)."""
    args = {
        "exp_name": "golden_dpo", "model": "blank_model", "model.name_or_path": reference / "tiny-gpt2",
        "model.archive": reference / "dpo" / "reference_sft_policy.pt", "model.reference_dtype": "float32",
        "loss.name": "dpo", "loss.beta": 0.1, "data_files.hh.train": hh, "data_files.hh.test": hh, "datasets": "[hh]",
        "batch_size": 4, "gradient_accumulation_steps": 2, "lr": 1e-4, "warmup_steps": 5, "n_epochs": "null",
        "n_examples": 80, "n_eval_examples": 32, "eval_batch_size": 16, "eval_every": 40, "do_first_eval": "true",
        "sample_during_eval": "false", "max_length": 512, "max_prompt_length": 256, "optimizer": "RMSprop",
        "max_grad_norm": 10.0, "seed": 0, "model.policy_dtype": "float32", "minimum_log_interval_secs": 0,
        "wandb.enabled": "false", "run_dir": run_dir, "export": "false", "local_dirs": f"[{run_dir.parent / 'cache'}]",
    }
    return [f"{k}={v}" for k, v in {**args, **extra}.items()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_matches(golden: dict, ours: dict) -> None:
    """Losses, grad norms and log-probs to 1e-4 relative, rewards to 1e-4 absolute, accuracies exactly."""
    for key, value in golden.items():
        if key.startswith(("_", "counters/")) or key == "examples_per_second":
            continue
        where = f"{key} at {golden['_step_examples']}"
        if key.endswith("/accuracies"):
            assert ours[key] == value, where
        elif key.startswith("rewards_"):
            assert ours[key] == pytest.approx(value, abs=1e-4), where
        else:
            assert ours[key] == pytest.approx(value, rel=1e-4), where


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_matches_the_reference_run_on_real_hh(loss, hh_rows_path, reference_dir, tmp_path):
    """Every train and eval metric of the reference's DPO and IPO runs on the 300 real HH rows, started from the reference's
    own transformers-4.29 SFT policy.pt: pair order, truncation, concatenated forward, summed log-probs, loss, rewards,
    schedule and RMSprop. IPO's squared loss and clipped large gradients make it the most sensitive to how the summed
    log-probs round (modeling/loss.py example_sums)."""
    run_dir = tmp_path / "run"
    dpo_train.main(reference_dpo_args(hh_rows_path, reference_dir, run_dir, **{"loss.name": loss}))
    golden = read_jsonl(reference_dir / "dpo" / f"hh300_{loss}_golden_metrics.jsonl")
    ours = read_jsonl(run_dir / "metrics.jsonl")
    golden_train, ours_train = [g for g in golden if "loss/train" in g], [o for o in ours if "loss/train" in o]
    assert [g["_step_examples"] for g in golden_train] == [o["examples_seen"] for o in ours_train] == list(range(4, 81, 4))
    for g, o in zip(golden_train, ours_train):
        assert_matches(g, o)
    golden_eval, ours_eval = [g for g in golden if "loss/eval" in g], [o for o in ours if "loss/eval" in o]
    assert [g["_step_examples"] for g in golden_eval] == [0, 40]
    assert [o["examples_seen"] for o in ours_eval] == [0, 40, 80]  # plus a final eval, so LATEST carries metrics
    for g, o in zip(golden_eval, ours_eval):
        assert_matches(g, o)
    at_start = math.log(2) if loss == "dpo" else (1 / (2 * 0.1)) ** 2  # policy = reference: h = 0
    assert ours_eval[0]["loss/eval"] == pytest.approx(at_start, rel=1e-6)
    assert ours_train[0]["loss/train"] == pytest.approx(at_start, rel=1e-6)
    assert ours_eval[0]["rewards_eval/accuracies"] == 0.0  # strict comparison of equal rewards
    latest = torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)
    assert latest["step_idx"] == 80 and latest["metrics"]["loss/eval"] == ours_eval[-1]["loss/eval"]
    assert not any(".attn.bias" in k or "masked_bias" in k for k in latest["state"])  # written with current keys


def test_preference_loss_formulas():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -5.0])
    h = torch.tensor([(-10 + 12) - (-11 + 11), (-4 + 3) - (-4 + 5)])  # [2, -2]
    beta = 0.5
    losses, chosen, rejected = preference_loss(pc, pr, rc, rr, "dpo", beta)
    torch.testing.assert_close(losses, torch.log1p(torch.exp(-beta * h)))
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))
    conservative, _, _ = preference_loss(pc, pr, rc, rr, "dpo", beta, label_smoothing=0.25)
    torch.testing.assert_close(conservative, 0.75 * torch.log1p(torch.exp(-beta * h)) + 0.25 * torch.log1p(torch.exp(beta * h)))
    ipo, _, _ = preference_loss(pc, pr, rc, rr, "ipo", beta)
    torch.testing.assert_close(ipo, (h - 1 / (2 * beta)) ** 2)  # [1, 9]
    free, chosen_free, _ = preference_loss(pc, pr, rc, rr, "dpo", beta, reference_free=True)
    torch.testing.assert_close(free, torch.log1p(torch.exp(-beta * (pc - pr))))
    torch.testing.assert_close(chosen_free, chosen)  # rewards still use the reference's log-probs, as the reference does


def test_pair_truncation_follows_the_longer_response():
    prompt, short, long = list(range(10)), [90, 0], list(range(100, 108)) + [0]  # responses end with EOS 0
    # 10 + 9 > 16: the prompt keeps its last 6 (keep_end); 6 + 9 fits, so the responses stay whole
    assert truncate_pair(prompt, short, long, "keep_end", 16, 6) == (list(range(4, 10)), short, long)
    assert truncate_pair(prompt, long, short, "keep_start", 16, 6) == (list(range(6)), long, short)
    # 6 + 9 > 12: both responses keep their first 12 - 6 tokens (the longer one loses its EOS)
    assert truncate_pair(prompt, short, long, "keep_end", 12, 6) == (list(range(4, 10)), short, long[:6])
    assert truncate_pair(prompt, short, short, "keep_end", 64, 6) == (prompt, short, short)  # fits: nothing cut


def test_pairs_keep_their_prompt_together_in_the_data_order():
    """The reference shuffles prompts and iterates each prompt's pairs in `pairs` order; batches span prompts."""
    groups = [[0, 1, 2], [3], [4, 5]]
    plans = list(plan_batches(6, 2, 0, 1, None, groups=groups))
    flat = [i for p in plans for i in p.indices]
    order = __import__("data.batches", fromlist=["epoch_order"]).epoch_order(3, 0, 0)
    assert flat == [i for g in order for i in groups[g]]
    assert [p.examples_counted for p in plans] == [2, 4, 6]


def test_pair_sides_put_all_chosen_before_all_rejected():
    pairs = [{"prompt_ids": [1], "chosen_ids": [2, 0], "rejected_ids": [3, 3, 0]},
             {"prompt_ids": [4, 4], "chosen_ids": [5, 0], "rejected_ids": [6, 0]}]
    sides = pair_sides(pairs)
    assert [s["response_ids"] for s in sides] == [[2, 0], [5, 0], [3, 3, 0], [6, 0]]
    assert [s["prompt_ids"] for s in sides] == [[1], [4, 4], [1], [4, 4]]


def test_identical_pairs_after_truncation_are_counted(tmp_path):
    from data.pairs import build_pair_split
    from data.tokenize import TokenizeSettings

    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: red blue green", "rejected": "\n\nHuman: hi\n\nAssistant: red blue gold"},
            {"chosen": "\n\nHuman: yo\n\nAssistant: cat", "rejected": "\n\nHuman: yo\n\nAssistant: dog"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO / "recipes" / "demo")
    files = {"hh": {"train": [str(path)]}}
    # max_length - max_prompt_length = 1 response token: " red" for both answers of the first prompt
    pairs = build_pair_split(["hh"], "train", files, tokenizer, TokenizeSettings(10, 9), None)
    assert len(pairs) == 2 and prompt_groups(pairs) == [[0], [1]]
    assert identical_pairs(pairs) == (1, "hh/train/0/0")
    assert "1 pair(s) have identical chosen and rejected after truncation" in describe(pairs)
    assert identical_pairs(build_pair_split(["hh"], "train", files, tokenizer, TokenizeSettings(64, 32), None)) == (0, None)


def test_reference_policy_with_transformers_429_keys_loads_strictly(reference_dir, tmp_path):
    """The reference's own policy.pt: exactly its GPT-2 attn.bias / attn.masked_bias buffers are dropped; anything else that
    does not fit, or a legacy buffer with a non-default value, is refused naming the file."""
    archive = reference_dir / "dpo" / "reference_sft_policy.pt"
    model = transformers.AutoModelForCausalLM.from_pretrained(reference_dir / "tiny-gpt2")
    load_archive_state(model, str(archive))
    state = torch.load(archive, weights_only=True)["state"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    sft_policy = load_model(ModelConfig(name="blank_model", name_or_path=str(reference_dir / "tiny-gpt2"), archive=str(archive)))
    assert torch.equal(sft_policy.state_dict()["lm_head.weight"], state["lm_head.weight"])  # the SFT stage's loader too

    changed = torch.load(archive, weights_only=True)
    changed["state"]["transformer.h.1.attn.masked_bias"] = torch.tensor(-5.0)
    torch.save(changed, tmp_path / "changed.pt")
    with pytest.raises(CheckpointError, match=r"changed.pt: transformer.h.1.attn.masked_bias: .* not hold its default"):
        load_archive_state(model, str(tmp_path / "changed.pt"))
    extra = torch.load(archive, weights_only=True)
    extra["state"]["transformer.h.0.attn.extra"] = torch.zeros(1)
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"extra.pt does not fit GPT2LMHeadModel .*keys the model does not have: 1 \(.*attn.extra\)"):
        load_archive_state(model, str(tmp_path / "extra.pt"))


def test_dpo_config_errors_stop_before_any_work(tmp_path, monkeypatch):
    from training.config import ConfigError

    calls = []
    monkeypatch.setattr(stage, "load_tokenizer", lambda *a, **k: calls.append("tokenizer"))
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: calls.append("model"))
    monkeypatch.setattr(dpo_train, "load_model", lambda *a, **k: calls.append("reference"))
    monkeypatch.setattr(dpo_train, "build_pair_split", lambda *a, **k: calls.append("data"))
    base = ["exp_name=t", "model=blank_model", "model.name_or_path=recipes/demo", "wandb.enabled=false", f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match="loss.beta is required with loss.name=dpo"):
        dpo_train.main([*base, "loss.name=dpo"])
    with pytest.raises(ConfigError, match="loss.name=sft is trained by the other stage; this one trains loss.name=dpo or ipo"):
        dpo_train.main(base)
    with pytest.raises(ConfigError, match="batching=length_bucketed is for SFT examples"):
        dpo_train.main([*base, "loss.name=ipo", "loss.beta=0.1", "batching=length_bucketed"])
    assert calls == [] and not (tmp_path / "run").exists()
