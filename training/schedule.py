"""Learning-rate schedules, counted in optimizer steps.

    scheduler = build_scheduler(optimizer, config, n_updates)   # n_updates: optimizer steps the run will take
    scheduler.step()                                             # once per optimizer step, by hand (never via accelerate)

Update k (from 0) uses lr * factor(k), with W warmup steps and T updates in all:

    warmup (k < W):  (k + 1) / (W + 1)                       the reference's linear warmup, so `constant` is the reference
    constant:        1
    linear:          m + (1 - m) * (1 - p)                   p = (k - W) / (T - W), m = min_lr_ratio
    cosine:          m + (1 - m) * (1 + cos(pi * p)) / 2

so the decays start at the peak right after warmup and would reach m * lr at k = T, one step after the last update.
The factor is a small object whose fields LambdaLR saves in scheduler.pt: a resumed run continues the schedule it started
with, even if the data (and so T) changed since.
"""

from __future__ import annotations

import math

import torch

from training.config import Config, ConfigError


class LRFactor:
    """factor(k) of the module docstring. Plain fields only: LambdaLR.state_dict() stores them, load_state_dict() restores them."""

    def __init__(self, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        # schedule: one of training/checks.py SCHEDULES (lr_schedule in CHECKS)
        self.schedule, self.warmup_steps, self.total_steps, self.min_lr_ratio = schedule, warmup_steps, total_steps, min_lr_ratio

    def __call__(self, k: int) -> float:
        if k < self.warmup_steps:
            return (k + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return 1.0
        p = min(1.0, (k - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        decay = 1 - p if self.schedule == "linear" else (1 + math.cos(math.pi * p)) / 2
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay

    def describe(self) -> str:
        return (f"{self.schedule}, warmup {self.warmup_steps} of {self.total_steps} updates"
                + (f", down to {self.min_lr_ratio:g} x lr" if self.schedule != "constant" else ""))


def count_updates(n: int, batch_size: int, n_epochs: int | None, n_examples: int | None) -> int:
    """Optimizer steps of a run over n examples, as data/batches.py plans them: full batches only, each epoch's partial batch
    dropped (but counted towards n_examples), stopping at the first batch whose count reaches n_examples."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        return 0
    updates, epoch = 0, 0
    while n_epochs is None or epoch < n_epochs:
        if n_examples is not None and epoch * n + per_epoch * batch_size >= n_examples:
            return updates + max(1, math.ceil((n_examples - epoch * n) / batch_size))
        updates += per_epoch
        epoch += 1
    return updates


def warmup_steps(config: Config, n_updates: int) -> int:
    """warmup_ratio (when set) of the run's updates, rounded up; else warmup_steps."""
    if config.warmup_ratio is not None:
        return math.ceil(config.warmup_ratio * n_updates)
    return config.warmup_steps


def lr_factor(config: Config, n_updates: int) -> LRFactor:
    return LRFactor(config.lr_schedule, warmup_steps(config, n_updates), n_updates, config.min_lr_ratio)


def check_length(config: Config, n_updates: int) -> None:
    """Once the data size fixes the run's optimizer steps: a decay needs steps after its warmup."""
    warmup = warmup_steps(config, n_updates)
    if config.lr_schedule != "constant" and warmup >= n_updates:
        raise ConfigError(f"lr_schedule={config.lr_schedule}: the warmup ({warmup} updates) is not shorter than the run "
                          f"({n_updates} updates), so nothing would decay; lower warmup_steps or warmup_ratio")


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, n_updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's LambdaLR over `n_updates` optimizer steps. Stepped by hand once per optimizer step: a scheduler passed
    through accelerator.prepare steps once per process and would end the schedule num_processes times too early."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, n_updates))


def schedule_of(scheduler: torch.optim.lr_scheduler.LambdaLR) -> LRFactor:
    return scheduler.lr_lambdas[0]
