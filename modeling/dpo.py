"""The preference losses of the DPO stage, as the reference's `preference_loss`, and the concatenated forward.

    chosen, rejected = pair_logps(model, batch, n_pairs)              # summed log-probs of each side (fp32)
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, "dpo", beta=0.1)

With h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)) per pair (log-probs summed over the response tokens):
  dpo:  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)     (eps = label_smoothing: conservative DPO; 0: DPO)
  ipo:  (h - 1 / (2 beta))^2
  reference_free (dpo): the reference's log-ratio is taken as 0.
Rewards are beta (log pi(y) - log ref(y)) for each side, detached; a pair is accurate when its chosen reward is strictly greater.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modeling.loss import sequence_nll


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], n_pairs: int, supervised_only: bool = True,
               chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the 2B sequences of B pairs (all chosen, then all rejected: data/pairs.py pair_sides), so the model
    runs once per micro-batch (what FSDP wants); per pair, the summed log-probs of the chosen and of the rejected response."""
    nll, _ = sequence_nll(model, batch, supervised_only, chunk_tokens)
    return -nll[:n_pairs], -nll[n_pairs:]


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                    reference_rejected: torch.Tensor, name: str, beta: float, label_smoothing: float = 0.0,
                    reference_free: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards); see the module docstring for the formulas."""
    policy_ratio = policy_chosen - policy_rejected
    reference_ratio = torch.zeros_like(policy_ratio) if reference_free else reference_chosen - reference_rejected
    h = policy_ratio - reference_ratio
    if name == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif name == "dpo":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    else:
        raise ValueError(f"unknown preference loss {name!r}; use dpo or ipo")
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_metrics(split: str, losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                 policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> dict[str, float]:
    """Means over all pairs of the step (or the eval set) under the reference's names; split is `train` or `eval`. The means
    are taken in float64, as the reference averages its per-pair values as Python floats."""
    def mean(values: torch.Tensor) -> float:
        return values.double().mean().item()

    return {
        f"rewards_{split}/chosen": mean(chosen_rewards),
        f"rewards_{split}/rejected": mean(rejected_rewards),
        f"rewards_{split}/accuracies": mean((chosen_rewards > rejected_rewards).float()),
        f"rewards_{split}/margins": mean(chosen_rewards - rejected_rewards),
        f"logps_{split}/rejected": mean(policy_rejected),
        f"logps_{split}/chosen": mean(policy_chosen),
        f"loss/{split}": mean(losses),
    }
