"""LoRA (and QLoRA) through peft: a frozen base model plus trainable low-rank adapters.

    model = add_adapters(load_model(...), config.lora)     # before accelerator.prepare; FSDP then wraps model.block_name
    write_adapter(directory, adapter, config)             # hf/adapter/: loads with PeftModel.from_pretrained(base, dir)

What a LoRA run's checkpoints hold (policy.pt with the adapters merged, adapter.pt for resume) is training/adapters.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from training.adapters import ADAPTER
from training.config import Config, ConfigError, LoraConfig

log = logging.getLogger(__name__)


def add_adapters(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """The model wrapped by peft with adapters on `lora.target_modules`; only the adapters require gradients.

    peft's initialisation (A random, B zero) draws from torch's generator, so equal seeds give equal adapters on every process.
    """
    import peft

    targets = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    settings = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                               bias="none", task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, settings)
    except ValueError as e:  # e.g. target modules not found in the base model
        raise ConfigError(f"lora.target_modules={lora.target_modules}: {e}") from e


def adapter_base(config: Config) -> tuple[str | None, str]:
    """(what adapter_config.json records as base_model_name_or_path, a sentence on the base) for the model training
    started from. model.name_or_path's own weights: that id or directory. model.archive (e.g. DPO from an SFT run):
    the archive run's HF export, when it was made from that archive (`{run}/hf`, whose card names the same step); else
    None, so AutoPeftModelForCausalLM refuses the directory instead of loading another base. Random weights
    (model.random_init without an archive): None, as no model directory holds them."""
    m = config.model
    if m.archive is None and not m.random_init:
        return m.name_or_path, f"Base: `{m.name_or_path}`."
    if m.archive is None:
        return None, (f"Base: the random weights that `{m.name_or_path}`'s config.json gave with seed {config.seed}; no model "
                      "directory holds them, so `base_model_name_or_path` is empty: use the merged model in the parent "
                      "directory, or `PeftModel.from_pretrained(base, PATH)` on a base built that way.")
    archive = Path(m.archive)
    export = archive.parent.parent / "hf"
    if (export / "config.json").is_file() and (export / "README.md").is_file():
        from training.checkpoint import load_archive

        step = load_archive(archive)["step_idx"]
        if f"{archive.parent.name}` after {step} training examples" in (export / "README.md").read_text(encoding="utf-8"):
            return str(export.resolve()), f"Base: `{export.resolve()}`, the export of `{m.archive}`."
    return None, (f"Base: `{m.name_or_path}` with the weights of `{m.archive}`, which no exported model directory holds, so "
                  "`base_model_name_or_path` is empty: export that checkpoint (python -m modeling.export "
                  f"{archive.parent} --out DIR) and use `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR), "
                  "PATH)`, or use the merged model in the parent directory.")


def write_adapter(directory: Path, adapter: dict[str, torch.Tensor], config: Config) -> Path:
    """`directory` as peft's save_pretrained writes it: adapter_config.json and adapter_model.safetensors (keys without the
    adapter name), so `PeftModel.from_pretrained(base, directory)` loads it, and AutoPeftModelForCausalLM too where a model
    directory holds the base (adapter_base)."""
    import peft
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = sorted({k.split(f".lora_A.{ADAPTER}.")[0].rsplit(".", 1)[-1] for k in adapter if f".lora_A.{ADAPTER}." in k})
    lora = config.lora
    base, about_base = adapter_base(config)
    if base is None:
        log.warning("%s: %s", directory, about_base)
    settings = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=modules, bias="none",
                               task_type="CAUSAL_LM", base_model_name_or_path=base)
    settings.save_pretrained(directory)
    tensors = {k.replace(f".{ADAPTER}.", "."): v.contiguous() for k, v in adapter.items()}
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "README.md").write_text(
        f"# LoRA adapter of {config.exp_name}\n\nr={lora.r}, alpha={lora.alpha:g}, target modules {', '.join(modules)}. "
        f"{about_base}\n\n```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, PATH)\n```\n\n"
        "The parent directory holds the same model with the adapter merged in.\n", encoding="utf-8")
    json.loads((directory / "adapter_config.json").read_text())  # written and readable
    return directory
