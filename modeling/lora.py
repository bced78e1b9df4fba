"""LoRA (and QLoRA) through peft: a frozen base model plus trainable low-rank adapters.

    model = add_adapters(load_model(...), config.lora)     # before accelerator.prepare; FSDP then wraps model.block_name
    write_adapter(directory, adapter, config)             # hf/adapter/: loads with PeftModel.from_pretrained(base, dir)

What a LoRA run's checkpoints hold (policy.pt with the adapters merged, adapter.pt for resume) is training/adapters.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.adapters import ADAPTER
from training.config import Config, ConfigError, LoraConfig


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


def write_adapter(directory: Path, adapter: dict[str, torch.Tensor], config: Config) -> Path:
    """`directory` as peft's save_pretrained writes it: adapter_config.json and adapter_model.safetensors (keys without the
    adapter name), so `PeftModel.from_pretrained(base, directory)` loads it. The base is the model training started from:
    model.name_or_path (or its model.archive)."""
    import peft
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = sorted({k.split(f".lora_A.{ADAPTER}.")[0].rsplit(".", 1)[-1] for k in adapter if f".lora_A.{ADAPTER}." in k})
    lora = config.lora
    settings = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=modules, bias="none",
                               task_type="CAUSAL_LM", base_model_name_or_path=config.model.name_or_path)
    settings.save_pretrained(directory)
    tensors = {k.replace(f".{ADAPTER}.", "."): v.contiguous() for k, v in adapter.items()}
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "README.md").write_text(
        f"# LoRA adapter of {config.exp_name}\n\nr={lora.r}, alpha={lora.alpha:g}, target modules {', '.join(modules)}. "
        f"Base: `{config.model.name_or_path}`" + (f" with the weights of `{config.model.archive}`" if config.model.archive else "")
        + ".\n\n```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, PATH)\n```\n\n"
        "The parent directory holds the same model with the adapter merged in.\n", encoding="utf-8")
    json.loads((directory / "adapter_config.json").read_text())  # written and readable
    return directory
