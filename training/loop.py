"""The training loop and run bookkeeping that both stages share (stage.py puts them together, in this order).

    resume_dir, saved_run = resume_point(config, accelerator) # checkpoint to continue; its run settings already compared
    run_dir = pick_run_dir(config, accelerator, resume_dir)
    with claimed_run_dir(config, accelerator, run_dir, resume_dir):   # refuses a finished or live run; locked while training
        ...                                                   # tokenizer, data; check_resume(saved_run, signature, ...)
        prepare_run_dir(config, accelerator, run_dir)         # config.yaml, and what is about to run
        optimizer, scheduler = build_optimizer(config, model, n_updates)   # n_updates: training/schedule.py count_updates
        model, optimizer = accelerator.prepare(model, optimizer)
        state = start_state(config, accelerator, model, optimizer, scheduler, resume_dir, run_dir)   # fresh or resumed
        state.run = run_signature(config, data_fingerprint)   # recorded in every checkpoint, compared on resume
        with restored_signal_handlers():
            finished = train(config, accelerator, model, optimizer, scheduler, plans, n_planned, state, run_dir, logger,
                             train_step=..., evaluate=..., script=...)   # script: what the continue command runs

A stage supplies only what its objective changes: `train_step(indices) -> metrics` (one optimizer step over the global
batch, its micro-batches from `micro_batch_plan`, then `optimizer_step`) and `evaluate() -> metrics`. Everything else
(eval cadence, step-N and LATEST checkpoints, resume, SIGTERM/SIGINT, the run directory, wandb) is the same for both.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object

from training import checkpoint as ckpt
from training.config import Config, default_run_dir, save_config
from training.distributed import data_parallel, describe_setup, parallel_mode, sharded, synced_generate
from training.state_dicts import (detached, full_model_state, full_optimizer_state, load_full_state, load_sharded,
                                  save_sharded)
from training.adapters import checkpoint_weights
from training.cli import last_line
from training.errors import UserError
from training.compilation import check_compile, compile_metrics, compile_report, eager
from training.logger import console
from training.rundir import check_resume, claim_run_dir, on_main_process, run_signature
from training.schedule import build_scheduler, schedule_of

log = logging.getLogger(__name__)


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
    run: dict | None = None  # settings that fix the data order and the counters (training/rundir.py), checked on resume


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SIGUSR1: SLURM's --signal=USR1@600, sent ahead of the kill
# A launcher forwards the signal it got (torchrun: SIGINT/SIGTERM) and SLURM's scancel signals every process of the step,
# so the same request can arrive twice within milliseconds; only a signal this much later is a second Ctrl-C.
REPEAT_SECONDS = 2.0


class StopRequested:
    """SIGTERM/SIGINT/SIGUSR1 (or max_updates_this_run) ask the loop to finish the current step, save LATEST and exit
    cleanly; save_every_minutes asks for a LATEST on a timer (training goes on)."""

    def __init__(self, max_updates: int | None = None, save_every_minutes: float | None = None):
        self.signal: int | None = None
        self.signalled_at = 0.0
        self.max_updates, self.updates = max_updates, 0
        self.save_every = None if save_every_minutes is None else save_every_minutes * 60
        self.last_save = time.monotonic()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)

    def after_update(self, accelerator) -> tuple[bool, bool]:
        """(stop now, save LATEST now)? All processes agree, as a signal may reach only some of them, clocks differ, and
        saving is collective. A checkpoint write of the main process's background writer that failed stops every process
        here (its one-line error on the main process), not at the next save."""
        self.updates += 1
        stop = self.signal is not None or self.updates == self.max_updates
        due = self.save_every is not None and time.monotonic() - self.last_save >= self.save_every
        failed = accelerator.is_main_process and ckpt.writer.failed()
        if accelerator.num_processes > 1:
            flags = torch.tensor([int(stop), int(due), int(failed)], device=accelerator.device)
            stop, due, failed = (bool(x) for x in accelerator.reduce(flags, "sum").tolist())
        if failed:
            if accelerator.is_main_process:
                ckpt.writer.wait()  # raises the write's error
            raise UserError("the main process could not write a checkpoint (its error line says why)")
        return stop, due

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def handle(self, signum, frame):
        if self.signal is not None:
            if time.monotonic() - self.signalled_at > REPEAT_SECONDS:  # a second Ctrl-C means now
                raise KeyboardInterrupt
            return  # the same request, delivered again by the launcher or the scheduler
        self.signal, self.signalled_at = signum, time.monotonic()
        console.print(f"[yellow]received {signal.Signals(signum).name}: finishing this step, then saving LATEST[/yellow]")


@contextlib.contextmanager
def restored_signal_handlers():
    """main() may be called from Python (tests, notebooks): give the stop signals back their handlers afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def continue_command(script: str, run_dir: Path, parent_argv: list[str] | None = None) -> str:
    """The shell command that continues this run the way it was started: under a launcher (accelerate launch, torchrun)
    its own command line with its options, else `python SCRIPT`; then the run's saved config and resume_from=auto."""
    words = ["python", script]
    if os.environ.get("LOCAL_RANK") is not None:  # started by a launcher, which is our parent process
        if parent_argv is None:
            try:
                parent_argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
            except OSError:
                parent_argv = []
        ours = Path(sys.argv[0]).name
        at = [i for i, word in enumerate(parent_argv) if Path(word).name == ours]
        if at:
            words = parent_argv[: at[0] + 1]
            if len(words) > 1 and Path(words[0]).name.startswith("python") and Path(words[1]).name in ("accelerate", "torchrun"):
                words = [Path(words[1]).name, *words[2:]]  # the console script rather than the interpreter running it
    return shlex.join([*words, f"{run_dir}/config.yaml", f"run_dir={run_dir}", "resume_from=auto"])


def build_optimizer(config: Config, model: torch.nn.Module, n_updates: int):
    """`config.optimizer` over the model's trainable parameters and the lr schedule over the run's `n_updates` optimizer steps
    (training/schedule.py; stepped by hand, once per optimizer step)."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # a LoRA run: the adapters only
    optimizer = getattr(torch.optim, config.optimizer)(trainable, lr=config.lr)
    return optimizer, build_scheduler(optimizer, config, n_updates)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(int(seed))


def start_state(config: Config, accelerator, model, optimizer, scheduler, resume_dir: Path | None, run_dir: Path) -> TrainState:
    """A fresh state (RNGs seeded) or the one of `resume_dir` (model, optimizer, scheduler, counters and RNGs restored)."""
    if resume_dir is None:
        seed_everything(config.seed)
        return TrainState()
    wanted = schedule_of(scheduler).describe()
    state = resume(config, resume_dir, model, optimizer, scheduler, accelerator, run_dir)
    if scheduler.base_lrs[0] != config.lr:
        log.warning("lr=%g is ignored: the resumed optimizer and schedule keep the checkpoint's lr=%g", config.lr, scheduler.base_lrs[0])
    if schedule_of(scheduler).describe() != wanted:  # scheduler.pt carries the schedule it started (training/schedule.py)
        log.warning("lr schedule %s is ignored: the resumed run continues the checkpoint's (%s)", wanted,
                    schedule_of(scheduler).describe())
    return state


def eval_interval(config: Config) -> int:
    """eval_every rounded down to whole batches (at least one)."""
    return max(config.eval_every - config.eval_every % config.batch_size, config.batch_size)


def should_eval(config: Config, state: TrainState, interval: int) -> bool:
    """At each multiple of the interval (step 0 only with do_first_eval), never twice at the same point (resume)."""
    return state.examples_seen % interval == 0 and (state.examples_seen > 0 or config.do_first_eval) \
        and state.last_eval != state.examples_seen


def train(config: Config, accelerator, model, optimizer, scheduler, plans: Iterable, n_planned: int, state: TrainState,
          run_dir: Path, logger, *, train_step: Callable[[list[int]], dict], evaluate: Callable[[], dict],
          script: str) -> bool:
    """Eval (every eval_every examples), save step-N, train one batch; at the end a final eval and LATEST.

    `plans` are the remaining training batches (data/batches.py BatchPlan: epoch, offset, indices, examples_counted), of
    `n_planned` in the whole run. `script` (the entry script's name) starts the continue command printed after a stop.
    Returns False when a stop request ended the run early (LATEST saved), True when it finished.
    """
    interval = eval_interval(config)
    finished = config.n_examples is not None and state.examples_counted >= config.n_examples
    stop = StopRequested(config.max_updates_this_run, config.save_every_minutes)
    logger.start_progress(n_planned * config.batch_size, state.examples_seen)
    reported = False
    for plan in [] if finished else plans:
        if should_eval(config, state, interval):
            run_eval(evaluate, state, logger)
            if state.examples_seen > 0 and not config.debug:
                save(config, accelerator, model, optimizer, scheduler, state, run_dir, f"step-{state.examples_seen}")
                stop.saved()
        metrics = train_step(plan.indices)
        if config.compile:
            metrics.update(compile_metrics())  # flat after the first steps and evals
            if not reported:
                log.info(compile_report())  # once, when the first step's graphs exist
                reported = True
        state.examples_seen += config.batch_size
        state.updates += 1
        state.epoch, state.offset, state.examples_counted = plan.epoch, plan.offset + config.batch_size, plan.examples_counted
        logger.log({**metrics, "counters/examples": state.examples_seen, "counters/updates": state.updates}, state.examples_seen)
        logger.advance(state.examples_seen)
        stop_now, save_now = stop.after_update(accelerator)
        if state.updates == n_planned:
            continue  # the last update: finish normally (final eval, LATEST, export) whatever was asked
        if stop_now:
            save(config, accelerator, model, optimizer, scheduler, state, run_dir, "LATEST")
            logger.close()
            if accelerator.is_main_process:
                ckpt.writer.wait()
                last_line(f"stopped at {state.examples_seen} examples; continue with: {continue_command(script, run_dir)}",
                          "stopped")
            return False
        if save_now and not (should_eval(config, state, interval) and not config.debug):  # else step-N comes next anyway
            save(config, accelerator, model, optimizer, scheduler, state, run_dir, "LATEST")
            stop.saved()
    if state.updates == 0 and not finished:
        raise ValueError(f"no training batch: batch_size={config.batch_size} is more than the training examples")
    if state.last_eval != state.examples_seen:
        run_eval(evaluate, state, logger)
    save(config, accelerator, model, optimizer, scheduler, state, run_dir, "LATEST")
    logger.close()
    if accelerator.is_main_process:
        ckpt.writer.wait()  # the other processes may already be gone: nothing collective follows
    return True


def run_eval(evaluate: Callable[[], dict], state: TrainState, logger) -> dict:
    metrics = evaluate()
    state.last_eval, state.eval_metrics = state.examples_seen, metrics
    logger.log(metrics, state.examples_seen, force=True)
    return metrics


def micro_batch_plan(config: Config, world: int, lengths: list[int],
                     cost: Callable[[list[int]], int]) -> list[list[list[int]]]:
    """plan[r][m]: the global-batch indices (ascending) of process r's micro-batch m, for a batch of examples of these
    lengths. Fixed (max_tokens_per_micro_batch null): gradient_accumulation_steps micro-batches of M = len / GA examples,
    process r holding [m * M + r * L, m * M + (r + 1) * L) of micro-batch m, L = M / world. Else token_budget_micro_batches
    with `cost(indices)`, the positions of the tensor a micro-batch of these examples collates to."""
    if config.max_tokens_per_micro_batch is not None:
        return token_budget_micro_batches(lengths, world, config.max_tokens_per_micro_batch, cost=cost)
    ga = config.gradient_accumulation_steps
    micro = len(lengths) // ga
    local = micro // world
    return [[list(range(m * micro + r * local, m * micro + (r + 1) * local)) for m in range(ga)] for r in range(world)]


def token_budget_micro_batches(lengths: list[int], world: int, max_tokens: int,
                               positions: Callable[[list[int]], int] = sum, *,
                               cost: Callable[[list[int]], int] | None = None) -> list[list[list[int]]]:
    """A global batch split into micro-batches by a token budget: plan[r][m] lists the global-batch indices (ascending)
    of process r's micro-batch m. `positions(lengths)` is the size of the tensor a micro-batch of examples of these
    lengths collates to (data/packing.py Collate.positions: the sum for a flat packed row, rows x width when padded);
    `cost(indices)`, when given, is that size for the examples at these indices instead (a DPO pair collates to two rows).

    A function of the batch's lengths alone, so every process computes the same plan without communicating. Each process
    gets len / world examples (equal shares: the results are gathered), dealt longest first in a snake order so the
    shares hold about as many tokens; each share is filled first-fit, longest first, into micro-batches of at most
    `max_tokens` positions (an example longer than that alone makes one of its own); then every process splits its
    fullest micro-batches until all have as many as the process with the most, since FSDP's collectives need the same
    number of forwards everywhere. The loss is unchanged: its denominator is the whole step's (modeling/loss.py).
    """
    if len(lengths) % world:
        raise ValueError(f"{len(lengths)} examples cannot be shared equally by {world} processes")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    shares: list[list[int]] = [[] for _ in range(world)]
    for k, i in enumerate(order):
        turn, slot = divmod(k, world)
        shares[slot if turn % 2 == 0 else world - 1 - slot].append(i)
    if cost is None:
        def cost(indices: list[int]) -> int:
            return positions([lengths[j] for j in indices])
    plan = []
    for share in shares:  # longest first already
        micros: list[list[int]] = []
        for i in share:
            fit = next((m for m in micros if cost(m + [i]) <= max_tokens), None)
            if fit is None:
                micros.append([i])
            else:
                fit.append(i)
        plan.append(micros)
    n_micro = max(len(micros) for micros in plan)
    for micros in plan:
        while len(micros) < n_micro:  # a share has at least n_micro examples, so one micro-batch has two or more
            fullest = max((m for m in micros if len(m) > 1), key=cost)
            micros.remove(fullest)
            micros += [fullest[0::2], fullest[1::2]]  # longest first: alternate members keep the halves alike
    return [sorted((sorted(m) for m in micros), key=lambda m: m[0]) for micros in plan]


def plan_gather_order(plan: list[list[list[int]]]) -> list[int]:
    """Global-batch index of each row of per-process results concatenated over micro-batches, then gathered over processes."""
    return [i for micros in plan for micro in micros for i in micro]


def no_sync_unless_last(accelerator, model, m: int, n_micro: int):
    """DDP: gradient synchronisation only on the step's last micro-batch. FSDP: every micro-batch reduce-scatters.

    Under FSDP2, skipping the reduction keeps each process's full-size unsharded gradients until the last micro-batch,
    accumulated in the reduce dtype (for 7B in bf16: 13.5 GB more per GPU, and a bf16 sum). Reducing every micro-batch
    accumulates sharded gradients in the master weights' dtype instead (fp32 by default), as the reference's FSDP did;
    it costs one reduce-scatter per micro-batch, which overlaps with the backward.
    """
    if m == n_micro - 1 or parallel_mode(accelerator) == "fsdp":
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def raise_if_not_finite(values: torch.Tensor, batch_ids: list, order: list[int], state: TrainState, run_dir: Path,
                        what: str = "loss") -> None:
    """Stop with the culprit examples and the last good checkpoint when a value is NaN or inf. values[k] belongs to the
    batch's example order[k] (see plan_gather_order); batch_ids are the batch's example ids."""
    finite = torch.isfinite(values)
    if finite.all():
        return
    bad = [batch_ids[i] for i, ok in zip(order, finite.tolist()) if not ok]
    last = ckpt.last_good_checkpoint(run_dir)
    raise FloatingPointError(
        f"non-finite {what} at update {state.updates + 1} ({state.examples_seen} examples seen) in examples {bad} of the batch "
        f"{batch_ids}; last good checkpoint: {last or 'none'}"
    )


def optimizer_step(config: Config, accelerator, model, optimizer, scheduler) -> float:
    """Clip (returning the norm before clipping), step the optimizer and the schedule, clear the gradients."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def save(config, accelerator, model, optimizer, scheduler, state, run_dir, name) -> None:
    """Write checkpoint `name`. FSDP/TP: every process writes its shards of the resume state, then the full policy.pt is
    gathered to the main process, which writes it in the background while the others go on (no collective waits for it).
    Otherwise the main process writes policy.pt and the full optimizer.pt itself."""
    main = accelerator.is_main_process
    if main:
        ckpt.writer.wait()  # the previous checkpoint's write: one gathered copy of the weights at a time
    if is_sharded := sharded(accelerator):
        if main:
            ckpt.start_checkpoint(run_dir, name)  # before any process writes: save_sharded's first step is collective
        try:
            save_sharded(model, optimizer, ckpt.tmp_dir(run_dir, name) / ckpt.RESUME_DIR)
        except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
            failure = ckpt.write_failure(run_dir, name, f"the sharded resume state in {ckpt.tmp_dir(run_dir, name) / ckpt.RESUME_DIR}",
                                         e, clean=main)  # every process gets every process's failures
            if failure is None:
                raise
            # Every process is here (the failures were gathered): none leaves before the main process removed the partial
            # directory, as a launcher stops the others as soon as one exits.
            accelerator.wait_for_everyone()
            raise failure from e
    policy_state = full_model_state(accelerator, model)  # collective under FSDP/TP; {} except on the main process
    optimizer_state = full_optimizer_state(accelerator, model, optimizer) if not is_sharded or config.save_full_optimizer else None
    rng = gather_object([ckpt.rng_state()])  # one per process: ranks sample different prompts, so their generators differ
    if not main:
        return
    weights = checkpoint_weights(model, policy_state, config.lora.enabled)  # LoRA: policy.pt merged, plus adapter.pt
    train_state = ckpt.plain({**asdict(state), "rng": rng, "logs": ckpt.log_sizes(run_dir)})
    args = (config, run_dir, name, state.examples_seen, weights, optimizer_state, copy.deepcopy(scheduler.state_dict()),
            train_state, state.eval_metrics or {}, is_sharded)
    if is_sharded:
        ckpt.writer.submit(write_and_prune, *detached(args, model, optimizer))
    else:
        write_and_prune(*args)


def write_and_prune(config, run_dir, name, step_idx, weights, optimizer_state, scheduler_state, train_state, metrics,
                    started) -> None:
    """`weights`: {"policy.pt": state} and, for a LoRA run, {"adapter.pt": state} (training/adapters.py)."""
    extra = {k: v for k, v in weights.items() if k != "policy.pt"}
    ckpt.write_checkpoint(run_dir, name, step_idx, weights["policy.pt"], optimizer_state, scheduler_state, train_state, metrics,
                          started, extra)
    if name.startswith("step-"):
        ckpt.prune(run_dir, config.keep_last)


def resume(config: Config, path: Path, model, optimizer, scheduler, accelerator, run_dir: Path) -> TrainState:
    """Model, optimizer, scheduler, counters, data position and RNG of a checkpoint; in its own run_dir the logs are cut back
    to the checkpoint (see training/checkpoint.py), so the steps trained again are not logged twice."""
    if ckpt.is_sharded(path):  # any number of processes, any mode (a LoRA run's shards hold base and adapters)
        load_sharded(model, optimizer, path / ckpt.RESUME_DIR)
    else:
        # LoRA: the frozen base is the one loaded at start, and policy.pt holds it merged, so only the adapters are loaded.
        weights = path / "adapter.pt" if config.lora.enabled else path / "policy.pt"
        load_full_state(accelerator, model, optimizer, weights, path / "optimizer.pt", partial=config.lora.enabled)
    scheduler.load_state_dict(ckpt.load_archive(path / "scheduler.pt")["state"])
    saved = ckpt.load_train_state(path / "train_state.pt")
    ckpt.set_rng_state(saved.pop("rng"), accelerator.process_index)
    logs = saved.pop("logs", {})
    if accelerator.is_main_process and path.resolve().parent == Path(run_dir).resolve():
        ckpt.rewind_logs(run_dir, logs)
    state = TrainState(**saved)
    console.print(f"resumed from {path}: {state.examples_seen} examples seen, epoch {state.epoch}, offset {state.offset}")
    return state


def resume_point(config: Config, accelerator) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume (None for a fresh run) and the run settings it recorded, checked against this config's
    before any data or model is loaded (the data itself is compared once it is tokenized)."""
    if not config.resume_from:
        return None, None
    with accelerator.main_process_first():  # only the main process repairs a LATEST left between two renames by a crash
        resume_dir = ckpt.resolve_resume(config.resume_from, config.run_dir)
    saved_run = ckpt.load_train_state(resume_dir / "train_state.pt").get("run")
    check_resume(saved_run, run_signature(config), resume_dir, config.resume_force)
    return resume_dir, saved_run


def pick_run_dir(config: Config, accelerator, resume_dir: Path | None) -> Path:
    """Same directory on every process (the main one picks it)."""
    if config.run_dir is not None:
        run_dir = Path(config.run_dir)
    elif resume_dir is not None:
        run_dir = resume_dir.parent
    else:
        run_dir = default_run_dir(config)
    return Path(broadcast_object_list([str(run_dir)])[0]) if accelerator.num_processes > 1 else run_dir


@contextlib.contextmanager
def claimed_run_dir(config: Config, accelerator, run_dir: Path, resume_dir: Path | None):
    """run_dir locked for this run (main process) while the block runs; refused when it holds a run that this one does not
    resume (unless overwrite=true). A run that fails before logging anything leaves no trace there."""
    claim = on_main_process(accelerator, lambda: claim_run_dir(run_dir, resume_dir is not None, config.overwrite))
    failed = True
    try:
        yield
        failed = False
    finally:
        if claim is not None:
            claim.release(failed=failed)


def prepare_run_dir(config: Config, accelerator, run_dir: Path) -> None:
    """Crash leftovers put right and config.yaml written before training; the setup is described."""
    if accelerator.is_main_process:
        ckpt.recover(run_dir)
        save_config(config, run_dir / "config.yaml")
        console.print(describe_setup(config, accelerator, run_dir), soft_wrap=True, highlight=False)
    accelerator.wait_for_everyone()


def run_summary(state: TrainState, run_dir: Path, seconds: float, counted: str, policy: str) -> str:
    """The end of a run: what trained (`counted`: what examples_seen counts), the final eval, and where the outputs are
    (`policy`: what the stage's LATEST/policy.pt is for), their paths in one column."""
    metrics = state.eval_metrics or {}
    outputs = [(f"policy ({policy})", f"{run_dir}/LATEST/policy.pt")]
    if (run_dir / "hf").is_dir():
        outputs.append(("Hugging Face export", f"{run_dir}/hf"))
    plots = sorted(p.name for p in run_dir.glob("*.png"))
    if plots:
        outputs.append(("plots", ", ".join(str(run_dir / p) for p in plots)))
    width = max(len(label) for label, _ in outputs) + 1
    return "\n".join([f"[green]done[/green]: {state.examples_seen} {counted}, {state.updates} updates in "
                      f"{seconds / 60:.1f} min; final eval loss {metrics.get('loss/eval', float('nan')):.4f}",
                      *(f"  {label + ':':<{width}} {value}" for label, value in outputs)])


def start_wandb(config: Config, run_dir: Path, accelerator):
    if not (config.wandb.enabled and not config.debug and accelerator.is_main_process):
        return None
    import wandb

    # One wandb run per training run: its id lives in the run dir, and a resume into that dir continues the same wandb run.
    id_file = Path(run_dir) / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(entity=config.wandb.entity, project=config.wandb.project, name=config.exp_name,
                      config=asdict(config), dir=str(run_dir), id=run_id, resume="allow")


def generate_samples(config, accelerator, model, tokenizer, eval_data, eval_batches, collate_prompts) -> list[dict]:
    """Completions for the first n_eval_model_samples eval prompts; every process generates its share (FSDP needs all ranks).
    collate_prompts(examples, pad_id) left-pads their prompt_ids (data/batches.py)."""
    rank, world = data_parallel(accelerator)
    indices = [i for batch in eval_batches for i in batch][: config.n_eval_model_samples]
    share = math.ceil(len(indices) / world)
    mine = indices[rank * share:(rank + 1) * share] or indices[:1]  # every rank must call generate the same number of times
    examples = [eval_data[i] for i in mine]
    batch = {k: v.to(accelerator.device) for k, v in collate_prompts(examples, tokenizer.pad_token_id).items()}
    width = batch["input_ids"].shape[1]
    limits = {"max_new_tokens": config.max_new_tokens} if config.max_new_tokens else {"max_length": max(config.max_length, width + 1)}
    with eager(config):  # compile=true: per-token shapes and the cache would only fill the compile cache
        out = accelerator.unwrap_model(model).generate(
            **batch, do_sample=not config.sample_greedy, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            **limits, synced_gpus=synced_generate(accelerator),  # FSDP/TP: every process runs each forward until all are done
        )
    rows = [
        {"prompt": tokenizer.decode(e["prompt_ids"]), "sample": tokenizer.decode(o[width:], skip_special_tokens=True),
         "example_id": e["example_id"]}
        for e, o in zip(examples, out)
    ]
    rows = gather_object(rows if rank * share < len(indices) else [])
    return rows[: len(indices)]


class Start(NamedTuple):
    """What start_run checked and found: the config, the accelerator, the normalized data_files, the checkpoint to resume
    (None: a fresh run) and the run settings it recorded, the run directory."""

    config: Config
    accelerator: Any
    data_files: dict
    resume_dir: Path | None
    saved_run: dict | None
    run_dir: Path


def start_run(args: list[str], losses: tuple[str, ...], usage: str, build_accelerator) -> Start | None:
    """What a training script checks before any tokenizer, data or model is loaded: the config and its ranges, that its stage
    trains the configured loss (one of `losses`), the model's config.json, the parallel setup, the checkpoint to resume and the
    run directory. A null model.attn_implementation is picked here, where the device and the parallel mode are known
    (training/attention.py). None when `--help` was asked for (printed here)."""
    from training.attention import resolve_attention
    from training.checks import check_stage, normalize_data_files, validate
    from training.cli import config_help, help_requested
    from training.config import load_config
    from training.distributed import check_setup, raise_open_file_limit, set_matmul_precision
    from training.logger import check_wandb_credentials
    from training.model_source import check_architecture, check_model_source

    wants_help, section = help_requested(args)
    if wants_help:
        print(config_help(Config, section, usage=usage.strip()))
        return None
    config = load_config(args)
    check_wandb_credentials(config)
    accelerator = build_accelerator(config)
    if config.model.archive is not None:  # a run or checkpoint directory stands for its policy.pt
        config.model.archive, note = ckpt.resolve_archive(config.model.archive)
        if note and accelerator.is_main_process:
            log.info(note)
    resolve_attention(config, accelerator.device.type, parallel_mode(accelerator) == "fsdp")
    validate(config, data_parallel(accelerator)[1])
    check_stage(config, losses)
    check_model_source(config)  # model directory or hub cache, max_length within the model's positions: config.json only
    check_architecture(config.model)  # a model_type this transformers knows as a causal LM (or the model's own code)
    check_setup(config, accelerator)  # FSDP block name, TP plan, device_map: fail before loading anything
    check_compile(config, accelerator.device, parallel_mode(accelerator))  # compile=true: inductor's toolchain is here
    for note in (raise_open_file_limit(accelerator), set_matmul_precision(config, accelerator.device)):
        if note:
            log.info(note)
    data_files = normalize_data_files(config.data_files, config.datasets, log.warning)
    resume_dir, saved_run = resume_point(config, accelerator)
    return Start(config, accelerator, data_files, resume_dir, saved_run, pick_run_dir(config, accelerator, resume_dir))
