"""Learning-rate schedules: the factor at every update, the run length they are sized by, and the errors before work."""

from __future__ import annotations

import math

import pytest
import torch

from data.batches import plan_batches
from tests.tiny import tiny_data, tiny_model_dir, tiny_run_args
from training.checks import validate
from training.config import ConfigError, load_config
from training.schedule import LRFactor, build_scheduler, check_length, count_updates, lr_factor

import sft_train
import stage


def expected(schedule: str, k: int, warmup: int, total: int, m: float) -> float:
    """The formulas as written in training/schedule.py's docstring, independently of its code."""
    if k < warmup:
        return (k + 1) / (warmup + 1)
    p = (k - warmup) / (total - warmup)
    return {"constant": 1.0, "linear": m + (1 - m) * (1 - p), "cosine": m + (1 - m) * (1 + math.cos(math.pi * p)) / 2}[schedule]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_factor_is_the_formula_at_every_update(schedule):
    f = LRFactor(schedule, 3, 10, 0.1)
    assert [f(k) for k in range(10)] == pytest.approx([expected(schedule, k, 3, 10, 0.1) for k in range(10)], rel=1e-15)
    assert f(2) == 0.75 and f(3) == 1.0  # warmup ends exactly at the peak
    if schedule != "constant":
        assert 0.1 < f(9) < f(8) < 1.0  # decays, never reaching min_lr_ratio within the run


def test_warmup_ratio_rounds_up_and_replaces_warmup_steps():
    c = load_config(["warmup_steps=7", "warmup_ratio=0.25", "lr_schedule=linear"])
    assert lr_factor(c, 10).warmup_steps == 3 and lr_factor(c, 8).warmup_steps == 2
    assert lr_factor(load_config(["warmup_steps=7"]), 10).warmup_steps == 7


@pytest.mark.parametrize("n, batch_size, n_epochs, n_examples", [
    (18, 4, 2, None), (18, 4, None, 5), (18, 4, None, 16), (18, 4, None, 17), (18, 4, None, 18), (18, 4, None, 19),
    (18, 4, None, 37), (18, 4, 3, 30), (18, 4, 1, 400), (16, 4, None, 33), (40, 8, None, 1),
])
def test_count_updates_equals_the_planned_batches(n, batch_size, n_epochs, n_examples):
    assert count_updates(n, batch_size, n_epochs, n_examples) == sum(1 for _ in plan_batches(n, batch_size, 0, n_epochs, n_examples))


def test_scheduler_state_carries_the_schedule():
    """scheduler.pt restores the schedule itself: a resumed run continues its own decay even if its length changed."""
    c = load_config(["lr_schedule=cosine", "warmup_steps=2", "min_lr_ratio=0.2", "lr=1.0"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, c, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    assert saved["lr_lambdas"] == [{"schedule": "cosine", "warmup_steps": 2, "total_steps": 10, "min_lr_ratio": 0.2}]
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    other = build_scheduler(opt2, load_config(["lr_schedule=linear"]), 99)
    other.load_state_dict(saved)
    assert other.get_last_lr() == sched.get_last_lr() == [expected("cosine", 5, 2, 10, 0.2)]
    # a scheduler.pt from before schedules existed (a plain lambda: nothing stored) keeps the config's schedule
    legacy = {**saved, "lr_lambdas": [None]}
    fresh = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), c, 10)
    fresh.load_state_dict(legacy)
    assert fresh.lr_lambdas[0].total_steps == 10


@pytest.mark.parametrize("over, message", [
    (["lr_schedule=cosin"], "lr_schedule: 'cosin' is not one of constant, linear, cosine (did you mean 'cosine'?)"),
    (["min_lr_ratio=1.5"], "min_lr_ratio must be in [0, 1]"),
    (["warmup_ratio=1.0"], "warmup_ratio must be in [0, 1)"),
    (["warmup_steps=-1"], "warmup_steps: "),
    (["lr=0"], "lr: "),
    (["lr_schedule=linear", "n_epochs=null"], "lr_schedule=linear needs the run's length: set n_epochs or n_examples"),
    (["warmup_ratio=0.1", "n_epochs=null"], "warmup_ratio needs the run's length"),
])
def test_schedule_errors(over, message):
    c = load_config(["exp_name=t", "model.name_or_path=recipes/demo", *over])
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert message in str(e.value)


def test_decay_longer_than_the_run_is_refused_before_the_model(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"warmup \(5 updates\) is not shorter than the run \(4 updates\)"):
        check_length(load_config(["lr_schedule=cosine", "warmup_steps=5"]), 4)
    check_length(load_config(["warmup_steps=5"]), 4)  # constant: a warmup longer than the run is the reference's behaviour
    model = tiny_model_dir(tmp_path / "model")
    train, test = tiny_data(tmp_path, n_train=16, n_test=4)
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match=r"\(4 updates\)"):
        sft_train.main(tiny_run_args(tmp_path, model, train, test, lr_schedule="linear", warmup_steps=4))
