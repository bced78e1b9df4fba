"""Tiny random models and data for tests: a model directory (config.json + the demo tokenizer) and HH-format jsonl files.

    from tests.tiny import tiny_model_dir, tiny_data, tiny_run_args
    model = tiny_model_dir(tmp_path / "model")                      # Llama, hidden 32, 2 layers, vocab 394 (or gpt2, gpt_neox)
    train, test = tiny_data(tmp_path, n_train=32, n_test=8)         # first rows of recipes/demo/*.jsonl
    sft_train.main(tiny_run_args(tmp_path, model, train, test, batch_size=4, n_epochs=1))

The model is built by the run itself (`model.random_init=true`), seeded by the config's seed, so equal configs give equal
weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VOCAB_SIZE = 394  # recipes/demo/tokenizer.json


def tiny_model_dir(path: Path, arch: str = "llama", hidden: int = 32, layers: int = 2, tied: bool = True) -> Path:
    """A model directory that `model.random_init=true` builds from: config.json plus the demo tokenizer (EOS id 0)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / name, path / name)
    if arch == "llama":
        config = json.loads((DEMO / "config.json").read_text())
        config.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=hidden // 2, tie_word_embeddings=tied)
    elif arch == "gpt2":
        config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": VOCAB_SIZE, "n_positions": 256,
                  "n_embd": hidden, "n_layer": layers, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0,
                  "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": tied}
    elif arch == "gpt_neox":  # Pythia's architecture: partial rotary (rotary_pct), parallel residual
        config = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": VOCAB_SIZE,
                  "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": 2 * hidden,
                  "rotary_pct": 0.25, "max_position_embeddings": 2048, "bos_token_id": 0, "eos_token_id": 0,
                  "attention_dropout": 0.0, "hidden_dropout": 0.0, "tie_word_embeddings": tied}
    else:
        raise ValueError(f"unknown arch {arch!r}: llama, gpt2 or gpt_neox")
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def tiny_data(path: Path, n_train: int = 32, n_test: int = 8) -> tuple[Path, Path]:
    """The first rows of the demo's train/test files (HH format: chosen/rejected dialogues)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        lines = (DEMO / f"{split}.jsonl").read_text().splitlines()[:n]
        target = path / f"{split}.jsonl"
        target.write_text("\n".join(lines) + "\n")
        out.append(target)
    return out[0], out[1]


def tiny_run_args(tmp: Path, model: Path, train: Path, test: Path, **overrides: Any) -> list[str]:
    """Command-line words for `sft_train.main`: an offline CPU run of the tiny model, caches under `tmp`, no export/wandb.

    `overrides` are config keys (dots as `__`: loss__normalize="token"); None becomes null.
    """
    args: dict[str, Any] = {
        "exp_name": "tiny", "model.name_or_path": model, "model.random_init": True,
        "data_files.hh.train": train, "data_files.hh.test": test, "local_dirs": f"[{tmp}]", "run_dir": Path(tmp) / "run",
        "batch_size": 4, "eval_batch_size": 4, "n_eval_examples": 4, "n_epochs": 1, "eval_every": 16, "lr": 1e-3,
        "warmup_steps": 2, "max_length": 64, "max_prompt_length": 32, "sample_during_eval": False, "n_eval_model_samples": 2,
        "max_new_tokens": 3, "minimum_log_interval_secs": 0, "wandb.enabled": False, "export": False, "optimizer": "RMSprop",
    }
    args.update({key.replace("__", "."): value for key, value in overrides.items()})
    return [f"{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}" for key, value in args.items()]
