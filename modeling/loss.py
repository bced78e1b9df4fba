"""The SFT loss.

The reference's loss for one optimizer step over a global batch of B examples is

    L = (1 / B) * sum_i S_i,   S_i = sum over supervised positions t of example i of -log p(token_t | tokens_<t)

(`loss.normalize=example`: per-example sums, averaged over examples). `loss.normalize=token` uses L = sum_i S_i / T with T the
step's supervised-token count. Either way L = sum_i S_i / D with a denominator D known before the step: every process holds the
whole global batch, so B and T need no communication. A micro-batch m on process r backpropagates

    loss_{m,r} = (sum_{i in m,r} S_i) * W / D

because data-parallel backends average gradients over the W processes: the averaged gradient of sum_{m,r} loss_{m,r} / W is then
exactly dL. Splitting a batch over micro-batches or processes only changes how the same sum is grouped.
"""

from __future__ import annotations

import torch


def sequence_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed NLL of the supervised tokens (fp32) and their counts."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return token_nll_sums(logits, batch["labels"])


def token_nll_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted by one: position t predicts label t+1; -100 labels are ignored."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != -100
    logps = torch.log_softmax(logits, dim=-1)
    token_logps = torch.gather(logps, 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    return -(token_logps * mask).sum(-1), mask.sum(-1)
