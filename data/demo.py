"""Offline demo assets: a synthetic Anthropic-HH-format dataset, a small tokenizer and a tiny model config.

Regenerate everything under recipes/demo/ (the output is byte-for-byte the same on every run):

    python -m data.demo

Use the rows and the checker directly:

    from data.demo import make_rows, check_answer
    rows = make_rows(8, seed=0)
    prompt = rows[0]["chosen"][: rows[0]["chosen"].rindex("\\n\\nAssistant:") + len("\\n\\nAssistant:")]
    check_answer(prompt, " 42<|endoftext|>")

Every prompt is one of three single-turn tasks whose answer a function computes from the prompt: the number after
a four-digit number, repeating three words, and saying three words backwards. Answers are a handful of tokens, so a
~1M-parameter model learns them in under two minutes on two CPU cores (recipes/demo.yaml).

`check_answer` reads a completion (the generated text after the prompt) up to the first EOS string,
"\\n\\nHuman:" or "\\n\\nAssistant:", strips surrounding whitespace, and requires exact equality with the answer.
"""

import json
import random
import re
import sys
from pathlib import Path

from training.files import json_lines
from data.files import DataError

OUT_DIR = Path(__file__).resolve().parents[1] / "recipes" / "demo"
EOS = "<|endoftext|>"
N_TRAIN = 12000  # most of the ~17k distinct prompts: too few rows lets the model memorise before it learns to copy
N_TEST = 300
SEED = 0
VOCAB_SIZE = 512  # an upper bound: merges stop earlier because the texts use few distinct words

WORDS = ["red", "blue", "green", "gold", "cat", "dog", "fox", "owl",
         "sun", "moon", "star", "tree", "fish", "bird", "rock", "rain"]

# Templates: the prompt text of each task, parsed back by `expected_answer`.
NEXT = "What number comes after {n}?"
REPEAT = "Repeat after me: {words}"
REVERSE = "Say these words in reverse order: {words}"


def _prompt(question: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant:"


def _replace_one(rng: random.Random, words: list[str]) -> list[str]:
    wrong = list(words)
    i = rng.randrange(len(wrong))
    wrong[i] = rng.choice([w for w in WORDS if w != wrong[i]])
    return wrong


def _make_example(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, correct answer, wrong answer) for one randomly drawn task.

    Numbers have four digits and lists three words, so every answer token sits at a fixed distance from the
    prompt tokens it depends on: what lets a tiny model learn the tasks in about a thousand steps.
    """
    task = rng.randrange(3)
    if task == 0:
        n = rng.randrange(1000, 9999)
        wrong = rng.choice([n, n + 2, n + 10])
        return _prompt(NEXT.format(n=n)), str(n + 1), str(wrong)
    words = [rng.choice(WORDS) for _ in range(3)]
    if task == 1:
        return (_prompt(REPEAT.format(words=" ".join(words))), " ".join(words),
                " ".join(_replace_one(rng, words)))
    while words == words[::-1]:  # a palindrome would make the unreversed list correct too
        words = [rng.choice(WORDS) for _ in range(3)]
    return _prompt(REVERSE.format(words=" ".join(words))), " ".join(words[::-1]), " ".join(words)


def make_rows(n: int, seed: int) -> list[dict]:
    """n HH rows {"chosen", "rejected"} with distinct prompts; chosen ends in the correct answer, rejected in a wrong one."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        prompt, right, wrong = _make_example(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"chosen": f"{prompt} {right}", "rejected": f"{prompt} {wrong}"})
    return rows


def make_splits(n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, test): one draw of distinct prompts, the first n_test for test, so the splits never share a prompt."""
    rows = make_rows(n_train + n_test, seed)
    return rows[n_test:], rows[:n_test]


def expected_answer(prompt: str) -> str:
    """The correct answer to a demo prompt (text ending with "\\n\\nAssistant:"); ValueError if it is not one."""
    question = re.fullmatch(r"\n\nHuman: (.*)\n\nAssistant:", prompt, flags=re.DOTALL)
    text = question[1] if question else ""
    if m := re.fullmatch(r"What number comes after (\d+)\?", text):
        return str(int(m[1]) + 1)
    if m := re.fullmatch(r"Repeat after me: ([a-z ]+)", text):
        return m[1]
    if m := re.fullmatch(r"Say these words in reverse order: ([a-z ]+)", text):
        return " ".join(m[1].split()[::-1])
    raise ValueError(f"not a demo prompt: {prompt!r}")


def extract_answer(completion: str) -> str:
    """The answer part of a completion: up to the first EOS, "\\n\\nHuman:" or "\\n\\nAssistant:", stripped."""
    for stop in (EOS, "\n\nHuman:", "\n\nAssistant:"):
        completion = completion.split(stop, 1)[0]
    return completion.strip()


def check_answer(prompt: str, completion: str) -> bool:
    """Whether the completion generated after `prompt` answers it exactly (see `extract_answer` for the cut)."""
    return extract_answer(completion) == expected_answer(prompt)


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE with single-digit tokens and EOS as the only special token (a `tokenizers.Tokenizer`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Single digits keep numbers compositional, so counting up generalises to unseen numbers.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def model_config(vocab_size: int, eos_token_id: int) -> dict:
    """A tiny Llama config (~1M parameters), random init only; no weights are shipped."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_assets(out_dir: Path = OUT_DIR) -> None:
    """Write train.jsonl, test.jsonl, the tokenizer files and config.json into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = make_splits()
    _write_jsonl(out_dir / "train.jsonl", train)
    _write_jsonl(out_dir / "test.jsonl", test)
    tokenizer = train_tokenizer([text for row in train for text in (row["chosen"], row["rejected"])])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    # Written by hand rather than by transformers' save_pretrained so the bytes do not depend on its version.
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
    })
    _write_json(out_dir / "special_tokens_map.json", {"eos_token": EOS})
    _write_json(out_dir / "config.json", model_config(tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS)))


def score_run(run_dir: str | Path) -> tuple[int, int, int]:
    """(examples_seen, correct, total) for the samples of a demo run's last eval in {run_dir}/samples.jsonl."""
    path = Path(run_dir) / "samples.jsonl"
    if not Path(run_dir).is_dir():
        raise DataError(f"no run directory at {run_dir}: give the run_dir of a demo run (python sft_train.py "
                        f"recipes/demo.yaml run_dir={run_dir} makes one)")
    if not path.is_file():
        raise DataError(f"{path}: no samples (was the run made with sample_during_eval=true?)")
    rows = [row for _, row in json_lines(path, path.read_text(encoding="utf-8").splitlines())]
    if not rows:
        raise DataError(f"{path}: no samples")
    last = max(r["examples_seen"] for r in rows)
    final = [r for r in rows if r["examples_seen"] == last]
    return last, sum(check_answer(r["prompt"], r["sample"]) for r in final), len(final)


def main(argv: list[str]) -> None:
    if argv[:1] == ["score"] and len(argv) == 2:
        seen, correct, total = score_run(argv[1])
        print(f"{correct}/{total} held-out prompts answered correctly ({correct / total:.1%}) at {seen} examples")
    elif not argv:
        write_assets()
        print(f"wrote {sorted(p.name for p in OUT_DIR.iterdir())} to {OUT_DIR}")
    else:
        sys.exit("usage: python -m data.demo            # regenerate recipes/demo/\n"
                 "       python -m data.demo score RUN_DIR   # share of correct answers at the run's last eval")


if __name__ == "__main__":
    from training.cli import run_main

    run_main(main, sys.argv[1:])
