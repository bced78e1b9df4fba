"""Where the model and tokenizer come from, checked before anything is loaded: a local directory or the hub cache, probing
the hub only when neither holds them and the network may be used.

    check_model_source(config)      # model.name_or_path / tokenizer_name_or_path exist; max_length fits the model's positions
    check_architecture(config.model)  # its config.json's model_type is a causal LM this transformers can build
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from training.cli import one_line
from training.config import Config, ConfigError

POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def check_model_source(config: Config) -> None:
    """The model and tokenizer are where the config says, and max_length fits the model's positions: read from config.json
    (local directory or the hub cache), never from the weights. Hub ids not in the cache fail at once when offline."""
    m = config.model
    model_json = None
    for key, source in (("model.name_or_path", m.name_or_path), ("model.tokenizer_name_or_path", m.tokenizer_name_or_path)):
        if source is None:
            continue
        found = locate_model_file(key, source, "config.json" if key == "model.name_or_path" else "tokenizer_config.json")
        if key == "model.name_or_path":
            model_json = found
    if model_json is None:
        return
    try:
        with open(model_json) as f:
            model_config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot read {model_json} ({e})") from None
    sub = model_config.get("text_config") if isinstance(model_config.get("text_config"), dict) else {}
    for key in POSITION_KEYS:
        limit = model_config.get(key, sub.get(key))
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            if config.max_length > limit:
                raise ConfigError(f"max_length ({config.max_length}) exceeds the {limit} positions of {m.name_or_path} "
                                  f"({key} in its config.json); set max_length={limit} or less")
            return


def locate_model_file(key: str, source: str, filename: str) -> Path | None:
    """The local path of `filename` of a model directory or cached hub repo; None when it may still be downloaded."""
    path = Path(source).expanduser()
    if path.is_dir():
        if key == "model.name_or_path" and not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {source} is a directory without config.json, so not a model directory")
        return path / filename if (path / filename).is_file() else None
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith("/") or path.exists():
        raise ConfigError(f"{key}: no model directory at {source}")
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, filename)
    except Exception as e:  # an id that is not a valid repo name
        raise ConfigError(f"{key}: {source!r} is neither a local directory nor a valid hub id ({one_line(str(e))})") from None
    if isinstance(cached, str):
        return Path(cached)
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{key}: {source!r} is not a local directory and not in the hub cache, and HF_HUB_OFFLINE is set; "
                          f"download it once online (or unset HF_HUB_OFFLINE), or give a local directory")
    if not hub_reachable(constants.ENDPOINT):
        raise ConfigError(f"{key}: {source!r} is not a local directory or in the hub cache, and {constants.ENDPOINT} cannot be "
                          "reached; on a machine without network give a local directory (and set HF_HUB_OFFLINE=1)")
    return None


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A quick TCP connect to the hub; with a proxy configured, assume it is reachable (the proxy decides)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


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
        raise ConfigError(f"model.name_or_path: {problem}")
