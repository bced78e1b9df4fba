"""Every rule a config must pass before anything expensive happens: the valid values of each field and the cross-field rules.

    validate(config, num_processes)     # ranges (CHECKS), then the rules between fields; raises ConfigError naming the key
    check_stage(config, ("sft",))       # the running stage trains one of these losses

Each rule lives in one place: a single field's valid values in CHECKS (checked by check_ranges), a rule between fields in
validate, check_schedule or check_lora, the attention kernel with packing in training/attention.py check_attention.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.attention import check_attention
from training.config import MODEL_PRESETS, Config, ConfigError, LoraConfig, config_fields, dialect_value, suggest

LOSSES = ("sft", "dpo", "ipo")
PREFERENCE_LOSSES = ("dpo", "ipo")  # trained on (chosen, rejected) pairs
DATASET_SPLITS = ("train", "test")
DATASET_NAMES = ("hh", "shp", "se", "jsonl")  # the loaders of data/records.py, one per name
OWN_FILES_ONLY = ("jsonl",)  # datasets without a hub source: they need data_files for both splits
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("constant", "linear", "cosine")  # the factors of training/schedule.py
QUANTIZE = ("4bit",)


@dataclass(frozen=True)
class Range:
    """Numbers from `low` (exclusive when `strict`) to `high`; NaN always, and infinity unless `infinite_ok`, refused."""

    low: float | None = None
    high: float | None = None
    strict: bool = False
    infinite_ok: bool = False

    def problem(self, value: Any) -> str | None:
        kind = "an integer" if isinstance(value, int) else "a number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.strict else '>='} {number(self.low)}")
        if self.high is not None:
            bounds.append(f"<= {number(self.high)}")
        want = f"{kind} {' and '.join(bounds)}".strip()
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not self.infinite_ok)):
            return f"must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}, got {value!r}"
        if self.low is not None and (value <= self.low if self.strict else value < self.low):
            return f"must be {want}, got {value!r}"
        if self.high is not None and value > self.high:
            return f"must be {want}, got {value!r}"
        return None


def number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        if value not in self.values:
            return f"{value!r} is not one of {', '.join(self.values)}{suggest(str(value), self.values)}"
        return None


@dataclass(frozen=True)
class Text:
    """A non-empty string (`no_slash`: usable as one path component)."""

    no_slash: bool = False

    def problem(self, value: Any) -> str | None:
        if not value.strip():
            return "must not be empty"
        if self.no_slash and "/" in value:
            return f"must not contain '/' (it names a directory), got {value!r}"
        return None


@dataclass(frozen=True)
class Free:
    """Any value of the field's type; `why` says where it is checked instead (or why any value works)."""

    why: str

    def problem(self, value: Any) -> str | None:
        return None


POSITIVE = Range(1)
NON_NEGATIVE = Range(0)

# The valid values of every field, by dotted key; null passes where the type allows it. A new field needs an entry here
# (tests/test_cli.py checks that every field has one). Cross-field rules are in `validate`.
CHECKS: dict[str, Range | Choice | Text | Free] = {
    "exp_name": Text(no_slash=True),
    "seed": Range(0, 2**32 - 1),  # numpy seeds the data order with it
    "datasets": Free("names checked against the loaders in validate"),
    "data_files": Free("checked by normalize_data_files"),
    "dataset_weights": Free("checked in validate"),
    "model.name": Choice(tuple(MODEL_PRESETS)),
    "model.name_or_path": Free("a hub id or directory, checked by check_model_source before loading"),
    "model.tokenizer_name_or_path": Free("checked by check_model_source"),
    "model.block_name": Free("checked against the model's classes under FSDP"),
    "model.policy_dtype": Choice(DTYPES),
    "model.fsdp_policy_mp": Choice(DTYPES),
    "model.reference_dtype": Choice(DTYPES),
    "model.archive": Free("must be an existing file, checked in validate"),
    "model.random_init": Free("true or false"),
    "model.trust_remote_code": Free("true or false"),
    "model.device_map": Choice(("auto", "balanced", "balanced_low_0", "sequential")),
    "model.attn_implementation": Free("with packing: check_attention (training/attention.py); else transformers checks it"),
    "loss.name": Free("sft, dpo or ipo, checked with the other loss keys in validate"),
    "loss.beta": Free("a positive number, required for dpo and ipo (checked in validate)"),
    "loss.label_smoothing": Free("a number in [0, 0.5), checked with the other loss keys in validate"),
    "loss.reference_free": Free("true or false"),
    "loss.normalize": Choice(("example", "token")),
    "loss.supervised_logits_only": Free("true or false"),
    "loss.logits_chunk_tokens": POSITIVE,
    "batch_size": POSITIVE,
    "eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE,
    "max_tokens_per_micro_batch": POSITIVE,  # at least max_length, and not with gradient_accumulation_steps > 1 (validate)
    "lr": Range(0, strict=True),
    "optimizer": Free("a torch.optim class, checked in validate"),
    "warmup_steps": NON_NEGATIVE,
    "max_grad_norm": Range(0, strict=True, infinite_ok=True),  # inf: no clipping; a negative norm would flip the gradients
    "max_length": Range(2),  # at least one prompt or response token plus EOS; the model's positions bound it from above
    "max_prompt_length": NON_NEGATIVE,
    "n_epochs": POSITIVE,
    "n_examples": POSITIVE,
    "n_eval_examples": POSITIVE,
    "eval_every": POSITIVE,
    "do_first_eval": Free("true or false"),
    "sample_during_eval": Free("true or false"),
    "n_eval_model_samples": NON_NEGATIVE,
    "sample_greedy": Free("true or false"),
    "max_new_tokens": POSITIVE,
    "minimum_log_interval_secs": NON_NEGATIVE,
    "local_dirs": Free("the first writable entry is used; the last is created otherwise"),
    "run_dir": Free("checked for an earlier run and a lock when the run starts"),
    "resume_from": Free("checked in validate and when the run starts"),
    "keep_last": POSITIVE,
    "max_updates_this_run": POSITIVE,
    "debug": Free("true or false"),
    "activation_checkpointing": Free("true or false"),
    "compile": Free("true or false (needs model.block_name, checked in validate; the toolchain in check_setup)"),
    "export": Free("true or false"),
    "packing": Free("true or false"),
    "batching": Choice(("reference", "length_bucketed")),
    "length_bucket_window": POSITIVE,
    "tokenize_num_proc": POSITIVE,
    "data_num_proc": POSITIVE,
    "cache_node_local": Free("true, false, or null to detect it from the file system"),
    "save_full_optimizer": Free("true or false"),
    "allow_tf32": Free("true or false"),
    "save_every_minutes": Range(0, strict=True),
    "dist_timeout_minutes": Range(0, strict=True),
    "overwrite": Free("true or false"),
    "resume_force": Free("true or false"),
    "lora.enabled": Free("true or false"),
    "lora.r": Free("an integer >= 1 (checked with the other lora keys)"),
    "lora.alpha": Free("a positive number (checked with the other lora keys)"),
    "lora.dropout": Free("a number in [0, 1) (checked with the other lora keys)"),
    "lora.target_modules": Free("module names, or [all-linear]"),
    "lora.quantize": Free("4bit or null"),
    "reference_logps": Free("live or precompute (checked in validate)"),
    "lr_schedule": Choice(SCHEDULES),
    "min_lr_ratio": Free("a number in [0, 1] (checked with the schedule)"),
    "warmup_ratio": Free("a number in [0, 1) or null (checked with the schedule)"),
    "wandb.enabled": Free("true or false"),
    "wandb.entity": Free("any wandb entity"),
    "wandb.project": Text(),
}


def check_ranges(config: Config) -> None:
    """Every field against CHECKS (lists element-wise); the first bad value raises, naming its key."""
    for key in config_fields():
        check = CHECKS.get(key)
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part)
        if check is None or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            problem = check.problem(item)
            if problem:
                raise ConfigError(f"{key}: {problem}")


def normalize_data_files(data_files: dict[str, Any], datasets: list[str], warn: typing.Callable[[str], None]) -> dict[str, dict[str, list[str]]]:
    """`data_files` as {dataset: {split: [patterns]}}. A bare `data_files.hh=PATH` serves both splits (with a warning)."""
    out: dict[str, dict[str, list[str]]] = {}
    for name, spec in data_files.items():
        if name not in datasets:
            raise ConfigError(f"data_files.{name}: {name!r} is not in datasets={datasets}{suggest(name, datasets, 'data_files.')}")
        if isinstance(spec, (str, list)):
            if name != "se":  # se has one source split that the loader divides itself
                warn(f"data_files.{name} names no split: the same files serve as both train and test data")
            spec = {"train": spec, "test": spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"data_files.{name}: expected a path, a list of paths or {{train: ..., test: ...}}, got {spec!r}")
        for split, paths in spec.items():
            if split not in DATASET_SPLITS:
                raise ConfigError(f"data_files.{name}.{split}: unknown split{suggest(str(split), DATASET_SPLITS, f'data_files.{name}.')}; use train or test")
            if isinstance(paths, str):
                paths = [paths]
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or not paths:
                raise ConfigError(f"data_files.{name}.{split}: expected a path or a list of paths, got {paths!r}")
        out[name] = {split: ([p] if isinstance(p, str) else list(p)) for split, p in spec.items()}
    return out


def no_files_message(name: str, split: str) -> str:
    """A dataset without a hub source (jsonl: your own rows) named without local files for `split`."""
    return (f"datasets=[{name}] reads your own files and none are given for the {split} split: set "
            f"data_files.{name}.train=PATH and data_files.{name}.test=PATH (or data_files.{name}=PATH for both)")


def validate(config: Config, num_processes: int = 1) -> None:
    """Cross-field checks, run before any model or data is loaded."""
    if not config.exp_name:
        raise ConfigError("exp_name is required (e.g. exp_name=my_run)")
    check_ranges(config)
    m = config.model
    if m.name == "blank_model" and not m.name_or_path:
        raise ConfigError("model.name_or_path is required with model=blank_model (a hub id or a local model directory)")
    if m.archive is not None and not Path(m.archive).is_file():
        raise ConfigError(f"model.archive: file not found: {m.archive}")
    if m.random_init and m.archive is None and m.name_or_path and not Path(m.name_or_path).is_dir():
        raise ConfigError(f"model.random_init needs model.name_or_path to be a local directory with config.json, got {m.name_or_path!r}")
    loss = config.loss
    if loss.name not in LOSSES:
        ours = dialect_value("loss.name", loss.name)
        if ours is not None:
            raise ConfigError(f"loss.name: {loss.name!r} is TRL's name for it: use loss.name={ours}")
        raise ConfigError(f"loss.name: {loss.name!r}{suggest(loss.name, LOSSES)} is not one of {', '.join(LOSSES)}")
    if loss.name in PREFERENCE_LOSSES:
        if loss.beta is None:
            raise ConfigError(f"loss.beta is required with loss.name={loss.name} (e.g. loss.beta=0.1)")
        if not loss.beta > 0:
            raise ConfigError(f"loss.beta must be positive, got {loss.beta}")
    if not 0 <= loss.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {loss.label_smoothing}")
    if loss.name != "dpo" and (loss.label_smoothing or loss.reference_free):
        key = "loss.label_smoothing" if loss.label_smoothing else "loss.reference_free"
        raise ConfigError(f"{key} applies to loss.name=dpo only, not {loss.name}")
    if config.reference_logps not in ("live", "precompute"):
        raise ConfigError(f"reference_logps: {config.reference_logps!r} must be `live` or `precompute`")
    check_attention(config.packing, m.attn_implementation)
    if not config.datasets:
        raise ConfigError("datasets: give at least one dataset")
    for name in config.datasets:
        if name not in DATASET_NAMES:
            raise ConfigError(f"datasets: unknown dataset {name!r}{suggest(name, DATASET_NAMES)}; choose from {', '.join(DATASET_NAMES)}")
    if config.max_prompt_length > config.max_length:
        raise ConfigError(f"max_prompt_length ({config.max_prompt_length}) must not exceed max_length ({config.max_length})")
    if config.eval_every < config.batch_size:
        raise ConfigError(f"eval_every ({config.eval_every}) is counted in examples and must be at least one batch "
                          f"(batch_size={config.batch_size}); an eval and a checkpoint every update is eval_every={config.batch_size}")
    if config.n_examples is not None and config.n_examples < config.batch_size:
        raise ConfigError(f"n_examples ({config.n_examples}) is less than one batch (batch_size={config.batch_size}): nothing would train")
    if config.n_eval_examples < config.eval_batch_size:
        raise ConfigError(f"n_eval_examples ({config.n_eval_examples}) is less than one eval batch "
                          f"(eval_batch_size={config.eval_batch_size}): the eval would score nothing")
    check_schedule(config)
    check_lora(config.lora)
    if config.compile and not m.block_name:
        raise ConfigError("compile=true compiles each transformer block: set model.block_name (e.g. LlamaDecoderLayer)")
    if config.n_epochs is None and config.n_examples is None:
        raise ConfigError("set n_epochs or n_examples (training stops at whichever comes first)")
    check_micro_batches(config)
    step = config.gradient_accumulation_steps * num_processes
    if config.batch_size % step:
        raise ConfigError(
            f"batch_size ({config.batch_size}) must be divisible by gradient_accumulation_steps x processes "
            f"({config.gradient_accumulation_steps} x {num_processes} = {step})"
        )
    if config.eval_batch_size % num_processes:
        raise ConfigError(f"eval_batch_size ({config.eval_batch_size}) must be divisible by the number of processes ({num_processes})")
    if not hasattr(__import__("torch").optim, config.optimizer):
        import torch.optim

        names = [n for n in dir(torch.optim) if n[0].isupper() and isinstance(getattr(torch.optim, n), type)]
        raise ConfigError(f"optimizer: torch.optim has no {config.optimizer!r}{suggest(config.optimizer, names)}")
    if config.resume_from not in (None, "auto") and not Path(config.resume_from).is_dir():
        raise ConfigError(f"resume_from: checkpoint directory not found: {config.resume_from}")
    if config.resume_from == "auto" and config.run_dir is None:
        raise ConfigError("resume_from=auto needs run_dir=PATH (the run to continue)")
    files = normalize_data_files(config.data_files, config.datasets, lambda msg: None)
    for name in config.datasets:
        for split in DATASET_SPLITS:  # both are read: the eval set is the test split's
            if name in OWN_FILES_ONLY and split not in files.get(name, {}):
                raise ConfigError(no_files_message(name, split))
    for name, weight in config.dataset_weights.items():
        if name not in config.datasets:
            raise ConfigError(f"dataset_weights.{name}: {name!r} is not in datasets={config.datasets}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ConfigError(f"dataset_weights.{name}: expected a non-negative number, got {weight!r}")


def check_micro_batches(config: Config) -> None:
    """A token budget sizes the micro-batches itself: every example must fit one alone, and no fixed count goes with it."""
    budget = config.max_tokens_per_micro_batch
    if budget is None:
        return
    if config.gradient_accumulation_steps > 1:
        raise ConfigError(f"max_tokens_per_micro_batch={budget} sizes the micro-batches itself: drop gradient_accumulation_steps="
                          f"{config.gradient_accumulation_steps} (or set max_tokens_per_micro_batch=null for fixed micro-batches)")
    if budget < config.max_length:
        raise ConfigError(f"max_tokens_per_micro_batch ({budget}) is less than max_length ({config.max_length}): an example "
                          f"must fit a micro-batch alone; use max_tokens_per_micro_batch={config.max_length} or more")


def check_stage(config: Config, losses: tuple[str, ...]) -> None:
    """The running stage trains one of `losses` (its script passes them: SFT ("sft",), DPO PREFERENCE_LOSSES); preference
    pairs are batched as the reference batches them."""
    if config.loss.name not in losses:
        raise ConfigError(f"loss.name={config.loss.name} is trained by the other stage; this one trains "
                          f"loss.name={' or '.join(losses)} (`--help loss.name` says which script trains which)")
    if config.loss.name in PREFERENCE_LOSSES and config.batching != "reference":
        raise ConfigError(f"batching={config.batching} is for SFT examples; preference pairs use batching=reference")


def check_schedule(config: Config) -> None:
    """The schedule's fractions and its need for the run's length (lr, lr_schedule and warmup_steps are in CHECKS)."""
    if config.warmup_ratio is not None and not 0 <= config.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1) or null, got {config.warmup_ratio}")
    if not 0 <= config.min_lr_ratio <= 1:
        raise ConfigError(f"min_lr_ratio must be in [0, 1], got {config.min_lr_ratio}")
    if (config.lr_schedule != "constant" or config.warmup_ratio is not None) and config.n_epochs is None and config.n_examples is None:
        what = f"lr_schedule={config.lr_schedule}" if config.lr_schedule != "constant" else "warmup_ratio"
        raise ConfigError(f"{what} needs the run's length: set n_epochs or n_examples")


def check_lora(lora: LoraConfig) -> None:
    if lora.r < 1:
        raise ConfigError(f"lora.r must be at least 1, got {lora.r}")
    if not lora.alpha > 0:
        raise ConfigError(f"lora.alpha must be positive, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules or not all(lora.target_modules):
        raise ConfigError(f"lora.target_modules: give module names or [all-linear], got {lora.target_modules}")
    if lora.quantize is not None and lora.quantize not in QUANTIZE:
        raise ConfigError(f"lora.quantize: {lora.quantize!r} is not one of {', '.join(QUANTIZE)} or null")
    if lora.quantize is not None and not lora.enabled:
        raise ConfigError("lora.quantize=4bit quantizes the frozen base of a LoRA run: set lora.enabled=true")
