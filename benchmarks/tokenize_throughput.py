"""Tokenization throughput: examples/s with an empty cache (tokenizing) and with a warm one (reading it back).

    python benchmarks/tokenize_throughput.py [--repeat 10] [--num_proc 2] [--max_length 512 --max_prompt_length 256]

Uses the 300 real HH rows and the tiny GPT-2 tokenizer under ../shared/data/ (the repository root's sibling), repeated
`--repeat` times so the run is long enough to time. Each prompt/target pair is made distinct per copy so nothing is deduplicated.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the packages live in the repository root
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

import datasets  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from data.sft import sft_examples  # noqa: E402
from data.tokenize import TokenizeSettings, tokenize_examples  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="copies of the 300 rows")
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--max_prompt_length", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "reference" / "tiny-gpt2"))
    rows = str(SHARED / "hh" / "harmless-base-test-300.jsonl.gz")
    base = sft_examples(["hh"], "test", {"hh": {"test": [rows]}}, None)
    copies = [base.map(lambda p, k=k: {"prompt": f"\n\nHuman: copy {k}" + p}, input_columns="prompt") for k in range(args.repeat)]
    examples = datasets.concatenate_datasets(copies)
    settings = TokenizeSettings(args.max_length, args.max_prompt_length)
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cold = tokenize_examples(examples, tokenizer, settings, cache_dir=cache_dir, num_proc=args.num_proc)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        warm = tokenize_examples(examples, tokenizer, settings, cache_dir=cache_dir, num_proc=args.num_proc)
        warm_s = time.perf_counter() - start
    assert len(cold) == len(warm) == len(examples)
    n = len(examples)
    print(f"{n} examples, max_length={args.max_length}, max_prompt_length={args.max_prompt_length}, num_proc={args.num_proc}")
    print(f"cold (tokenize + write cache): {cold_s:.2f} s = {n / cold_s:,.0f} examples/s")
    print(f"cached (hash + read cache):    {warm_s:.2f} s = {n / warm_s:,.0f} examples/s")


if __name__ == "__main__":
    main()
