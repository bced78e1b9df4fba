"""Where the model and tokenizer come from, checked before anything is loaded: a local directory or the hub cache, probing
the hub only when neither holds them and the network may be used.

    check_model_source(config)      # model.name_or_path / tokenizer_name_or_path exist; max_length fits the model's positions
"""

from __future__ import annotations

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
