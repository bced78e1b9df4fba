"""The SFT loss.

    nll, n_tokens = sequence_nll(model, batch)   # per-example summed NLL (fp32) and supervised-token counts

The reference's loss for one optimizer step over a global batch of B examples is

    L = (1 / B) * sum_i S_i,   S_i = sum over supervised positions t of example i of -log p(token_t | tokens_<t)

(`loss.normalize=example`: per-example sums, averaged over examples). `loss.normalize=token` uses L = sum_i S_i / T with T the
step's supervised-token count. Either way L = sum_i S_i / D with a denominator D known before the step: every process holds the
whole global batch, so B and T need no communication. A micro-batch m on process r backpropagates

    loss_{m,r} = (sum_{i in m,r} S_i) * W / D

because data-parallel backends average gradients over the W processes: the averaged gradient of sum_{m,r} loss_{m,r} / W is then
exactly dL. Splitting a batch over micro-batches or processes only changes how the same sum is grouped.

Only positions whose next token is supervised contribute to S_i, so by default (`supervised_only`) the LM head and the
log-softmax run on those positions alone, a chunk of positions at a time, all but the last recomputed in backward:
full-vocabulary fp32 logits are never held for the whole batch. The head is reached by temporarily replacing the forward of
`get_output_embeddings()`, so the model's own forward still runs (hooks of FSDP/DDP wrappers on the root fire as usual) and
the head receives the final hidden states. Models that change logits after the head (soft-capping, logit scales) get the
full-logits path (`full_logits`): logits at every position, but the head's backward only at the supervised ones.

Padded batches reach the model without their attention mask (see `sequence_nll`): right padding is invisible to the real
positions of a causal LM, and the unmasked causal attention kernel is the faster one.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch.utils.checkpoint import checkpoint

from modeling.packed_attention import HostSpans  # importing it registers model.attn_implementation=sdpa_packed
from modeling.compile import COMPILED_LOSS
from training.adapters import unwrap

log = logging.getLogger(__name__)

ROW_SUM_WIDTH = 64  # padded rows are summed over a multiple of this many positions (see example_sums)
# Config attributes of models whose forward transforms the head's output; their loss needs the real logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def sequence_nll(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    supervised_only: bool = True,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed NLL of the supervised tokens (fp32) and their counts.

    `batch` is right-padded (input_ids, attention_mask, labels: one example per row) or packed (input_ids, position_ids,
    labels, example_index and the kernel's keys: data/packing.py); results are per example in the order of the collated
    examples.
    """
    # Padded: input_ids alone. The rows are right-padded (data/batches.py collate), and in a causal LM a real position never
    # attends to the padding after it, so without the mask every real position's output is unchanged while attention runs
    # its causal kernel instead of a masked one (it skips the masked half of the pairs; flash-attention-2 skips its
    # unpad/repad); padding positions are never read. Packed: input_ids, position_ids and what the attention kernel needs
    # to keep examples apart (data/packing.py); no cache, so attention stops at example boundaries.
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_index", "n_examples", "attention_mask")}
    if "packed_spans" in inputs:
        inputs["packed_spans"] = HostSpans(inputs["packed_spans"])  # opaque to torch.compile: no recompile per packing
    owner, n_examples = example_owner(batch)
    base = unwrap(model)
    if supervised_only and not transforms_logits(base):
        result = supervised_nll_sums(model, base, inputs, batch["labels"], owner, n_examples, chunk_tokens)
        if result is not None:
            return result
    logits = full_logits(model, base, inputs, batch["labels"])
    return token_nll_sums(logits, batch["labels"], owner, n_examples)


def full_logits(model: torch.nn.Module, base: torch.nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """The model's logits at every position (its own forward transforms them), with the head differentiated only at the
    supervised positions. The loss reads no other position, so the head's gradient there is zero; computing those rows
    without autograd skips both backward matmuls over them (most of a padded batch), and the values are the same."""
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or not torch.is_grad_enabled():
        return model(**inputs, use_cache=False).logits
    rows, width = labels.shape
    flat_positions = supervised_positions(labels)[0]

    def at_every_position(head_forward, hidden: torch.Tensor) -> torch.Tensor:
        if type(hidden) is not torch.Tensor:
            return head_forward(hidden)  # a tensor subclass (tensor parallelism): as it was
        with torch.no_grad():
            logits = head_forward(hidden)
        supervised = head_forward(hidden.reshape(rows * width, hidden.shape[-1]).index_select(0, flat_positions))
        return SupervisedRows.apply(logits, supervised, flat_positions)

    return logits_with_head(model, head, inputs, (rows, width), at_every_position)


class SupervisedRows(torch.autograd.Function):
    """`full` (made without autograd) with `rows` written in place at the flat `positions`; the gradient reaches `rows` only,
    read straight from the output's gradient at those positions. (An in-place index_copy_ under autograd would clone the
    whole gradient in backward: one more full-vocabulary tensor for every position.)"""

    @staticmethod
    def forward(ctx, full: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.mark_dirty(full)
        full.view(-1, full.shape[-1]).index_copy_(0, positions, rows)
        return full

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        return None, grad.reshape(-1, grad.shape[-1]).index_select(0, positions), None


def token_nll_sums(
    logits: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor | None = None, n_examples: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """From full logits. Shifted by one: position t predicts label t+1; -100 labels are ignored. `owner` (rows x positions,
    example of each position) sums packed rows per example; without it each row is one example (see example_sums).

    The log-softmax runs only at supervised positions (picked before the fp32 cast): the result is the reference's
    log_softmax-then-gather, but the full-vocabulary softmax, its fp32 copy and their backward are never made for the prompt
    and padding positions, which are most of a padded batch."""
    rows, width = labels.shape
    flat_positions, wanted, supervised = supervised_positions(labels)
    selected = logits.reshape(rows * width, logits.shape[-1]).index_select(0, flat_positions).float()
    nll = torch.logsumexp(selected, dim=-1) - selected.gather(1, wanted.unsqueeze(1)).squeeze(1)
    return example_sums(nll, supervised, owner, n_examples)


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices (row * width + t) of the positions whose next label is supervised, those labels, and the mask over the
    shifted labels (rows x width-1)."""
    width = labels.shape[1]
    targets = labels[:, 1:]
    supervised = targets != -100
    flat_positions = (supervised.nonzero() * torch.tensor([width, 1], device=labels.device)).sum(-1)
    return flat_positions, targets[supervised], supervised


def supervised_nll_sums(model, base, inputs, labels, owner, n_examples, chunk_tokens):
    """NLL from the head applied only at supervised positions; None when the model's forward altered the head's output."""
    rows, width = labels.shape
    flat_positions, wanted, supervised = supervised_positions(labels)
    produced = []

    def at_supervised_positions(head_forward, hidden: torch.Tensor) -> torch.Tensor:
        selected = hidden.reshape(rows * width, hidden.shape[-1]).index_select(0, flat_positions)
        produced.append(chunked_token_nll(head_forward, selected, wanted, chunk_tokens, getattr(base, COMPILED_LOSS, False)))
        return produced[-1]

    out = logits_with_head(model, base.get_output_embeddings(), inputs, (rows, width), at_supervised_positions)
    if not produced or not (out is produced[-1] or (out.shape == produced[-1].shape and torch.equal(out, produced[-1]))):
        log.warning("%s changes the head's output; computing the loss from full logits", type(base).__name__)
        base._sft_transforms_logits = True
        return None
    return example_sums(out, supervised, owner, n_examples)


def example_sums(nll: torch.Tensor, supervised: torch.Tensor, owner: torch.Tensor | None = None,
                 n_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sums of the token NLLs (`nll` in the order of `supervised.nonzero()`) and their counts.

    Right-padded rows (`owner` None) are summed along the row, zeros at the unsupervised positions: the reference's own
    reduction (log-probs times the mask, summed over the padded row), so summed log-probs round as the reference's do. A
    one-by-one index_add_ over a few hundred tokens rounds differently by ~1e-6 relative, and IPO's (h - 1/(2 beta))^2 of a
    difference of four such sums turns that into ~1e-4 on its losses and gradients. The row is widened with zeros to a
    multiple of ROW_SUM_WIDTH: a vectorised sum handles the positions past the last whole vector in another order, so without
    it an example's sum would depend on whether it is the longest of its batch (precomputed reference log-probs, scored in
    other batches, would then differ from live ones). Packed rows hold several examples: each position's NLL is added to the
    sum of the example that `owner` names."""
    if owner is None:
        rows, width = supervised.shape
        wide = torch.zeros(rows, -(-width // ROW_SUM_WIDTH) * ROW_SUM_WIDTH, dtype=torch.bool, device=supervised.device)
        wide[:, :width] = supervised
        return nll.new_zeros(wide.shape).masked_scatter(wide, nll).sum(-1), supervised.sum(-1)
    owner = owner[:, 1:][supervised]
    sums = torch.zeros(n_examples, dtype=torch.float32, device=nll.device).index_add_(0, owner, nll)
    return sums, torch.bincount(owner, minlength=n_examples)


def chunked_token_nll(head_forward, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                      compiled: bool = False) -> torch.Tensor:
    """-log softmax(head(hidden))[target] per row, `chunk_tokens` rows at a time; in training each chunk's logits but the
    last are recomputed in backward instead of kept, so at most one chunk of fp32 logits exists at a time. `compiled`
    (compile=true): each chunk runs under torch.compile."""
    recompute = torch.is_grad_enabled()
    token_nll = compiled_token_nll() if compiled else plain_token_nll
    parts = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        # The last chunk is kept: its logits are made at the very end of the forward and are the first thing backward needs,
        # so keeping them adds nothing to the peak while recomputing them costs a third head matmul.
        if recompute and start + chunk_tokens < hidden.shape[0]:
            parts.append(checkpoint(token_nll, head_forward, h, t, use_reentrant=False))
        else:
            parts.append(token_nll(head_forward, h, t))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def plain_token_nll(head_forward, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head_forward(hidden).float()
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, targets.unsqueeze(1)).squeeze(1)


@functools.cache
def compiled_token_nll():
    """plain_token_nll under torch.compile, the number of positions a symbol: one graph for every chunk size."""
    return torch.compile(plain_token_nll, dynamic=True)


def logits_with_head(model: torch.nn.Module, head: torch.nn.Module, inputs: dict, shape: tuple[int, int],
                     head_at) -> torch.Tensor:
    """The model's output logits with `head_at(head_forward, hidden)` in place of the head where it gets the hidden states of
    the whole (rows, width) batch; on anything else (a slice of positions) the head runs as it is, so the model gets real
    logits there."""
    head_forward = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return head_at(head_forward, hidden) if hidden.shape[:2] == shape else head_forward(hidden)

    with replaced_forward(head, forward):
        return model(**inputs, use_cache=False).logits


@contextlib.contextmanager
def replaced_forward(module: torch.nn.Module, forward):
    """`module.forward` is `forward` inside the block; an instance-level forward set by others (e.g. accelerate's device-map
    hooks) is put back afterwards."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def example_owner(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, int]:
    """Packed: the example of every position (rows x positions, -1 on packing filler) and the number of examples (from the
    host when the collate recorded it: owner.max() would wait for the device); padded: None (each row is one example) and
    the number of rows."""
    if "example_index" in batch:
        owner = batch["example_index"]
        return owner, batch["n_examples"] if "n_examples" in batch else int(owner.max()) + 1
    return None, batch["labels"].shape[0]


def transforms_logits(model: torch.nn.Module) -> bool:
    """True for models whose forward changes the head's output (then only full logits give the right loss)."""
    if getattr(model, "_sft_transforms_logits", False) or not hasattr(model, "get_output_embeddings"):
        return True
    config = getattr(model, "config", None)
    configs = [config, getattr(config, "text_config", None)] if config is not None else []
    return any(getattr(c, name, None) not in (None, 1, 1.0) for c in configs if c is not None for name in LOGIT_TRANSFORMS) \
        or model.get_output_embeddings() is None
