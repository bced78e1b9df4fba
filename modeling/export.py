"""A checkpoint as a Hugging Face model directory, or as a policy.pt for DPO code pinned to transformers 4.29.

    python -m modeling.export runs/my_run/LATEST --out runs/my_run/hf
    python -m modeling.export runs/my_run/step-20000 --out exports/step-20000 --max-shard-size 2GB
    python -m modeling.export runs/my_run/LATEST --policy-keys transformers-4.29 --out policy_429.pt

A LoRA run's export also holds `adapter/` (the adapter alone, for `PeftModel.from_pretrained(base, DIR/adapter)`); the
directory itself is the merged model. The HF directory loads with `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` and holds
safetensors shards, config.json (use_cache on), generation_config.json whose EOS and pad are the ones training used, the
tokenizer, the run's resolved `config.yaml` and a README.md model card. Everything is rebuilt from the checkpoint's
`policy.pt` and the run's `config.yaml` (the checkpoint's parent directory); the weights are never gathered again.
At the end of training, `finish_run` (main process) exports LATEST to `{run_dir}/hf`; the training script then draws the plots.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml

from modeling.load import disable_dropout, load_tokenizer, model_from_config
from modeling.legacy_keys import to_transformers_429
from modeling.lora import write_adapter
from training import checkpoint as ckpt
from training.cli import run_main
from training.config import Config, ModelConfig, build_config

log = logging.getLogger(__name__)

HUB_DATASETS = {"hh": "Anthropic/hh-rlhf", "shp": "stanfordnlp/SHP", "se": "HuggingFaceH4/stack-exchange-preferences"}
LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors")
CARD_HYPERPARAMETERS = (
    "lr", "lr_schedule", "min_lr_ratio", "optimizer", "warmup_steps", "warmup_ratio", "batch_size", "gradient_accumulation_steps", "max_grad_norm", "max_length",
    "max_prompt_length", "n_epochs", "n_examples", "n_eval_examples", "seed",
)


def run_config(checkpoint_dir: str | Path) -> Config:
    """The resolved config of the run that wrote `checkpoint_dir`: `{checkpoint_dir}/../config.yaml`."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir}: no such checkpoint directory (e.g. RUN_DIR/LATEST or RUN_DIR/step-N)")
    found = [p.name for p in ckpt.complete_checkpoints(checkpoint_dir)]
    if not (checkpoint_dir / "policy.pt").is_file() and ((checkpoint_dir / "config.yaml").is_file() or found):
        raise FileNotFoundError(f"{checkpoint_dir} is a run directory; pass one of its checkpoints: {found or 'none found'}")
    path = checkpoint_dir.parent / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no run config at {path} (a checkpoint dir must sit inside its run dir)")
    with open(path) as f:
        return build_config(yaml.safe_load(f))


def load_policy(checkpoint_dir: str | Path) -> dict[str, Any]:
    """`{checkpoint_dir}/policy.pt` as {"step_idx", "state", "metrics"}."""
    return ckpt.load_archive(Path(checkpoint_dir) / "policy.pt")


def build_model(model_config: ModelConfig, state: dict[str, torch.Tensor], device: str = "cpu") -> transformers.PreTrainedModel:
    """The run's model class and config with `state` loaded strictly (as DPO loads `model.archive`).

    On device "meta" the model takes the state's tensors without allocating its own weights (export: nothing is copied,
    but non-persistent buffers stay unallocated, so it cannot run); on a real device it is an ordinary model.
    """
    model = model_from_config(model_config, device)
    model.load_state_dict(state, strict=True, assign=device == "meta")
    if device == "meta":
        model.tie_weights()  # assign=True replaced the tied parameters by two separate ones
    disable_dropout(model)
    return model.eval()


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path, max_shard_size: str = "5GB", command: str | None = None) -> Path:
    """Write the HF model directory for `checkpoint_dir` to `out_dir` (replaced atomically if it exists)."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    config = run_config(checkpoint_dir)
    archive = load_policy(checkpoint_dir)
    tokenizer = load_tokenizer(config.model)
    model = build_model(config.model, archive["state"], device="meta")
    model.config.use_cache = True  # training may have turned it off; generation wants it
    model.generation_config = generation_config(config.model, model, tokenizer)

    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted export
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    if (checkpoint_dir / "adapter.pt").is_file():  # a LoRA run: the adapter alone too, for PeftModel.from_pretrained
        write_adapter(tmp / "adapter", ckpt.load_archive(checkpoint_dir / "adapter.pt")["state"], config)
    shutil.copyfile(checkpoint_dir.parent / "config.yaml", tmp / "config.yaml")
    (tmp / "README.md").write_text(model_card(config, archive, checkpoint_dir, command), encoding="utf-8")
    tidy(tmp)
    ckpt.replace_dir(tmp, out_dir)
    log.info("exported %s to %s", checkpoint_dir, out_dir)
    return out_dir


def tidy(export_dir: Path) -> None:
    """Undo two side effects of saving: weights written 0600 (unreadable to the rest of a team) and load-time flags
    recorded in tokenizer_config.json (`local_files_only` would follow the directory to the Hub)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in export_dir.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
    path = export_dir / "tokenizer_config.json"
    if path.is_file():
        settings = json.loads(path.read_text(encoding="utf-8"))
        for key in ("is_local", "local_files_only"):
            settings.pop(key, None)
        path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def generation_config(model_config: ModelConfig, model: transformers.PreTrainedModel, tokenizer) -> transformers.GenerationConfig:
    """The base model's generation settings with EOS and pad set to the tokens training used (responses end in EOS)."""
    try:
        gen = transformers.GenerationConfig.from_pretrained(model_config.name_or_path)
    except OSError:  # no generation_config.json (e.g. a random_init config dir)
        gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    return gen


def export_policy_429(checkpoint_dir: str | Path, out_path: str | Path) -> Path:
    """`policy.pt` ({step_idx, state, metrics}) with the state in transformers 4.29's layout (see modeling/legacy_keys.py)."""
    checkpoint_dir, out_path = Path(checkpoint_dir), Path(out_path)
    if out_path.is_dir():
        out_path = out_path / "policy.pt"
    config = run_config(checkpoint_dir)
    archive = load_policy(checkpoint_dir)
    model_config = transformers.AutoConfig.from_pretrained(config.model.name_or_path,
                                                           trust_remote_code=config.model.trust_remote_code)
    state = to_transformers_429(archive["state"], model_config)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".tmp-{out_path.name}"
    ckpt.save_file({"step_idx": archive["step_idx"], "state": state, "metrics": archive["metrics"]}, tmp)
    os.replace(tmp, out_path)
    return out_path


def model_card(config: Config, archive: dict[str, Any], checkpoint_dir: Path, command: str | None = None) -> str:
    """README.md for the export: base model, data, hyperparameters, final eval metrics, versions and how to re-run."""
    m = config.model
    preference = config.loss.name != "sft"
    base = f"`{m.name_or_path}`" + (" (architecture only: trained from random initialisation)" if m.random_init else "")
    if m.archive:
        base += f", starting from the weights in `{m.archive}`"
    hub_base = [] if m.random_init or Path(m.name_or_path).exists() else [f"base_model: {m.name_or_path}"]
    sources = []
    for name in config.datasets:
        files = config.data_files.get(name)
        sources.append(f"- `{name}`: " + (f"local files {files}" if files else f"`{HUB_DATASETS.get(name, name)}` from the Hub"))
    hub_data = [HUB_DATASETS[n] for n in config.datasets if n in HUB_DATASETS and n not in config.data_files]
    metrics = archive["metrics"]
    results = [f"| `{k}` | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    hyper = [f"| `{k}` | {yaml.safe_dump(getattr(config, k)).splitlines()[0]} |" for k in CARD_HYPERPARAMETERS]
    hyper += [f"| `loss.normalize` | {config.loss.normalize} |", f"| `model.policy_dtype` | {m.policy_dtype} |"]
    versions = ", ".join(f"{lib} {library_version(lib)}" for lib in LIBRARIES)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [sft, dpo]", *hub_base]
    if hub_data:
        front.append("datasets: [" + ", ".join(hub_data) + "]")
    front.append("---")
    lines = [
        *front,
        "",
        f"# {config.exp_name}",
        "",
        *(["A causal language model fine-tuned with supervised fine-tuning (SFT) on the preferred answers of preference data:",
           "the first stage of DPO."] if not preference else
          [f"A causal language model trained with {config.loss.name.upper()} (beta {config.loss.beta}) on (chosen, rejected) "
           "pairs of preference data, from the SFT policy it started with."]),
        "Its input format is the one it was trained on: `\\n\\nHuman: {question}\\n\\nAssistant:`;",
        "it ends its answer with the EOS token.",
        "",
        f"- Base model: {base}",
        f"- Checkpoint: `{checkpoint_dir}` after {archive['step_idx']} training examples",
        f"- Final eval loss (`loss/eval`, {'mean preference loss per pair' if preference else 'mean summed NLL per example'}): "
        f"{fmt(metrics.get('loss/eval'))}",
        "",
        "## Data",
        "",
        *sources,
        "",
        "## Hyperparameters",
        "",
        "| key | value |",
        "|---|---|",
        *hyper,
        "",
        "The complete resolved configuration is in `config.yaml`.",
        "",
        "## Eval metrics at this checkpoint",
        "",
        *(["| metric | value |", "|---|---|", *results] if results else ["No eval was run before this checkpoint."]),
        "",
        "## How it was trained",
        "",
        "```",
        f"python {'dpo_train.py' if preference else 'sft_train.py'} config.yaml run_dir=NEW_RUN_DIR resume_from=null",
        "```",
        "",
        "re-runs the training from this directory's `config.yaml` (its paths are relative to the directory training ran in;",
        "the launcher, e.g. `accelerate launch --config_file ...`, sets the hardware and the number of processes)."
        + (f" The training script was started as `{command}`." if command else ""),
        f"Exported with {versions}.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        'ids = tokenizer("\\n\\nHuman: How do I boil an egg?\\n\\nAssistant:", return_tensors="pt", add_special_tokens=False)',
        "print(tokenizer.decode(model.generate(**ids, max_new_tokens=64)[0]))",
        "```",
        "",
        "or `python -m modeling.generate PATH --prompt \"How do I boil an egg?\"` from the training repository.",
        "",
    ]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "not evaluated"


def library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def finish_run(config: Config, run_dir: Path, command: str | None = None) -> None:
    """Main process, after LATEST is saved: export it to {run_dir}/hf (if config.export). `command`: the training command
    line for the model card (the script passes its own when it was started from the shell).

    The export reads LATEST/policy.pt, the state already gathered once for the checkpoint. A failed export raises (LATEST
    is complete either way and can be exported again with `python -m modeling.export`).
    """
    if not config.export:
        return
    try:
        export_hf(run_dir / "LATEST", run_dir / "hf", command=command)
    except Exception:
        log.error("the HF export failed; %s/LATEST is complete. Retry with: python -m modeling.export %s/LATEST --out %s/hf",
                  run_dir, run_dir, run_dir)
        raise


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m modeling.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory (RUN_DIR/LATEST or RUN_DIR/step-N) holding policy.pt")
    parser.add_argument("--out", required=True, help="output directory (HF export) or policy.pt path (--policy-keys)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB (default 5GB)")
    parser.add_argument("--policy-keys", choices=["transformers-4.29"],
                        help="instead of an HF directory, write a policy.pt whose state uses this transformers version's keys")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.policy_keys:
        out = export_policy_429(args.checkpoint, args.out)
    else:
        out = export_hf(args.checkpoint, args.out, max_shard_size=args.max_shard_size)
    print(out)
    return out


if __name__ == "__main__":
    run_main(main)
