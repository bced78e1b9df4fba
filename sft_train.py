"""Supervised fine-tuning of a causal LM on the chosen answers of preference data: the first stage of DPO.

    python sft_train.py recipes/demo.yaml                                   # tiny offline demo on CPU
    python sft_train.py recipes/pythia28_hh.yaml lr=1e-6 batch_size=64      # recipe + dotted overrides
    accelerate launch --config_file accelerate_configs/fsdp_8gpu.yaml sft_train.py recipes/llama7b_hh.yaml
    python sft_train.py recipes/demo.yaml run_dir=runs/demo resume_from=auto   # continue a stopped run

Writes {run_dir}/config.yaml, metrics.jsonl, samples.jsonl, step-{N}/ after each eval and LATEST/ at the end, each checkpoint
holding policy.pt, optimizer.pt and scheduler.pt ({"step_idx", "state", "metrics"}); LATEST/policy.pt is the input of DPO.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object

from data.batches import collate_prompts, plan_batches, plan_train_batches
from data.packing import collate_batch, tensor_tokens
from data.sft import build_split
from data.tokenize import TokenizeSettings
from modeling.export import finish_run
from modeling.load import load_model, load_tokenizer
from modeling.loss import sequence_nll
from training import checkpoint as ckpt
from training.config import Config, default_run_dir, load_config, local_dir, normalize_data_files, save_config, validate
from training.distributed import (build_accelerator, check_setup, data_parallel, full_model_state, full_optimizer_state,
                                  gather_dp, load_full_state, model_load_kwargs, prepare_model, raise_open_file_limit,
                                  synced_generate)
from training.logger import MetricsLogger, console
from training.throughput import step_throughput

log = logging.getLogger("sft")


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler that resume needs."""

    examples_seen: int = 0  # examples trained on (the reference's step_idx)
    updates: int = 0  # optimizer steps
    epoch: int = 0  # position of the next batch in the data order
    offset: int = 0
    examples_counted: int = 0  # the reference's stop counter (includes dropped partial batches)
    last_eval: int = -1  # examples_seen at the last eval, so a resumed run does not repeat it
    eval_metrics: dict | None = None


class StopRequested:
    """SIGTERM/SIGINT (or max_updates_this_run) ask the loop to finish the current step, save LATEST and exit cleanly."""

    def __init__(self, max_updates: int | None = None):
        self.signal: int | None = None
        self.max_updates, self.updates = max_updates, 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def after_update(self, accelerator) -> bool:
        """Stop now? All processes agree, as a signal may reach only some of them (and saving is collective)."""
        self.updates += 1
        stop = self.signal is not None or self.updates == self.max_updates
        if accelerator.num_processes > 1:
            stop = bool(accelerator.reduce(torch.tensor([int(stop)], device=accelerator.device), "sum").item())
        return stop

    def handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.signal = signum
        console.print(f"[yellow]received {signal.Signals(signum).name}: finishing this step, then saving LATEST[/yellow]")


@contextlib.contextmanager
def restored_signal_handlers():
    """main() may be called from Python (tests, notebooks): give SIGTERM/SIGINT back their handlers afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(sys.argv[1:] if argv is None else argv)
    accelerator = build_accelerator(config)
    validate(config, data_parallel(accelerator)[1])
    check_setup(config, accelerator)  # FSDP block name, TP plan, device_map: fail before loading anything
    if note := raise_open_file_limit(accelerator):
        log.info(note)
    data_files = normalize_data_files(config.data_files, config.datasets, log.warning)
    resume_dir = ckpt.resolve_resume(config.resume_from, config.run_dir) if config.resume_from else None
    cache_dir = str(local_dir(config.local_dirs) / "cache")

    tokenizer = load_tokenizer(config.model)
    settings = TokenizeSettings(config.max_length, config.max_prompt_length)
    with accelerator.main_process_first():  # the main process tokenizes and caches; the others read the cache
        train_data = build_split(config.datasets, "train", data_files, tokenizer, settings, cache_dir, config.tokenize_num_proc,
                                 weights=config.dataset_weights, seed=config.seed)
        eval_data = build_split(config.datasets, "test", data_files, tokenizer, settings, cache_dir, config.tokenize_num_proc)

    run_dir = prepare_run_dir(config, accelerator, resume_dir)
    torch.manual_seed(config.seed)  # random_init models must not depend on earlier RNG use
    model = load_model(config.model, cache_dir, **model_load_kwargs(config, accelerator))
    prepare_model(config, accelerator, model)
    optimizer = getattr(torch.optim, config.optimizer)(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (config.warmup_steps + 1)))
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped by hand: once per optimizer step
    state = TrainState()
    if resume_dir is not None:
        state = resume(resume_dir, model, optimizer, scheduler, accelerator, run_dir)
        if scheduler.base_lrs[0] != config.lr:
            log.warning("lr=%g is ignored: the resumed optimizer and schedule keep the checkpoint's lr=%g", config.lr, scheduler.base_lrs[0])
    else:
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        __import__("random").seed(config.seed)

    logger = MetricsLogger(run_dir, start_wandb(config, run_dir, accelerator), config.minimum_log_interval_secs,
                           enabled=accelerator.is_main_process)
    with restored_signal_handlers():
        train(config, accelerator, model, tokenizer, optimizer, scheduler, train_data, eval_data, state, run_dir, logger)
    return run_dir


def train(config, accelerator, model, tokenizer, optimizer, scheduler, train_data, eval_data, state, run_dir, logger):
    """Eval (every eval_every examples), save step-N, train one batch; at the end a final eval and LATEST."""
    eval_every = max(config.eval_every - config.eval_every % config.batch_size, config.batch_size)
    eval_batches = [p.indices for p in plan_batches(len(eval_data), config.eval_batch_size, config.seed, None, config.n_eval_examples)]
    finished = config.n_examples is not None and state.examples_counted >= config.n_examples
    stop = StopRequested(config.max_updates_this_run)
    plans = [] if finished else plan_train_batches(config.batching, train_data, config.batch_size, config.seed, config.n_epochs,
                                                   config.n_examples, state.epoch, state.offset, config.length_bucket_window)
    n_planned = sum(1 for _ in plan_batches(len(train_data), config.batch_size, config.seed, config.n_epochs, config.n_examples))
    logger.start_progress(n_planned * config.batch_size, state.examples_seen)
    for plan in plans:
        if state.examples_seen % eval_every == 0 and (state.examples_seen > 0 or config.do_first_eval) \
                and state.last_eval != state.examples_seen:
            evaluate(config, accelerator, model, tokenizer, eval_data, eval_batches, state, logger)
            if state.examples_seen > 0 and not config.debug:
                save(config, accelerator, model, optimizer, scheduler, state, run_dir, f"step-{state.examples_seen}")
        metrics = train_step(config, accelerator, model, optimizer, scheduler, [train_data[i] for i in plan.indices],
                             tokenizer.pad_token_id, state, run_dir)
        state.examples_seen += config.batch_size
        state.updates += 1
        state.epoch, state.offset, state.examples_counted = plan.epoch, plan.offset + config.batch_size, plan.examples_counted
        logger.log({**metrics, "counters/examples": state.examples_seen, "counters/updates": state.updates}, state.examples_seen)
        logger.advance(state.examples_seen)
        if stop.after_update(accelerator):
            save(config, accelerator, model, optimizer, scheduler, state, run_dir, "LATEST")
            logger.close()
            if accelerator.is_main_process:
                console.print(f"stopped at {state.examples_seen} examples; continue with: python sft_train.py "
                              f"{run_dir}/config.yaml run_dir={run_dir} resume_from=auto", soft_wrap=True, highlight=False)
            return
    if state.updates == 0 and not finished:
        raise ValueError(f"no training batch: {len(train_data)} examples, batch_size={config.batch_size}")
    if state.last_eval != state.examples_seen:
        evaluate(config, accelerator, model, tokenizer, eval_data, eval_batches, state, logger)
    save(config, accelerator, model, optimizer, scheduler, state, run_dir, "LATEST")
    logger.close()
    if accelerator.is_main_process:
        console.print(f"[green]done[/green]: {state.examples_seen} examples, {state.updates} updates; policy at {run_dir}/LATEST/policy.pt")
        finish_run(config, run_dir)  # {run_dir}/hf from LATEST/policy.pt (no second gather) and the plots


def train_step(config, accelerator, model, optimizer, scheduler, examples, pad_id, state, run_dir) -> dict:
    """One optimizer step over the global batch; see modeling/loss.py for why each micro-batch loss is scaled by W / D."""
    rank, world = data_parallel(accelerator)
    ga = config.gradient_accumulation_steps
    micro, local = len(examples) // ga, len(examples) // ga // world
    n_tokens = sum(e["n_supervised"] for e in examples)
    denominator = len(examples) if config.loss.normalize == "example" else n_tokens
    lr = scheduler.get_last_lr()[0]
    start = time.perf_counter()
    model.train()
    nll_sums = []
    for m in range(ga):
        batch = collate_batch(examples[m * micro + rank * local: m * micro + (rank + 1) * local], pad_id, config.packing,
                              config.max_length)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.no_sync(model) if m < ga - 1 else contextlib.nullcontext():
            nll, _ = sequence_nll(model, batch, config.loss.supervised_logits_only, config.loss.logits_chunk_tokens)
            accelerator.backward(nll.sum() * world / denominator)
        nll_sums.append(nll.detach())
    nll = gather_dp(accelerator, torch.cat(nll_sums)).float()
    if not torch.isfinite(nll).all():
        order = [m * micro + r * local + j for r in range(world) for m in range(ga) for j in range(local)]  # gather order
        bad = [examples[i]["example_id"] for i, ok in zip(order, torch.isfinite(nll).tolist()) if not ok]
        last = ckpt.last_good_checkpoint(run_dir)
        raise FloatingPointError(
            f"non-finite loss at update {state.updates + 1} ({state.examples_seen} examples seen) in examples {bad} of the batch "
            f"{[e['example_id'] for e in examples]}; last good checkpoint: {last or 'none'}"
        )
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    loss = nll.mean().item()
    positions = sum(tensor_tokens([len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples[s:s + local]],
                                  config.packing, config.max_length) for s in range(0, len(examples), local))
    return {
        "loss/train": loss if config.loss.normalize == "example" else nll.sum().item() / n_tokens,
        "logps_train/chosen": -loss,
        "nll_per_token/train": nll.sum().item() / n_tokens,
        "grad_norm": float(grad_norm),
        "lr": lr,
        **step_throughput(examples, positions, elapsed, model, accelerator.device, world),
    }


@torch.no_grad()
def evaluate(config, accelerator, model, tokenizer, eval_data, eval_batches, state, logger) -> dict:
    """Summed NLL and token counts over the fixed eval set (never keeps logits), then samples for a few prompts."""
    rank, world = data_parallel(accelerator)
    model.eval()
    nll_all, tok_all = [], []
    for indices in eval_batches:
        local = len(indices) // world
        batch = collate_batch([eval_data[i] for i in indices[rank * local:(rank + 1) * local]], tokenizer.pad_token_id,
                              config.packing, config.max_length)
        nll, ntok = sequence_nll(model, {k: v.to(accelerator.device) for k, v in batch.items()},
                                 config.loss.supervised_logits_only, config.loss.logits_chunk_tokens)
        nll_all.append(gather_dp(accelerator, nll.float()))
        tok_all.append(gather_dp(accelerator, ntok))
    nll, ntok = torch.cat(nll_all), torch.cat(tok_all)
    metrics = {
        "loss/eval": nll.mean().item(),
        "logps_eval/chosen": -nll.mean().item(),
        "nll_per_token/eval": (nll.sum() / ntok.sum()).item(),
    }
    state.last_eval, state.eval_metrics = state.examples_seen, metrics
    logger.log(metrics, state.examples_seen, force=True)
    if config.sample_during_eval and config.n_eval_model_samples > 0:
        logger.samples(generate_samples(config, accelerator, model, tokenizer, eval_data, eval_batches), state.examples_seen)
    return metrics


def generate_samples(config, accelerator, model, tokenizer, eval_data, eval_batches) -> list[dict]:
    """Completions for the first n_eval_model_samples eval prompts; every process generates its share (FSDP needs all ranks)."""
    rank, world = data_parallel(accelerator)
    indices = [i for batch in eval_batches for i in batch][: config.n_eval_model_samples]
    share = math.ceil(len(indices) / world)
    mine = indices[rank * share:(rank + 1) * share] or indices[:1]  # every rank must call generate the same number of times
    examples = [eval_data[i] for i in mine]
    batch = {k: v.to(accelerator.device) for k, v in collate_prompts(examples, tokenizer.pad_token_id).items()}
    width = batch["input_ids"].shape[1]
    limits = {"max_new_tokens": config.max_new_tokens} if config.max_new_tokens else {"max_length": max(config.max_length, width + 1)}
    out = accelerator.unwrap_model(model).generate(
        **batch, do_sample=not config.sample_greedy, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **limits,
        synced_gpus=synced_generate(accelerator),  # FSDP/TP: every process runs each forward until all are done
    )
    rows = [
        {"prompt": tokenizer.decode(e["prompt_ids"]), "sample": tokenizer.decode(o[width:], skip_special_tokens=True),
         "example_id": e["example_id"]}
        for e, o in zip(examples, out)
    ]
    rows = gather_object(rows if rank * share < len(indices) else [])
    return rows[: len(indices)]


def save(config, accelerator, model, optimizer, scheduler, state, run_dir, name) -> None:
    """Gather full states (every process takes part), then the main process writes the checkpoint atomically."""
    policy_state = full_model_state(accelerator, model)  # collective under FSDP/TP
    optimizer_state = full_optimizer_state(accelerator, model, optimizer)
    rng = gather_object([ckpt.rng_state()])  # one per process: ranks sample different prompts, so their generators differ
    if accelerator.is_main_process:
        policy_state = {k: v.detach().cpu() for k, v in policy_state.items()}
        train_state = {**asdict(state), "rng": rng, "logs": ckpt.log_sizes(run_dir)}
        ckpt.write_checkpoint(run_dir, name, state.examples_seen, policy_state, optimizer_state, scheduler.state_dict(),
                              ckpt.plain(train_state), state.eval_metrics or {})
        if name.startswith("step-"):
            ckpt.prune(run_dir, config.keep_last)
    accelerator.wait_for_everyone()


def resume(path: Path, model, optimizer, scheduler, accelerator, run_dir: Path) -> TrainState:
    """Model, optimizer, scheduler, counters, data position and RNG of a checkpoint; in its own run_dir the logs are cut back
    to the checkpoint (see training/checkpoint.py), so the steps trained again are not logged twice."""
    load_full_state(accelerator, model, optimizer, path / "policy.pt", path / "optimizer.pt")
    scheduler.load_state_dict(ckpt.load_archive(path / "scheduler.pt")["state"])
    saved = ckpt.load_train_state(path / "train_state.pt")
    ckpt.set_rng_state(saved.pop("rng"), accelerator.process_index)
    logs = saved.pop("logs", {})
    if accelerator.is_main_process and path.resolve().parent == Path(run_dir).resolve():
        ckpt.rewind_logs(run_dir, logs)
    state = TrainState(**saved)
    console.print(f"resumed from {path}: {state.examples_seen} examples seen, epoch {state.epoch}, offset {state.offset}")
    return state


def prepare_run_dir(config: Config, accelerator, resume_dir: Path | None) -> Path:
    """Same directory on every process (the main one picks it); config.yaml written there before training."""
    if config.run_dir is not None:
        run_dir = Path(config.run_dir)
    elif resume_dir is not None:
        run_dir = resume_dir.parent
    else:
        run_dir = default_run_dir(config)
    run_dir = Path(broadcast_object_list([str(run_dir)])[0]) if accelerator.num_processes > 1 else run_dir
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.recover(run_dir)
        save_config(config, run_dir / "config.yaml")
        console.print(f"run dir: {run_dir}")
    accelerator.wait_for_everyone()
    return run_dir


def start_wandb(config: Config, run_dir: Path, accelerator):
    if not (config.wandb.enabled and not config.debug and accelerator.is_main_process):
        return None
    import wandb

    return wandb.init(entity=config.wandb.entity, project=config.wandb.project, name=config.exp_name,
                      config=asdict(config), dir=str(run_dir))


if __name__ == "__main__":
    main()
