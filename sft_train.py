"""Supervised fine-tuning of a causal LM on the chosen answers of preference data: the first stage of DPO.

    python sft_train.py recipes/demo.yaml                                   # tiny offline demo on CPU
    python sft_train.py recipes/pythia28_hh.yaml lr=1e-6 batch_size=64      # recipe + dotted overrides
    accelerate launch --config_file accelerate_configs/fsdp_8gpu.yaml sft_train.py recipes/llama7b_hh.yaml
    python sft_train.py recipes/demo.yaml run_dir=runs/demo resume_from=auto   # continue a stopped run

Writes {run_dir}/config.yaml, metrics.jsonl, samples.jsonl, step-{N}/ after each eval and LATEST/ at the end, each checkpoint
holding policy.pt, optimizer.pt and scheduler.pt ({"step_idx", "state", "metrics"}; FSDP/TP: the sharded resume/ state instead
of optimizer.pt); LATEST/policy.pt is the input of DPO.
"""

from __future__ import annotations

import training.cpu_threads  # noqa: F401,I001  first: OpenMP's passive waiting must be set before torch is imported
import functools
import logging
import shlex
import sys
import time
from pathlib import Path

import torch

from data.batches import check_plan, collate_prompts, eval_plan, run_plan
from data.packing import collate_for, to_device
from data.sft import build_split
from data.tokenize import TokenizeSettings, tokens_fingerprint
from modeling.compile import compile_model
from modeling.export import finish_run
from modeling.load import load_model, load_tokenizer
from modeling.lora import add_adapters
from modeling.loss import sequence_nll
from training.cli import run_main
from training.adapters import trainable_parameters
from training.config import cache_dir
from training.cpu_threads import set_cpu_threads
from training.distributed import (build_accelerator, data_first, data_parallel, gather_dp, model_load_kwargs,
                                  parallel_mode, prepare_model)
from training.logger import MetricsLogger, console
from training.loop import (build_optimizer, claimed_run_dir, gather_order, generate_samples, micro_batches,
                           no_sync_unless_last, optimizer_step, prepare_run_dir, raise_if_not_finite,
                           restored_signal_handlers, run_summary, start_run, start_state, start_wandb, train)
from training.rundir import check_resume, run_signature
from training.plots import plot_run_or_warn
from training.schedule import check_length, count_updates
from training.throughput import ModelFlops, compute_dtype, device_peak_flops, model_flops, step_throughput, synchronize

log = logging.getLogger("sft")
LOSSES = ("sft",)  # the objectives this stage trains (training/checks.py check_stage)


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
            train_data = build_split(config.datasets, "train", data_files, tokenizer, settings, str(cache),
                                     config.tokenize_num_proc, weights=config.dataset_weights, seed=config.seed,
                                     data_num_proc=config.data_num_proc)
            eval_data = build_split(config.datasets, "test", data_files, tokenizer, settings, str(cache), config.tokenize_num_proc,
                                    data_num_proc=config.data_num_proc)
        check_plan(len(train_data), config.batch_size, config.n_epochs, config.n_examples, "training")  # before the model loads
        check_plan(len(eval_data), config.eval_batch_size, None, config.n_eval_examples, "eval")
        signature = run_signature(config, tokens_fingerprint(train_data))
        if resume_dir is not None:
            check_resume(saved_run, signature, resume_dir, config.resume_force)
        n_updates = count_updates(len(train_data), config.batch_size, config.n_epochs, config.n_examples)
        check_length(config, n_updates)  # a decay needs updates after its warmup

        prepare_run_dir(config, accelerator, run_dir)
        torch.manual_seed(config.seed)  # random_init models must not depend on earlier RNG use
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
        plans, n_planned = run_plan(config, train_data, state.epoch, state.offset)
        peak = device_peak_flops(accelerator.device, compute_dtype(config.model.policy_dtype, config.model.fsdp_policy_mp,
                                                                   parallel_mode(accelerator) == "fsdp", config.allow_tf32))
        step = functools.partial(train_step, config, accelerator, model, optimizer, scheduler, train_data, tokenizer.pad_token_id,
                                 state, run_dir, flops=model_flops(accelerator.unwrap_model(model)), peak_flops=peak)
        evaluate_now = functools.partial(evaluate, config, accelerator, model, tokenizer, eval_data,
                                         eval_plan(config, len(eval_data)), state, logger)
        with restored_signal_handlers():
            finished = train(config, accelerator, model, optimizer, scheduler, plans, n_planned, state, run_dir, logger,
                             train_step=step, evaluate=evaluate_now, script="sft_train.py")
        if finished and accelerator.is_main_process:
            command = shlex.join(sys.argv) if argv is None else None  # started from the shell: for the model card
            finish_run(config, run_dir, command)  # {run_dir}/hf from LATEST/policy.pt (no second gather)
            plot_run_or_warn(run_dir)
            console.print(run_summary(state, run_dir, time.monotonic() - started), soft_wrap=True, highlight=False)
    return run_dir


def train_step(config, accelerator, model, optimizer, scheduler, train_data, pad_id, state, run_dir, indices, *,
               flops: ModelFlops | None = None, peak_flops: float | None = None) -> dict:
    """One optimizer step over the global batch; see modeling/loss.py for why each micro-batch loss is scaled by W / D."""
    examples = [train_data[i] for i in indices]
    collate = collate_for(config, pad_id)
    world = data_parallel(accelerator)[1]
    ga = config.gradient_accumulation_steps
    n_tokens = sum(e["n_supervised"] for e in examples)
    denominator = len(examples) if config.loss.normalize == "example" else n_tokens
    lr = scheduler.get_last_lr()[0]
    synchronize(accelerator.device)
    start = time.perf_counter()
    model.train()
    nll_sums = []
    for m, share in enumerate(micro_batches(examples, accelerator, ga)):
        batch = to_device(collate(share), accelerator.device)
        with no_sync_unless_last(accelerator, model, m, ga):
            nll, _ = sequence_nll(model, batch, config.loss.supervised_logits_only, config.loss.logits_chunk_tokens)
            accelerator.backward(nll.sum() * world / denominator)
        nll_sums.append(nll.detach())
    nll = gather_dp(accelerator, torch.cat(nll_sums)).float()
    raise_if_not_finite(nll, [e["example_id"] for e in examples], gather_order(len(examples), accelerator, ga), state, run_dir)
    grad_norm = optimizer_step(config, accelerator, model, optimizer, scheduler)
    synchronize(accelerator.device)  # the optimizer's kernels are part of the step
    elapsed = time.perf_counter() - start
    loss = nll.mean().item()
    local = len(examples) // ga // world
    positions = sum(collate.positions([len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples[s:s + local]])
                    for s in range(0, len(examples), local))
    return {
        "loss/train": loss if config.loss.normalize == "example" else nll.sum().item() / n_tokens,
        "logps_train/chosen": -loss,
        "nll_per_token/train": nll.sum().item() / n_tokens,
        "grad_norm": grad_norm,
        "lr": lr,
        **step_throughput(examples, positions, elapsed, accelerator.device, step_flops=step_flops(config, flops, examples),
                          n_devices=accelerator.num_processes, peak_flops=peak_flops),
    }


def step_flops(config, flops: ModelFlops | None, examples: list[dict]) -> float | None:
    """Model FLOPs of the step (training/throughput.py): the LM head ran at supervised positions only, or at every token."""
    if flops is None:
        return None
    lengths = [len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples]
    head_positions = sum(e["n_supervised"] for e in examples) if config.loss.supervised_logits_only else sum(lengths)
    return flops.step(lengths, head_positions)


@torch.no_grad()
def evaluate(config, accelerator, model, tokenizer, eval_data, eval_batches, state, logger) -> dict:
    """Summed NLL and token counts over the fixed eval set (never keeps logits), then samples for a few prompts."""
    rank, world = data_parallel(accelerator)
    model.eval()
    collate = collate_for(config, tokenizer.pad_token_id)
    nll_all, tok_all = [], []
    for indices in eval_batches:
        local = len(indices) // world
        batch = collate([eval_data[i] for i in indices[rank * local:(rank + 1) * local]])
        nll, ntok = sequence_nll(model, to_device(batch, accelerator.device), config.loss.supervised_logits_only,
                                 config.loss.logits_chunk_tokens)
        nll_all.append(gather_dp(accelerator, nll.float()))
        tok_all.append(gather_dp(accelerator, ntok))
    nll, ntok = torch.cat(nll_all), torch.cat(tok_all)
    metrics = {
        "loss/eval": nll.mean().item(),
        "logps_eval/chosen": -nll.mean().item(),
        "nll_per_token/eval": (nll.sum() / ntok.sum()).item(),
    }
    if config.sample_during_eval and config.n_eval_model_samples > 0:
        logger.samples(generate_samples(config, accelerator, model, tokenizer, eval_data, eval_batches, collate_prompts), state.examples_seen)
    return metrics


if __name__ == "__main__":
    run_main(main)
