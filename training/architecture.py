"""Whether the installed transformers can build the model a config names, decided from its config.json alone.

    check_architecture(config.model)      # ConfigError before any tokenizer, data or weights: unknown model_type, ...
    architecture_problem(directory, trust_remote_code=False) -> str | None

A model_type that transformers does not know (a typo, or a model newer than the installed version) would otherwise end in
transformers' ValueError traceback when the tokenizer or the model is first loaded.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from training.errors import UserError


def architecture_problem(directory: str | Path, trust_remote_code: bool = False) -> str | None:
    """Why AutoModelForCausalLM cannot build the model in `directory` (its config.json), or None when it can or when
    config.json does not say (no model_type: transformers then guesses from the name, and reports that itself)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or unreadable: checked where the model source is located
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        return None
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    version = transformers.__version__
    if model_type not in CONFIG_MAPPING_NAMES:
        if "AutoConfig" in auto_map and trust_remote_code:
            return None  # the model's own code defines it
        if "AutoConfig" in auto_map:
            return (f"{path} has model_type {model_type!r}, which transformers {version} does not know, and the model ships "
                    "its own code for it (auto_map in config.json): set model.trust_remote_code=true if you trust that code, "
                    "or upgrade transformers (pip install -U transformers) if a newer version has it")
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"{path} has model_type {model_type!r}{hint}, which transformers {version} does not know: upgrade "
                "transformers (pip install -U transformers) if the model is newer than it, fix model_type if it is a typo, "
                "or set model.trust_remote_code=true for a model that ships its own code (auto_map in config.json)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not ("AutoModelForCausalLM" in auto_map and trust_remote_code):
        return (f"{path} has model_type {model_type!r}, which is not a causal LM in transformers {version} "
                "(AutoModelForCausalLM has no class for it): choose a decoder-only model (model.name_or_path)")
    return None


def check_architecture(model_config) -> None:
    """`architecture_problem` of model.name_or_path: a local directory, or a hub id whose config.json is in the hub cache
    (one that is not yet downloaded is checked by transformers when it loads)."""
    source = model_config.name_or_path
    if not source:
        return
    directory = Path(source).expanduser()
    if not directory.is_dir():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(source, "config.json")
        except Exception:  # noqa: BLE001 - not a valid repo id; the model source check says so
            return
        if not isinstance(cached, str):
            return
        directory = Path(cached).parent
    problem = architecture_problem(directory, model_config.trust_remote_code)
    if problem:
        raise ArchitectureError(f"model.name_or_path: {problem}")


class ArchitectureError(UserError, ValueError):
    """A model transformers cannot build as a causal LM; the message names the directory, model_type and version."""
