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
import logging
import shlex
import sys
import time
from pathlib import Path

import torch

from data.batches import check_plan, collate_prompts, eval_plan, run_plan
from data.pairs import build_pair_split, describe, pair_positions, pair_sides, prompt_groups
from data.packing import collate_for, to_device
from data.tokenize import TokenizeSettings
from modeling.dpo import pair_logps, pair_metrics, preference_loss
from modeling.compile import compile_model
from modeling.export import finish_run
from modeling.load import load_model, load_tokenizer
from modeling.lora import add_adapters
from modeling.reference_logps import ReferenceLogps
from training.adapters import trainable_parameters
from training.cli import run_main
from training.checks import PREFERENCE_LOSSES
from training.config import cache_dir
from training.cpu_threads import set_cpu_threads
from training.distributed import (build_accelerator, data_first, data_parallel, gather_dp, model_load_kwargs,
                                  prepare_frozen, prepare_model)
from training.logger import MetricsLogger, console
from training.loop import (build_optimizer, start_run, claimed_run_dir, gather_order, generate_samples, micro_batches, no_sync_unless_last, optimizer_step,
                           prepare_run_dir, raise_if_not_finite, restored_signal_handlers, run_summary,
                           start_state, start_wandb, train)
from training.rundir import check_resume, run_signature
from training.schedule import check_length
from training.plots import plot_run_or_warn
from training.throughput import step_throughput

log = logging.getLogger("dpo")
LOSSES = PREFERENCE_LOSSES  # the objectives this stage trains (training/checks.py check_stage)


def main(argv: list[str] | None = None) -> Path | None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    run = start_run(sys.argv[1:] if argv is None else argv, LOSSES, __doc__, build_accelerator)
    if run is None:  # --help was printed
        return None
    config, accelerator, data_files, resume_dir, saved_run, run_dir = run
    with claimed_run_dir(config, accelerator, run_dir, resume_dir):  # refuses a finished or live run; locks run_dir
        cache = cache_dir(config)
        tokenizer = load_tokenizer(config.model)
        settings = TokenizeSettings(config.max_length, config.max_prompt_length)
        with data_first(accelerator, cache, config.cache_node_local):  # one process per cache prepares data; the others read it
            train_pairs = build_pair_split(config.datasets, "train", data_files, tokenizer, settings, str(cache),
                                           config.tokenize_num_proc, weights=config.dataset_weights, seed=config.seed,
                                           data_num_proc=config.data_num_proc)
            eval_pairs = build_pair_split(config.datasets, "test", data_files, tokenizer, settings, str(cache),
                                          config.tokenize_num_proc, data_num_proc=config.data_num_proc)
        if accelerator.is_main_process:
            console.print(f"train: {describe(train_pairs)}\neval: {describe(eval_pairs)}", soft_wrap=True, highlight=False)
        train_groups, eval_groups = prompt_groups(train_pairs), prompt_groups(eval_pairs)
        check_plan(len(train_pairs), config.batch_size, config.n_epochs, config.n_examples, "training")  # before the model loads
        check_plan(len(eval_pairs), config.eval_batch_size, None, config.n_eval_examples, "eval")
        eval_batches = eval_plan(config, len(eval_pairs), eval_groups)
        signature = run_signature(config)
        if resume_dir is not None:
            check_resume(saved_run, signature, resume_dir, config.resume_force)
        n_updates = run_plan(config, train_pairs, 0, 0, train_groups)[1]
        check_length(config, n_updates)  # a decay needs updates after its warmup

        prepare_run_dir(config, accelerator, run_dir)
        torch.manual_seed(config.seed)  # random_init models must not depend on earlier RNG use
        reference = load_reference(config, accelerator, str(cache))
        score = functools.partial(score_pairs, config, accelerator, tokenizer.pad_token_id)
        reference_logps = ReferenceLogps(config, accelerator, reference, score, cache)
        if config.reference_logps == "precompute":
            visited = [i for plan in run_plan(config, train_pairs, 0, 0, train_groups)[0] for i in plan.indices]
            eval_visited = [i for batch in eval_batches for i in batch]
            reference_logps.precompute({"train": (train_pairs, visited), "eval": (eval_pairs, eval_visited)})
            reference = reference_logps.model = None
            gc.collect()
        torch.manual_seed(config.seed)
        model = load_model(config.model, str(cache), **model_load_kwargs(config, accelerator))
        if config.lora.enabled:
            model = add_adapters(model, config.lora)  # the base frozen; FSDP still wraps each model.block_name
            log.info("LoRA: %d of %d parameters trainable", *trainable_parameters(model))
        set_cpu_threads(model, accelerator.device)  # one thread for tiny CPU models unless OMP_NUM_THREADS is set
        prepare_model(config, accelerator, model)
        if compile_model(config, model):  # compile=true: each block in place, before FSDP/DDP wrap it
            log.info("compiling each %s block and the loss chunk (torch.compile, dynamic shapes)", config.model.block_name)
        optimizer, scheduler = build_optimizer(config, model, n_updates)
        model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped by hand: once per optimizer step
        state = start_state(config, accelerator, model, optimizer, scheduler, resume_dir, run_dir)
        state.run = signature

        logger = MetricsLogger(run_dir, start_wandb(config, run_dir, accelerator), config.minimum_log_interval_secs,
                               enabled=accelerator.is_main_process)
        plans, n_planned = run_plan(config, train_pairs, state.epoch, state.offset, train_groups)
        step = functools.partial(train_step, config, accelerator, model, optimizer, scheduler, train_pairs, tokenizer.pad_token_id,
                                 reference_logps, state, run_dir)
        evaluate_now = functools.partial(evaluate, config, accelerator, model, tokenizer, eval_pairs, eval_batches,
                                         reference_logps, state, logger)
        with restored_signal_handlers():
            finished = train(config, accelerator, model, optimizer, scheduler, plans, n_planned, state, run_dir, logger,
                             train_step=step, evaluate=evaluate_now, script="dpo_train.py")
        if finished and accelerator.is_main_process:
            command = shlex.join(sys.argv) if argv is None else None  # started from the shell: for the model card
            finish_run(config, run_dir, command)  # {run_dir}/hf from LATEST/policy.pt (no second gather)
            plot_run_or_warn(run_dir)
            console.print(run_summary(state, run_dir, time.monotonic() - started), soft_wrap=True, highlight=False)
    return run_dir


def load_reference(config, accelerator, cache_dir: str) -> torch.nn.Module:
    """The frozen reference: model.archive (or the base weights) in model.reference_dtype, sharded like the policy."""
    reference_config = dataclasses.replace(config.model, policy_dtype=config.model.reference_dtype)
    reference = prepare_frozen(config, accelerator, load_model(reference_config, cache_dir, **model_load_kwargs(config, accelerator)))
    if accelerator.is_main_process:
        units = sum(1 for m in reference.modules() if type(m).__name__.startswith("FSDP"))
        console.print(f"reference model: {config.model.reference_dtype}, "
                      + (f"sharded in {units} FSDP2 units" if units else f"on {accelerator.device}"), highlight=False)
    return reference


def pair_loss(config, model, batch, n_pairs, reference_chosen, reference_rejected):
    """(losses, chosen rewards, rejected rewards, policy chosen log-probs, policy rejected log-probs) of one micro-batch."""
    policy_chosen, policy_rejected = pair_logps(model, batch, n_pairs, config.loss.supervised_logits_only,
                                                config.loss.logits_chunk_tokens)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, config.loss.name, config.loss.beta,
        config.loss.label_smoothing, config.loss.reference_free)
    return losses, chosen_rewards, rejected_rewards, policy_chosen.detach(), policy_rejected.detach()


def train_step(config, accelerator, model, optimizer, scheduler, train_pairs, pad_id, reference_logps, state, run_dir,
               indices) -> dict:
    """One optimizer step over the global batch of pairs. The reference's loss is the mean over the step's B pairs; a
    micro-batch on one of W data-parallel processes backpropagates its pairs' summed loss x W / B (see modeling/loss.py)."""
    pairs = [{**train_pairs[i], "index": i} for i in indices]
    collate = collate_for(config, pad_id)
    world = data_parallel(accelerator)[1]
    ga = config.gradient_accumulation_steps
    lr = scheduler.get_last_lr()[0]
    start = time.perf_counter()
    model.train()
    parts = []
    for m, share in enumerate(micro_batches(pairs, accelerator, ga)):
        batch = to_device(collate(pair_sides(share)), accelerator.device)
        reference_chosen, reference_rejected = reference_logps("train", share, batch)
        with no_sync_unless_last(accelerator, model, m, ga):
            losses, *rest = pair_loss(config, model, batch, len(share), reference_chosen, reference_rejected)
            accelerator.backward(losses.sum() * world / len(pairs))
        parts.append([losses.detach(), *rest])
    values = [gather_dp(accelerator, torch.cat(column).float()) for column in zip(*parts)]
    raise_if_not_finite(values[0], [p["example_id"] for p in pairs], gather_order(len(pairs), accelerator, ga), state, run_dir)
    grad_norm = optimizer_step(config, accelerator, model, optimizer, scheduler)
    elapsed = time.perf_counter() - start
    local = len(pairs) // ga // world
    positions = sum(collate.positions(pair_positions(pairs[s:s + local])) for s in range(0, len(pairs), local))
    return {**pair_metrics("train", *values), "grad_norm": grad_norm, "lr": lr,
            **step_throughput(pair_sides(pairs), positions, elapsed, accelerator.device, n_devices=accelerator.num_processes),
            "examples_per_second": len(pairs) / elapsed}


@torch.no_grad()
def evaluate(config, accelerator, model, tokenizer, eval_pairs, eval_batches, reference_logps, state, logger) -> dict:
    """Losses, rewards and log-probs over the fixed eval pairs (summed log-probs only, never logits), then policy samples."""
    rank, world = data_parallel(accelerator)
    model.eval()
    collate = collate_for(config, tokenizer.pad_token_id)
    parts = []
    for indices in eval_batches:
        local = len(indices) // world
        share = [{**eval_pairs[i], "index": i} for i in indices[rank * local:(rank + 1) * local]]
        batch = to_device(collate(pair_sides(share)), accelerator.device)
        reference_chosen, reference_rejected = reference_logps("eval", share, batch)
        parts.append([gather_dp(accelerator, v.float()) for v in
                      pair_loss(config, model, batch, len(share), reference_chosen, reference_rejected)])
    metrics = pair_metrics("eval", *[torch.cat(column) for column in zip(*parts)])
    if config.sample_during_eval and config.n_eval_model_samples > 0:
        logger.samples(generate_samples(config, accelerator, model, tokenizer, eval_pairs, eval_batches, collate_prompts),
                       state.examples_seen)
    return metrics


@torch.no_grad()
def score_pairs(config, accelerator, pad_id, model, pairs: list[dict], batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of chosen and rejected under `model` (the frozen reference) for this process's pairs."""
    if batch is None:
        batch = to_device(collate_for(config, pad_id)(pair_sides(pairs)), accelerator.device)
    chosen, rejected = pair_logps(model, batch, len(pairs), config.loss.supervised_logits_only, config.loss.logits_chunk_tokens)
    return chosen.float(), rejected.float()


if __name__ == "__main__":
    run_main(main)
