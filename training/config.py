"""The one config tree of a training run.

Defaults live here and only here. A run's config is built in three layers, later ones winning:

    defaults (this file)  <-  recipe YAML  <-  dotted command-line overrides

    python sft_train.py recipes/pythia28_hh.yaml lr=1e-6 model.policy_dtype=bfloat16 datasets=[hh,shp]
    python sft_train.py model=pythia28 datasets=[hh] exp_name=x

`model` names a preset (`model=pythia28`, or `model: {name: pythia28, ...}` in YAML); the preset fills the model fields and any
explicit `model.*` key wins over it. Unknown keys and values of the wrong type are errors that name the key (and the closest valid
key of the whole tree). Keys of the transformers/TRL world are in DIALECT: accepted as this suite's key where they mean exactly
the same, else refused with what to use. The valid values and the cross-field rules are in training/checks.py (`validate`), the model's whereabouts in
training/model_source.py, the attention kernel in training/attention.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.errors import UserError

log = logging.getLogger("config")


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "blank_model"
    """Preset that fills the other fields: blank_model, gpt2-large, gpt2-xl, gptj, llama7b, pythia28, pythia69."""
    name_or_path: str | None = None
    """Hub id or local directory given to `AutoModelForCausalLM.from_pretrained`. Required for blank_model."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer hub id or directory; null means the same as name_or_path."""
    block_name: str | None = None
    """Class name of the transformer block (e.g. LlamaDecoderLayer): the unit FSDP wraps and activation checkpointing applies to."""
    policy_dtype: str = "float32"
    """dtype of the weights as loaded: master weights and optimizer state stay in it (float32, bfloat16, float16)."""
    fsdp_policy_mp: str | None = None
    """FSDP mixed-precision dtype for compute and gradient reduction (e.g. bfloat16); null keeps policy_dtype."""
    reference_dtype: str = "float16"
    """dtype of the DPO reference model (a frozen copy of the starting policy; fp16 halves its memory). Unused by SFT."""
    archive: str | None = None
    """A previous policy.pt whose `state` is loaded (strict) into the model before training."""
    random_init: bool = False
    """Build the model from its config.json with random weights instead of loading weights (tiny demo/test models)."""
    trust_remote_code: bool = False
    """Allow model code from the model's repository. Only set it for a repository you trust."""
    device_map: str | None = None
    """`balanced` spreads the layers of one process over all visible GPUs (single-process multi-GPU). Not with FSDP/DDP."""
    attn_implementation: str | None = None
    """transformers attention kernel (sdpa, eager, flash_attention_2, sdpa_packed, varlen_attn, flex_attention); null lets
    transformers choose, or with packing picks one for the device (training/attention.py)."""


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "blank_model": {"name_or_path": None, "block_name": None},
    "gpt2-large": {"name_or_path": "gpt2-large", "block_name": "GPT2Block"},
    "gpt2-xl": {"name_or_path": "gpt2-xl", "block_name": "GPT2Block"},
    "gptj": {"name_or_path": "EleutherAI/gpt-j-6b", "block_name": "GPTJBlock"},
    "llama7b": {"name_or_path": "huggyllama/llama-7b", "block_name": "LlamaDecoderLayer"},
    "pythia28": {"name_or_path": "EleutherAI/pythia-2.8b", "block_name": "GPTNeoXLayer"},
    "pythia69": {"name_or_path": "EleutherAI/pythia-6.9b", "block_name": "GPTNeoXLayer"},
}


@dataclass
class LossConfig:
    name: str = "sft"
    """Training objective: `sft` (sft_train.py), `dpo` or `ipo` (dpo_train.py)."""
    beta: float | None = None
    """dpo/ipo: the strength of the pull towards the reference model (the reference's typical 0.1 to 0.5). Required for them."""
    label_smoothing: float = 0.0
    """dpo: the assumed probability that a preference label is flipped (conservative DPO); 0 is plain DPO. In [0, 0.5)."""
    reference_free: bool = False
    """dpo: ignore the reference model (as if it gave every response equal probability)."""
    normalize: str = "example"
    """`example`: per-example summed NLL averaged over the step's examples (the reference; longer answers weigh more).
    `token`: summed NLL divided by the step's supervised-token count across all micro-batches and processes."""
    supervised_logits_only: bool = True
    """Apply the LM head and log-softmax only where the next token is supervised, in chunks recomputed in backward: same
    loss, far less memory than full-vocabulary logits. Models that transform logits after the head use full logits anyway."""
    logits_chunk_tokens: int = 1024
    """Positions per chunk of fp32 logits when supervised_logits_only is on (memory ~ this x vocab x 4 bytes, x ~3 in backward)."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters (peft LoRA) on a frozen base model instead of all weights. policy.pt still holds the full
    model (adapters merged: W + alpha / r * B A); the export adds the adapter alone in hf/adapter/."""
    r: int = 16
    """Adapter rank (>= 1)."""
    alpha: float = 32.0
    """Scale numerator (> 0): the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1). 0 keeps runs exactly reproducible across process counts."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (suffixes) that get adapters; `all-linear`: every linear layer except the LM head (for transformers
    causal LMs: all linear layers of the blocks)."""
    quantize: str | None = None
    """`4bit`: QLoRA, the frozen base in 4-bit NF4 (bitsandbytes, CUDA only); null keeps the base in policy_dtype."""


@dataclass
class WandbConfig:
    enabled: bool = True
    """Log to Weights & Biases (main process only). Off in debug mode."""
    entity: str | None = None
    """wandb entity (team or user); null uses your default."""
    project: str = "direct-preference-optimization"
    """wandb project."""


@dataclass
class Config:
    exp_name: str | None = None
    """Name of the run: part of the run directory name and the wandb run name. Required."""
    seed: int = 0
    """Seeds torch/numpy/random and the data order (seed 0 gives the reference order)."""
    datasets: list[str] = field(default_factory=lambda: ["hh"])
    """Datasets to train on, concatenated in this order: hh, shp, se, jsonl."""
    data_files: dict[str, Any] = field(default_factory=dict)
    """Local files per dataset and split instead of the hub: data_files.hh.train=PATH (a path, glob or list; gzip ok)."""
    dataset_weights: dict[str, float] = field(default_factory=dict)
    """Train-mixture weights per dataset (default 1): w keeps round(w * n) of its n examples, whole copies then a seeded sample."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model; `model=NAME` picks a preset."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters instead of full fine-tuning (off by default)."""

    batch_size: int = 4
    """Global batch in examples per optimizer step: all processes x all micro-batches."""
    eval_batch_size: int = 16
    """Global eval batch in examples."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; a micro-batch holds batch_size / (this x data-parallel processes) examples per process."""
    max_tokens_per_micro_batch: int | None = None
    """Positions (tokens + padding) per micro-batch per process: each process's share of the batch is split into as few
    micro-batches as fit, the same count on every process; null = gradient_accumulation_steps fixed micro-batches. At least
    max_length; with packing or padding alike."""
    lr: float = 5e-7
    """Peak learning rate, reached after warmup and then shaped by lr_schedule (the reference holds it constant). > 0."""
    lr_schedule: str = "constant"
    """After warmup: `constant` (the reference), `linear` or `cosine` decay to min_lr_ratio x lr over the run's optimizer
    steps, which n_examples / n_epochs and the data size fix (formulas in training/schedule.py)."""
    min_lr_ratio: float = 0.0
    """Where linear and cosine end, as a fraction of lr, in [0, 1]."""
    warmup_ratio: float | None = None
    """Warmup as a fraction in [0, 1) of the run's optimizer steps (rounded up); when set, it replaces warmup_steps."""
    optimizer: str = "RMSprop"
    """Any torch.optim class name, built with (params, lr=lr) and torch defaults."""
    warmup_steps: int = 150
    """Linear warmup length in optimizer steps (>= 0): update k (from 0) uses lr * min(1, (k + 1) / (warmup_steps + 1))."""
    max_grad_norm: float = 10.0
    """Gradient clipping threshold (the logged grad_norm is the norm before clipping)."""
    max_length: int = 512
    """Maximum tokens of prompt + response."""
    max_prompt_length: int = 256
    """Prompt tokens kept when prompt + response exceed max_length."""
    n_epochs: int | None = 1
    """Passes over the training data; training stops at n_epochs or n_examples, whichever comes first."""
    n_examples: int | None = None
    """Stop after this many training examples (counted as the reference does); null means no limit."""
    n_eval_examples: int = 256
    """Size of the fixed eval set: the first n_eval_examples of the shuffled test split."""
    eval_every: int = 20000
    """Evaluate (and save a step checkpoint) every this many examples; rounded down to a multiple of batch_size."""
    do_first_eval: bool = True
    """Evaluate before the first update."""
    sample_during_eval: bool = True
    """Generate completions for some eval prompts at each eval."""
    n_eval_model_samples: int = 16
    """Number of eval prompts to generate for."""
    sample_greedy: bool = False
    """Decode eval samples greedily instead of sampling (the reference samples); greedy makes samples comparable across evals."""
    max_new_tokens: int | None = None
    """Cap on generated tokens when sampling; null generates up to max_length in total, as the reference."""
    minimum_log_interval_secs: float = 1.0
    """Console and wandb log at most this often; metrics.jsonl gets every step."""

    local_dirs: list[str] = field(default_factory=lambda: ["/scr-ssd", "/scr", ".cache"])
    """Candidate roots for caches and runs: the first existing writable one is used, plus /<username>."""
    run_dir: str | None = None
    """Where this run writes; null makes {local_dir}/{user}/{exp_name}_{timestamp}."""
    resume_from: str | None = None
    """Checkpoint to resume: a step-N or LATEST dir, or `auto` for the newest complete checkpoint in run_dir."""
    keep_last: int | None = None
    """Keep only the newest this-many step-N checkpoints; null keeps all. At 7B each step-N takes about 27 GB (policy.pt,
    fp32) plus the sharded resume state (about 81 GB with AdamW under FSDP), so set it on long runs."""
    save_full_optimizer: bool = False
    """Under FSDP/TP also write the full optimizer.pt (the reference's layout; about 54 GB for 7B with AdamW, gathered on the
    main process). Resume never needs it: the sharded resume state holds the optimizer."""
    save_every_minutes: float | None = None
    """Also write LATEST when this many minutes passed since the last save, so a hard kill loses at most that much; null: off."""
    dist_timeout_minutes: float = 60.0
    """Time-out of the process group's collectives. Long enough for one process to wait while another writes a 7B
    checkpoint's largest single file on slow shared storage (27 GB at 15 MB/s is 30 min); a real hang is found after it."""
    max_updates_this_run: int | None = None
    """End this invocation after this many optimizer steps, saving LATEST as on SIGTERM; `resume_from=auto` continues (another
    this-many, as the saved config.yaml keeps the value). For clusters with job time limits; order and schedule are unchanged."""
    debug: bool = False
    """Debug mode: no wandb, no step-N checkpoints (LATEST is still written)."""
    allow_tf32: bool = True
    """float32 matmuls on Ampere or newer GPUs use TF32 tensor cores (10-bit mantissa inputs, float32 accumulation); false
    keeps full float32. Logged at start; no effect on bf16 compute or on CPU."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (non-reentrant); with FSDP."""
    compile: bool = False
    """torch.compile each model.block_name block and the supervised-only loss chunk, with dynamic shapes (no recompile per
    batch shape); graphs and graph breaks are logged once and as compile/* metrics. Needs model.block_name."""
    export: bool = True
    """At the end, also write a Hugging Face model directory to {run_dir}/hf."""
    packing: bool = False
    """Pack the micro-batch's examples (position_ids restart per example, attention kept within each); same loss, no padding.
    Unless model.attn_implementation is set, the run picks it for its device (training/attention.py): `sdpa_packed` on CPU
    (rows of max_length), `varlen_attn` on CUDA in bf16/fp16 and `flex_attention` in fp32 (one flattened row)."""
    batching: str = "reference"
    """Training batch order: `reference` (the reference's order) or `length_bucketed` (batches of similar-length examples drawn
    from the same per-epoch examples, shuffled by the seed: less padding when packing is off). Either is resumable."""
    length_bucket_window: int = 64
    """length_bucketed: batches per window of the epoch order that is sorted by length before it is cut into batches."""
    reference_logps: str = "live"
    """dpo/ipo: `live` runs the reference model next to the policy at every step (the reference's way); `precompute` scores
    the train and eval pairs with it once before training, caches the log-probs and frees it."""
    tokenize_num_proc: int | None = None
    """Processes for tokenization; null uses one, whose tokenizer backend already spreads each batch over every core (unless
    TOKENIZERS_PARALLELISM=false), so more processes pay off only where the backend's threads are off."""
    data_num_proc: int | None = None
    """Processes for building the canonical records (StackExchange's HTML cleaning); null uses one. Records are cached."""
    cache_node_local: bool | None = None
    """Whether the cache dir is on node-local disk (each node prepares data once) or on storage all nodes share (one process
    prepares it for all); null detects it from the file system type (nfs, lustre, gpfs, ... are shared)."""
    overwrite: bool = False
    """Start this run in a run_dir that already holds a run, deleting that run's checkpoints, logs and export. Never saved
    into config.yaml as true, so a saved config used as a recipe cannot overwrite its own run."""
    resume_force: bool = False
    """Resume even when batch_size, accumulation, seed, data, max_length or optimizer differ from the checkpoint's run
    (a warning names each difference). The data order and the counters then no longer mean what they did."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""


def load_config(args: list[str]) -> Config:
    """Build the config from `[recipe.yaml] [key=value | --key value ...]` command-line words.

    `model=NAME` on the command line replaces the recipe's whole model section (later `model.*` words still apply)."""
    from training.cli import normalize_args

    tree: dict[str, Any] = {}
    overrides: list[tuple[str, Any]] = []
    for i, arg in enumerate(normalize_args(args)):
        if "=" in arg:
            key, _, raw = arg.partition("=")
            overrides.append((key.strip(), parse_value(raw)))
        elif i == 0:
            tree = load_recipe(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: only the first argument may be a recipe file; others are key=value")
    return build_config(apply_overrides(tree, overrides))


def apply_overrides(tree: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """The recipe's tree with the command line's (dotted key, value) pairs applied: `model=...` first (it replaces the
    recipe's model section), then the others in order. A `datasets=` drops the recipe's data_files and dataset_weights of
    the datasets it no longer names (logged), so that own data on top of a recipe needs only its own files."""
    tree = apply_dialect(dict(tree))
    overrides = [translate(key, value) for key, value in overrides]
    for key, value in overrides:
        if key == "model":
            tree["model"] = value
    datasets = [value for key, value in overrides if key == "datasets"]
    if datasets:
        named = datasets[-1] if isinstance(datasets[-1], list) else [datasets[-1]]
        dropped = []
        for section in ("data_files", "dataset_weights"):
            if isinstance(tree.get(section), dict):
                kept = {name: v for name, v in tree[section].items() if name in named}
                dropped += [f"{section}.{name}" for name in tree[section] if name not in kept]
                tree[section] = kept
        if dropped:
            info(f"datasets=[{','.join(map(str, named))}] on the command line: the recipe's {', '.join(dropped)} "
                 "no longer apply and are dropped")
    for key, value in overrides:
        if key != "model":
            set_dotted(tree, key, value)
    return tree


def info(message: str) -> None:
    """A config note, logged by the launcher's main process only (the config is built before the Accelerator)."""
    from training.cli import is_main_process

    if is_main_process():
        log.info(message)


def load_recipe(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        hint = " (settings are key=value words)" if not path.endswith((".yaml", ".yml")) else ""
        raise ConfigError(f"recipe file not found: {path}{hint}")
    try:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of config keys")
    return tree


def parse_value(raw: str) -> Any:
    """A command-line value as YAML (`[hh,shp]` is a list, `null` is None); numbers like 1e-6 stay strings until coerced."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "model" and node is tree:
            child = model_section(child)  # `model: llama7b` or `model=path/to/dir`, then model.x=...
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def build_config(tree: dict[str, Any]) -> Config:
    tree = apply_dialect(dict(tree))
    model = tree.get("model")
    if isinstance(model, str):
        model = model_section(model)
    if model is not None and not isinstance(model, dict):
        raise ConfigError(f"model: expected a preset name, a hub id, a directory or a mapping of model keys, got {model!r}")
    model = dict(model or {})
    name = model.get("name", ModelConfig.name)
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model: unknown model {name!r}{suggest(str(name), MODEL_PRESETS)}; choose one of {', '.join(MODEL_PRESETS)}")
    tree["model"] = {**MODEL_PRESETS[name], **model}
    return from_dict(Config, tree, "")


def model_section(value: str) -> dict[str, Any]:
    """`model=pythia28` picks a preset; `model=org/name` or `model=path/to/dir` is a blank_model with that name_or_path."""
    if value in MODEL_PRESETS or not looks_like_model_source(value):
        return {"name": value}
    return {"name": "blank_model", "name_or_path": value}


def looks_like_model_source(value: str) -> bool:
    return "/" in value or os.path.isdir(value)


@dataclass(frozen=True)
class Alias:
    """A key of another world that means exactly this suite's `key`: its value is given to `key`, through `values` where
    the spellings differ (a value not in `values` is refused with `otherwise`)."""

    key: str
    values: dict[Any, Any] | None = None
    otherwise: str = ""


# Keys of the transformers Trainer / TRL / alignment-handbook world, and what they are here: an Alias where the meaning is
# the same and the value converts safely, else what to use instead (refused with `use ...`). TRL's max_length,
# max_prompt_length and gradient_accumulation_steps are this suite's own keys.
DIALECT: dict[str, Alias | str] = {
    "learning_rate": Alias("lr"),
    "num_train_epochs": Alias("n_epochs"),  # a whole number of passes; a fraction is refused by n_epochs' type
    "beta": Alias("loss.beta"),
    "label_smoothing": Alias("loss.label_smoothing"),
    "loss_type": Alias("loss.name", {"sigmoid": "dpo"}, otherwise=(
        "loss.name=dpo (TRL's sigmoid; loss.label_smoothing makes it conservative DPO) or loss.name=ipo (IPO on summed "
        "log-probs, as the DPO reference; TRL's ipo averages them per token)")),
    "precompute_ref_log_probs": Alias("reference_logps", {True: "precompute", False: "live"}),
    "use_peft": Alias("lora.enabled"),
    "lora_r": Alias("lora.r"),
    "lora_alpha": Alias("lora.alpha"),
    "lora_dropout": Alias("lora.dropout"),
    "lora_target_modules": Alias("lora.target_modules"),
    "ref_model": ("model.archive: the reference model is the starting policy itself (model.name_or_path with model.archive "
                  "loaded), frozen in model.reference_dtype"),
    "config": ("the recipe file as the first argument, before the key=value words: python sft_train.py RECIPE.yaml key=value "
               "(dpo_train.py the same)"),
    "config_file": ("it with the launcher (accelerate launch --config_file FILE sft_train.py RECIPE.yaml ...); the recipe is "
                    "the script's first argument"),
    "per_device_train_batch_size": "batch_size, the global batch (per-device batch x processes x gradient_accumulation_steps)",
    "per_device_eval_batch_size": "eval_batch_size, the global eval batch (per-device batch x processes)",
    "train_batch_size": "batch_size (the global batch)",
    "model_name_or_path": "model.name_or_path (or model=ID_OR_DIR)",
    "tokenizer_name_or_path": "model.tokenizer_name_or_path",
    "output_dir": "run_dir",
    "run_name": "exp_name",
    "max_seq_length": "max_length",
    "bf16": "model.policy_dtype=bfloat16 (weights and optimizer state) or model.fsdp_policy_mp=bfloat16 (FSDP compute)",
    "fp16": "model.policy_dtype=float16 or model.fsdp_policy_mp=float16",
    "torch_dtype": "model.policy_dtype",
    "gradient_checkpointing": "activation_checkpointing",
    "max_steps": "n_examples (counted in examples: updates x batch_size)",
    "eval_steps": "eval_every (counted in examples)",
    "save_steps": "eval_every (a step-N checkpoint is saved at every eval)",
    "save_total_limit": "keep_last",
    "logging_steps": "minimum_log_interval_secs (metrics.jsonl gets every step)",
    "resume_from_checkpoint": "resume_from",
    "dataset_name": "datasets",
    "dataset_mixer": "datasets and dataset_weights",
    "report_to": "wandb.enabled",
    "optim": "optimizer (a torch.optim class name, e.g. AdamW)",
    "seed_everything": "seed",
    "overwrite_output_dir": "overwrite",
    "attn_implementation": "model.attn_implementation",
    "trust_remote_code": "model.trust_remote_code",
}


def apply_dialect(tree: dict[str, Any]) -> dict[str, Any]:
    """Top-level DIALECT aliases of a recipe tree moved to this suite's keys; the other DIALECT keys are refused by from_dict."""
    for name in [k for k in tree if isinstance(DIALECT.get(k), Alias)]:
        key, value = translate(name, tree.pop(name))
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"{name} and {key} are the same key here: give only {key}")
        set_dotted(tree, key, value)
    return tree


def translate(name: str, value: Any) -> tuple[str, Any]:
    """(this suite's key, value) of a key=value word: a DIALECT alias becomes its key (logged), any other key stays."""
    alias = DIALECT.get(name)
    if not isinstance(alias, Alias):
        return name, value
    if alias.values is not None:
        if not isinstance(value, typing.Hashable) or value not in alias.values:
            raise ConfigError(f"{name}={yaml_word(value)}: use {alias.otherwise or alias.key}")
        value = alias.values[value]
    cls: Any = Config
    *sections, leaf = alias.key.split(".")
    for part in sections:
        cls = typing.get_type_hints(cls)[part]
    value = coerce(value, typing.get_type_hints(cls)[leaf], f"{name} ({alias.key} here)")
    info(f"{name} read as {alias.key}={yaml_word(value)}")
    return alias.key, value


def yaml_word(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def dialect_value(key: str, value: Any) -> str | None:
    """This suite's spelling of `value` for `key` where another world's alias of `key` spells it `value` (sigmoid -> dpo)."""
    for alias in DIALECT.values():
        if isinstance(alias, Alias) and alias.key == key and alias.values and isinstance(value, typing.Hashable) \
                and value in alias.values:
            return str(alias.values[value])
    return None


def from_dict(cls: type, tree: dict[str, Any], prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in tree.items():
        if key not in fields:
            if str(key) in DIALECT and not prefix:
                raise ConfigError(f"unknown config key {key!r}: use {DIALECT[key]}")
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{suggest_key(prefix + str(key), isinstance(value, dict))}")
        values[key] = coerce(value, hints[key], prefix + key)
    return cls(**values)


def suggest_key(key: str, mapping: bool = False) -> str:
    """The closest key of the whole tree to an unknown dotted `key`: every leaf field (dotted), the sections when the value is
    a mapping, and the DIALECT aliases (suggested as the key they stand for). Compared with `_` and `.` alike."""
    candidates: dict[str, str] = {}
    if "." not in key:
        candidates.update({name: alias.key for name, alias in DIALECT.items() if isinstance(alias, Alias)})
    if mapping:
        candidates.update({name: name for name, hint in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(hint)})
    candidates.update({name: name for name in config_fields()})
    spelled = {name.replace(".", "_").lower(): shown for name, shown in candidates.items()}
    close = difflib.get_close_matches(key.replace(".", "_").lower(), spelled, n=1, cutoff=0.5)
    return f" (did you mean {spelled[close[0]]!r}?)" if close else ""


def suggest(key: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    valid = list(valid)
    same_case = [v for v in valid if v.lower() == key.lower()]
    close = same_case or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the field's type, converting only lossless spellings (1e-6 -> float, 3 -> 3.0)."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `datasets=hh` means [hh]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric exp_name
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """The resolved config, written atomically. `overwrite` is saved as false: used as a recipe, the file must not
    overwrite its own run."""
    tree = to_dict(config)
    tree["overwrite"] = False
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        yaml.safe_dump(tree, f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_fields(cls: type = Config, prefix: str = "") -> list[str]:
    """Dotted keys of every leaf field of the tree."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(config_fields(hints[f.name], prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def default_run_dir(config: Config) -> Path:
    """{first writable local_dir}/{user}/{exp_name}_{timestamp}, as the reference names runs."""
    import datetime
    import getpass

    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    return local_dir(config.local_dirs) / getpass.getuser() / f"{config.exp_name}_{stamp}"


def cache_dir(config: Config) -> Path:
    """{first writable local_dir}/{user}/cache: per user, as the reference kept it, so users of one machine never share it."""
    import getpass

    return local_dir(config.local_dirs) / getpass.getuser() / "cache"


def local_dir(local_dirs: list[str]) -> Path:
    for d in local_dirs:
        if os.path.isdir(d) and os.access(d, os.W_OK):
            return Path(d)
    # The reference falls back to the last entry and creates it (".cache" by default).
    return Path(local_dirs[-1] if local_dirs else ".cache")
