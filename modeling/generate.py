"""Completions from a trained policy, prompted in the format it was trained on.

    python -m modeling.generate runs/my_run/LATEST --prompt "How do I boil an egg?"
    python -m modeling.generate runs/my_run/hf --prompts-file prompts.txt --greedy --max-new-tokens 64
    python -m modeling.generate runs/my_run/LATEST --prompts-file prompts.jsonl --temperature 0.7 --seed 1 --jsonl

The model is a checkpoint directory (policy.pt plus the run's config.yaml one level up) or an exported HF directory
(config.json). A bare question becomes "\\n\\nHuman: {question}\\n\\nAssistant:", the HH format every dataset here is
trained in; a prompt already in that form (multi-turn ones too, e.g. from a .jsonl file) is used as is. A prompts file
ending in .jsonl holds one JSON object with a "prompt" string per line; any other file holds one question per line.
Each prompt is sampled with the generator seeded by --seed, so its completion does not depend on the other prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

from modeling.export import build_model, load_policy, run_config
from modeling.load import load_tokenizer
from training.cli import run_main
from training.errors import UserError
from training.files import json_lines

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def format_prompt(text: str) -> str:
    """The HH prompt for `text`: kept if it already starts with a Human turn and ends with the Assistant tag."""
    stripped = text.rstrip()
    if stripped.startswith(HUMAN) and stripped.endswith(ASSISTANT):
        return stripped  # the response (and so the completion) starts with its own space
    return f"{HUMAN} {text.strip()}{ASSISTANT}"


class PromptsError(UserError, ValueError):
    """A prompts file that cannot be read; the message names file and line."""


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .jsonl file ({"prompt": ...} per line) or a text file (one per line); blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptsError(f"{path}: not valid UTF-8 ({e.reason})") from None
    if path.suffix != ".jsonl":
        prompts = [line for line in text.splitlines() if line.strip()]
    else:
        prompts = []
        for number, row in json_lines(path, text.splitlines(), PromptsError):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise PromptsError(f"{path}:{number}: expected a JSON object with a \"prompt\" string")
            prompts.append(row["prompt"])
    if not prompts:
        raise PromptsError(f"{path}: no prompts")
    return prompts


def load_generator(path: str | Path, device: str = "cpu") -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """(model, tokenizer) from an exported HF directory or from a checkpoint directory and its run config."""
    path = Path(path)
    if (path / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    config = run_config(path)  # raises naming the missing config.yaml when path is neither kind
    model = build_model(config.model, load_policy(path)["state"], device=device)
    return model, load_tokenizer(config.model)


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, temperature: float | None = 1.0,
             seed: int = 0) -> list[str]:
    """One completion per prompt (already formatted), without the prompt; temperature None means greedy."""
    sampling = {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature}
    completions = []
    for prompt in prompts:
        # No BOS or other special tokens: training tokenized prompts with add_special_tokens=False.
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
        torch.manual_seed(seed)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **sampling)
        completions.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return completions


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m modeling.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="checkpoint directory (RUN_DIR/LATEST, RUN_DIR/step-N) or exported HF directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a question or HH-format prompt (repeatable)")
    source.add_argument("--prompts-file", help="a .jsonl file of {\"prompt\": ...} objects or a text file with one per line")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated at most per prompt (default 128)")
    decoding = parser.add_mutually_exclusive_group()
    decoding.add_argument("--greedy", action="store_true", help="take the most likely token at each step")
    decoding.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, reset before each prompt (default 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jsonl", action="store_true", help="print one {\"prompt\", \"completion\"} JSON object per line")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if not args.greedy and args.temperature <= 0:
        parser.error("--temperature must be positive (use --greedy for greedy decoding)")

    prompts = [format_prompt(p) for p in (args.prompt or read_prompts(args.prompts_file))]
    model, tokenizer = load_generator(args.model, args.device)
    completions = complete(model, tokenizer, prompts, args.max_new_tokens, None if args.greedy else args.temperature, args.seed)
    for prompt, completion in zip(prompts, completions):
        if args.jsonl:
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
        else:
            print(f"{prompt}{completion}\n{'-' * 40}")
    return completions


if __name__ == "__main__":
    run_main(main)
