"""Direct preference optimization (DPO, conservative DPO, IPO) of an SFT policy on preference pairs: the second stage.

    python sft_train.py recipes/demo.yaml run_dir=runs/demo && python dpo_train.py recipes/demo_dpo.yaml run_dir=runs/demo_dpo
    python dpo_train.py recipes/pythia28_hh_dpo.yaml model.archive=runs/sft/LATEST/policy.pt loss.beta=0.1
    accelerate launch --config_file accelerate_configs/fsdp_8gpu.yaml dpo_train.py recipes/llama7b_hh_dpo.yaml \\
        model.archive=runs/sft/LATEST/policy.pt
    python dpo_train.py recipes/demo_dpo.yaml run_dir=runs/demo_dpo resume_from=auto           # continue a stopped run

`model.archive` (a policy.pt of sft_train.py, or of the reference code under transformers 4.29) is loaded into the policy
and into the frozen reference model (in model.reference_dtype). `reference_logps=precompute` scores the run's pairs with the
reference once before training (cached; the reference is then freed) instead of at every step. Writes the same run
directory as sft_train.py: config.yaml, metrics.jsonl, step-{N}/ and LATEST/ with policy.pt, {run_dir}/hf and plots.
"""

from __future__ import annotations

import training.cpu_threads  # noqa: F401,I001  first: OpenMP's passive waiting must be set before torch is imported
import dataclasses
import functools
import gc

import torch

from data.batches import run_plan
from data.pairs import build_pair_split, describe, pair_positions, pair_sides, prompt_groups
from data.packing import to_device
from modeling.dpo import pair_logps, pair_metrics, preference_loss
from modeling.load import load_model
from modeling.reference_logps import ReferenceLogps
from stage import Data, Run, Stage, eval_columns, load_splits, step_flops, throughput, train_batch
from training.checks import PREFERENCE_LOSSES
from training.distributed import data_parallel, model_load_kwargs, prepare_frozen
from training.logger import console

LOSSES = PREFERENCE_LOSSES  # the objectives this stage trains (training/checks.py check_stage)


def load_data(run: Run, data_files: dict) -> Data:
    """Preference pairs, grouped by prompt (the data order shuffles prompts, as the reference does)."""
    train_pairs, eval_pairs = load_splits(run, data_files, build_pair_split)
    if run.accelerator.is_main_process:
        console.print(f"train: {describe(train_pairs)}\neval: {describe(eval_pairs)}", soft_wrap=True, highlight=False)
    return Data(train_pairs, eval_pairs, prompt_groups(train_pairs), prompt_groups(eval_pairs))


def load_reference(run: Run) -> ReferenceLogps:
    """The frozen reference's log-probs: live from the model (model.archive or the base weights in model.reference_dtype,
    sharded like the policy), or precomputed for every pair the run visits, after which the model is freed."""
    config, accelerator = run.config, run.accelerator
    reference_config = dataclasses.replace(config.model, policy_dtype=config.model.reference_dtype)
    model = load_model(reference_config, str(run.cache), "reference", **model_load_kwargs(config, accelerator))
    model = prepare_frozen(config, accelerator, model)
    if accelerator.is_main_process:
        units = sum(1 for m in model.modules() if type(m).__name__.startswith("FSDP"))
        console.print(f"reference model: {config.model.reference_dtype}, "
                      + (f"sharded in {units} FSDP2 units" if units else f"on {accelerator.device}"), highlight=False)
    reference = ReferenceLogps(config, accelerator, model, functools.partial(score_pairs, run), run.cache)
    if config.reference_logps == "precompute":
        visited = [i for plan in run_plan(config, run.data.train, 0, 0, run.data.train_groups)[0] for i in plan.indices]
        eval_visited = [i for batch in run.eval_batches for i in batch]
        reference.precompute({"train": (run.data.train, visited), "eval": (run.data.eval, eval_visited)})
        model = reference.model = None
        gc.collect()
    return reference


def pair_loss(run: Run, batch, n_pairs, reference_chosen, reference_rejected):
    """(losses, chosen rewards, rejected rewards, policy chosen log-probs, policy rejected log-probs) of one micro-batch."""
    loss = run.config.loss
    policy_chosen, policy_rejected = pair_logps(run.model, batch, n_pairs, loss.supervised_logits_only, loss.logits_chunk_tokens)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, loss.name, loss.beta, loss.label_smoothing,
        loss.reference_free)
    return losses, chosen_rewards, rejected_rewards, policy_chosen.detach(), policy_rejected.detach()


def train_step(run: Run, indices: list[int]) -> dict:
    """One optimizer step over the global batch of pairs. The reference's loss is the mean over the step's B pairs; a
    micro-batch on one of W data-parallel processes backpropagates its pairs' summed loss x W / B (see modeling/loss.py)."""
    pairs = [{**run.data.train[i], "index": i} for i in indices]
    world = data_parallel(run.accelerator)[1]

    def micro_step(share: list[dict]) -> list[torch.Tensor]:
        batch = to_device(run.collate(pair_sides(share)), run.accelerator.device)
        reference_chosen, reference_rejected = run.reference("train", share, batch)
        losses, *rest = pair_loss(run, batch, len(share), reference_chosen, reference_rejected)
        run.accelerator.backward(losses.sum() * world / len(pairs))
        return [losses, *rest]

    # A micro-batch holds both sides of its pairs: a pair costs the positions of its chosen and its rejected.
    step = train_batch(run, pairs, [sum(pair_positions([p])) for p in pairs], micro_step,
                       cost=lambda micro: run.collate.positions(pair_positions([pairs[i] for i in micro])))
    flops = step_flops(run, pair_sides(pairs))  # the policy's forward and backward over both sides
    if flops is not None and run.reference.model is not None:
        flops *= 4 / 3  # the frozen reference ran live: its forward over the same sequences, a third of a forward + backward
    return {**pair_metrics("train", *step.values), "grad_norm": step.grad_norm, "lr": step.lr,
            **throughput(run, pair_sides(pairs), step, flops), "examples_per_second": len(pairs) / step.seconds}


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Losses, rewards and log-probs over the fixed eval pairs (summed log-probs only, never logits)."""
    def eval_step(indices: list[int]) -> list[torch.Tensor]:
        share = [{**run.data.eval[i], "index": i} for i in indices]
        batch = to_device(run.collate(pair_sides(share)), run.accelerator.device)
        return [v.float() for v in pair_loss(run, batch, len(share), *run.reference("eval", share, batch))]

    return pair_metrics("eval", *eval_columns(run, eval_step))


@torch.no_grad()
def score_pairs(run: Run, model, pairs: list[dict], batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of chosen and rejected under `model` (the frozen reference) for this process's pairs."""
    if batch is None:
        batch = to_device(run.collate(pair_sides(pairs)), run.accelerator.device)
    loss = run.config.loss
    chosen, rejected = pair_logps(model, batch, len(pairs), loss.supervised_logits_only, loss.logits_chunk_tokens)
    return chosen.float(), rejected.float()


DPO = Stage("dpo", "dpo_train.py", __doc__, LOSSES, load_data, train_step, evaluate, before_policy=load_reference,
            counted="pairs", policy="the DPO-trained policy")

main, cli = DPO.main, DPO.cli  # main(argv) -> the run directory (None after --help); cli(): the `dpo-train` command

if __name__ == "__main__":
    cli()
