"""The tokenizer of a run, shared by the data pipeline, training and export.

    tokenizer = load_tokenizer(config.model)
"""

from __future__ import annotations

import transformers

from training.config import ModelConfig


def load_tokenizer(model_config: ModelConfig):
    name = model_config.tokenizer_name_or_path or model_config.name_or_path
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=model_config.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no EOS token; SFT appends EOS to every response")
    if tokenizer.pad_token_id is None:
        # Safe here: labels are built from unpadded sequences, so padding never masks the supervised EOS.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
