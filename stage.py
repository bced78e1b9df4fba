"""A training run, written once for both stages: sft_train.py and dpo_train.py each pass a Stage of what differs.

    SFT = Stage("sft", "sft_train.py", __doc__, LOSSES, load_data, train_step, evaluate)
    main, cli = SFT.main, SFT.cli      # main(argv) -> run_dir; cli(): the `sft-train` console script

`run_stage`: the config and every check that needs no model (training/loop.py start_run); the run directory claimed; the
tokenizer and the stage's data; the run's plan checked, against a resumed run's too; the stage's `before_policy` (DPO: the
frozen reference); the policy, its optimizer and schedule; fresh or resumed state; training (training/loop.py train);
then the Hugging Face export, plots and summary. The stage's hooks get the `Run`, which holds all of that, and build their
optimizer step on `train_batch` (micro-batches, NaN check, clip and step, timing) and their eval on `eval_columns`.
"""

from __future__ import annotations

import training.cpu_threads  # noqa: F401,I001  first: OpenMP's passive waiting must be set before torch is imported
import functools
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from data.batches import check_plan, collate_prompts, eval_plan, run_plan
from data.packing import Collate, collate_for
from data.tokenize import TokenizeSettings
from modeling.compile import compile_model
from modeling.export import finish_run
from modeling.load import load_model, load_tokenizer
from modeling.lora import add_adapters
from training.adapters import trainable_parameters
from training.cli import run_main
from training.config import Config, cache_dir
from training.cpu_threads import set_cpu_threads
from training.distributed import (build_accelerator, data_first, data_parallel, gather_dp, model_load_kwargs,
                                  parallel_mode, prepare_model)
from training.logger import MetricsLogger, console
from training.loop import (Start, TrainState, build_optimizer, claimed_run_dir, generate_samples, micro_batch_plan,
                           no_sync_unless_last, optimizer_step, plan_gather_order, prepare_run_dir, raise_if_not_finite,
                           restored_signal_handlers, run_summary, start_run, start_state, start_wandb, train)
from training.plots import plot_run_or_warn
from training.rundir import check_resume, run_signature
from training.schedule import check_length, count_updates
from training.throughput import ModelFlops, compute_dtype, device_peak_flops, model_flops, step_throughput, synchronize

log = logging.getLogger("stage")


@dataclass
class Data:
    """A stage's tokenized splits."""

    train: Any  # a datasets.Dataset of SFT examples or of preference pairs
    eval: Any
    train_groups: list[list[int]] | None = None  # pairs: the pair indices of each prompt, the units the data order shuffles
    eval_groups: list[list[int]] | None = None
    fingerprint: str | None = None  # the training tokens' hash, recorded in the run's signature and compared on resume


@dataclass
class Run:
    """What a stage's hooks work with; main fills it in as it builds the run."""

    config: Config
    accelerator: Any
    run_dir: Path
    cache: Path
    tokenizer: Any
    collate: Collate  # builds a micro-batch (data/packing.py collate_for)
    data: Data | None = None
    eval_batches: list[list[int]] = field(default_factory=list)  # the fixed eval set (data/batches.py eval_plan)
    reference: Any = None  # what the stage's before_policy built (DPO: modeling/reference_logps.py ReferenceLogps)
    model: torch.nn.Module | None = None  # the policy, as accelerate prepared it
    optimizer: Any = None
    scheduler: Any = None
    state: TrainState = field(default_factory=TrainState)
    logger: MetricsLogger | None = None
    flops: ModelFlops | None = None  # the policy's FLOP counts per token (training/throughput.py), for mfu
    peak_flops: float | None = None  # one device's peak FLOP/s in the compute dtype; None off CUDA


@dataclass(frozen=True)
class Stage:
    """What a stage supplies: its objectives and hooks."""

    name: str  # its logger's name
    script: str  # the entry script, for the continue command printed after a stop
    usage: str = field(repr=False)  # --help's text
    losses: tuple[str, ...]  # the loss.name values it trains (training/checks.py check_stage)
    load_data: Callable[[Run, dict], Data]  # (run, data_files) -> its splits, inside data_first
    train_step: Callable[[Run, list[int]], dict]  # one optimizer step over these training indices -> metrics
    evaluate: Callable[[Run], dict]  # metrics over run.eval_batches; main adds the samples
    before_policy: Callable[[Run], Any] | None = None  # -> run.reference, before the policy loads (DPO's reference)
    counted: str = "examples"  # what its batch_size, n_examples and examples_seen count (the run's last lines)
    policy: str = "the input of DPO"  # what its LATEST/policy.pt is for (the run's last lines)

    def main(self, argv: list[str] | None = None) -> Path | None:
        """A run of this stage from command-line words (default: sys.argv); its run directory, None after --help."""
        return run_stage(self, argv)

    def cli(self) -> None:
        """The console script: main() with a user error as one line and exit status 2 (training/cli.py run_main)."""
        run_main(self.main)


def run_stage(stage: Stage, argv: list[str] | None = None) -> Path | None:
    """A run of `stage`, from the checks to the export (the module docstring gives the order)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    start = start_run(sys.argv[1:] if argv is None else argv, stage.losses, stage.usage, build_accelerator)
    if start is None:  # --help was printed
        return None
    config, accelerator = start.config, start.accelerator
    with claimed_run_dir(config, accelerator, start.run_dir, start.resume_dir):  # refuses a finished or live run; locks it
        cache = cache_dir(config)
        tokenizer = load_tokenizer(config.model)
        run = Run(config, accelerator, start.run_dir, cache, tokenizer, collate_for(config, tokenizer.pad_token_id))
        with data_first(accelerator, cache, config.cache_node_local):  # one process per cache prepares data; the others read it
            run.data = stage.load_data(run, start.data_files)
        signature, n_updates = check_run(run, start)  # before the model loads

        prepare_run_dir(config, accelerator, run.run_dir)
        if stage.before_policy is not None:
            torch.manual_seed(config.seed)  # a random_init reference gets the policy's weights
            run.reference = stage.before_policy(run)
        torch.manual_seed(config.seed)  # random_init models must not depend on earlier RNG use
        prepare_policy(run, load_model(config.model, str(cache), **model_load_kwargs(config, accelerator)), n_updates,
                       logging.getLogger(stage.name))
        run.state = start_state(config, accelerator, run.model, run.optimizer, run.scheduler, start.resume_dir, run.run_dir)
        run.state.run = signature

        run.logger = MetricsLogger(run.run_dir, start_wandb(config, run.run_dir, accelerator), config.minimum_log_interval_secs,
                                   enabled=accelerator.is_main_process)
        plans, n_planned = run_plan(config, run.data.train, run.state.epoch, run.state.offset, run.data.train_groups)
        with restored_signal_handlers():
            finished = train(config, accelerator, run.model, run.optimizer, run.scheduler, plans, n_planned, run.state,
                             run.run_dir, run.logger, train_step=functools.partial(stage.train_step, run),
                             evaluate=functools.partial(evaluate_with_samples, stage, run), script=stage.script)
        if finished and accelerator.is_main_process:
            command = shlex.join(sys.argv) if argv is None else None  # started from the shell: for the model card
            finish_run(config, run.run_dir, command)  # {run_dir}/hf from LATEST/policy.pt (no second gather)
            plot_run_or_warn(run.run_dir)
            summary = run_summary(run.state, run.run_dir, time.monotonic() - started, stage.counted, stage.policy)
            console.print(summary, soft_wrap=True, highlight=False)
    return run.run_dir


def load_splits(run: Run, data_files: dict, build_split: Callable) -> tuple[Any, Any]:
    """The train split (mixed by dataset_weights) and the test split, tokenized by `build_split` (data/sft.py
    build_split or data/pairs.py build_pair_split) into the cache."""
    config = run.config
    settings = TokenizeSettings(config.max_length, config.max_prompt_length)
    train_split = build_split(config.datasets, "train", data_files, run.tokenizer, settings, str(run.cache),
                              config.tokenize_num_proc, weights=config.dataset_weights, seed=config.seed,
                              data_num_proc=config.data_num_proc)
    eval_split = build_split(config.datasets, "test", data_files, run.tokenizer, settings, str(run.cache),
                             config.tokenize_num_proc, data_num_proc=config.data_num_proc)
    return train_split, eval_split


def check_run(run: Run, start: Start) -> tuple[dict, int]:
    """Both splits fill their batches, a resumed run has this run's settings and data, a decay has updates after its
    warmup; the fixed eval batches. Returns the run's signature and its number of optimizer steps."""
    config, data = run.config, run.data
    check_plan(len(data.train), config.batch_size, config.n_epochs, config.n_examples, "training")
    check_plan(len(data.eval), config.eval_batch_size, None, config.n_eval_examples, "eval")
    run.eval_batches = eval_plan(config, len(data.eval), data.eval_groups)
    signature = run_signature(config, data.fingerprint)
    if start.resume_dir is not None:
        check_resume(start.saved_run, signature, start.resume_dir, config.resume_force)
    n_updates = count_updates(len(data.train), config.batch_size, config.n_epochs, config.n_examples)
    check_length(config, n_updates)
    return signature, n_updates


def prepare_policy(run: Run, model: torch.nn.Module, n_updates: int, logger: logging.Logger = log) -> None:
    """run.model, run.optimizer, run.scheduler: LoRA adapters (lora.enabled), CPU threads, dtype and sharding
    (prepare_model), compiled blocks (compile=true), the optimizer and the schedule over n_updates, accelerate's wrapping;
    and the policy's FLOP counts for mfu."""
    config, accelerator = run.config, run.accelerator
    if config.lora.enabled:
        model = add_adapters(model, config.lora)  # the base frozen; FSDP still wraps each model.block_name
        logger.info("LoRA: %d of %d parameters trainable", *trainable_parameters(model))
    set_cpu_threads(model, accelerator.device)  # one thread for tiny CPU models unless OMP_NUM_THREADS is set
    prepare_model(config, accelerator, model)
    if compile_model(config, model):  # compile=true: each block in place, before FSDP/DDP wrap it
        logger.info("compiling each %s block and the loss chunk (torch.compile, dynamic shapes)", config.model.block_name)
    optimizer, run.scheduler = build_optimizer(config, model, n_updates)
    run.model, run.optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped by hand: once per update
    run.flops = model_flops(accelerator.unwrap_model(run.model))
    run.peak_flops = device_peak_flops(accelerator.device, compute_dtype(
        config.model.policy_dtype, config.model.fsdp_policy_mp, parallel_mode(accelerator) == "fsdp", config.allow_tf32))


@dataclass
class Step:
    """What one optimizer step over the global batch gave."""

    values: list[torch.Tensor]  # the micro-steps' per-example tensors in float32, gathered (order: plan_gather_order)
    grad_norm: float  # before clipping
    lr: float  # the step's learning rate
    seconds: float
    positions: int  # tensor positions (tokens + padding) of every micro-batch of every process


def train_batch(run: Run, items: list[dict], lengths: list[int], micro_step: Callable[[list[dict]], list[torch.Tensor]],
                cost: Callable[[list[int]], int] | None = None) -> Step:
    """One optimizer step over the global batch `items` (of these lengths). `micro_step(share)` runs forward and backward
    on this process's items of one micro-batch and returns per-item tensors, the first the loss checked for NaN and inf.
    The micro-batches come from micro_batch_plan: gradient_accumulation_steps fixed ones, or a max_tokens_per_micro_batch
    budget, against `cost(indices)`, the tensor positions of a micro-batch of these items (default: their collate's)."""
    config, accelerator, model = run.config, run.accelerator, run.model
    if cost is None:
        def cost(micro: list[int]) -> int:
            return run.collate.positions([lengths[i] for i in micro])
    rank, world = data_parallel(accelerator)
    plan = micro_batch_plan(config, world, lengths, cost)
    lr = run.scheduler.get_last_lr()[0]
    synchronize(accelerator.device)  # the clock starts on an idle device
    start = time.perf_counter()
    model.train()
    parts = []
    for m, micro in enumerate(plan[rank]):
        with no_sync_unless_last(accelerator, model, m, len(plan[rank])):
            parts.append([v.detach() for v in micro_step([items[i] for i in micro])])
    values = [gather_dp(accelerator, torch.cat(column)).float() for column in zip(*parts)]
    raise_if_not_finite(values[0], [item["example_id"] for item in items], plan_gather_order(plan), run.state, run.run_dir)
    grad_norm = optimizer_step(config, accelerator, model, run.optimizer, run.scheduler)
    synchronize(accelerator.device)  # the optimizer's kernels are part of the step
    seconds = time.perf_counter() - start
    return Step(values, grad_norm, lr, seconds, sum(cost(micro) for micros in plan for micro in micros))


def step_flops(run: Run, sequences: list[dict]) -> float | None:
    """Model FLOPs of a forward + backward over these sequences (training/throughput.py): the LM head ran at supervised
    positions only (loss.supervised_logits_only), or at every token."""
    if run.flops is None:
        return None
    lengths = [len(s["prompt_ids"]) + len(s["response_ids"]) for s in sequences]
    supervised = sum(s.get("n_supervised", len(s["response_ids"])) for s in sequences)
    return run.flops.step(lengths, supervised if run.config.loss.supervised_logits_only else sum(lengths))


def throughput(run: Run, sequences: list[dict], step: Step, flops: float | None) -> dict:
    """Token rates, padding, memory and mfu of a step over these sequences (training/throughput.py step_throughput)."""
    return step_throughput(sequences, step.positions, step.seconds, run.accelerator.device, step_flops=flops,
                           n_devices=run.accelerator.num_processes, peak_flops=run.peak_flops)


def eval_columns(run: Run, eval_step: Callable[[list[int]], list[torch.Tensor]]) -> list[torch.Tensor]:
    """`eval_step(indices)` on this process's share of every eval batch; each tensor it returns gathered over the
    processes and concatenated over the batches."""
    rank, world = data_parallel(run.accelerator)
    parts = []
    for indices in run.eval_batches:
        local = len(indices) // world
        parts.append([gather_dp(run.accelerator, v) for v in eval_step(indices[rank * local:(rank + 1) * local])])
    return [torch.cat(column) for column in zip(*parts)]


@torch.no_grad()
def evaluate_with_samples(stage: Stage, run: Run) -> dict:
    """The stage's eval metrics, then (sample_during_eval) the policy's samples for the first eval prompts."""
    config = run.config
    run.model.eval()
    metrics = stage.evaluate(run)
    if config.sample_during_eval and config.n_eval_model_samples > 0:
        run.logger.samples(generate_samples(config, run.accelerator, run.model, run.tokenizer, run.data.eval,
                                            run.eval_batches, collate_prompts), run.state.examples_seen)
    return metrics
