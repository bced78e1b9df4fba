"""Look at the data as training sees it: preview examples, export canonical records, print length statistics.

    python -m data preview recipes/demo.yaml -n 3 [key=value ...]      # a recipe, with the same overrides as sft_train.py
    python -m data preview hh --split test --data_files hh-test.jsonl.gz --tokenizer path/to/tokenizer [max_length=128]
    python -m data export hh --split test --data_files hh-test.jsonl.gz --out records.jsonl
    python -m data stats recipes/demo.yaml [--batch_size 8] [key=value ...]

The first argument is a recipe file or a dataset name (hh, shp, se, jsonl). `preview` prints examples in the loader's order
(`--shuffled`: the first epoch's training order): the prompt dimmed, supervised tokens highlighted, unsupervised response tokens
(user turns of a chat) plain, cut tokens marked, token counts on top. `export` writes one JSON line per prompt
({prompt, responses, pairs, sft_target}) in the loader's order. `stats` prints length percentiles before and after truncation
and the share of padding in micro-batches of `--batch_size` (default: the recipe's batch_size / gradient_accumulation_steps,
one process) taken in the training order. Tokenized data is cached where sft_train.py caches it, so a preview warms a run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from data.batches import epoch_order, plan_batches
from data.files import DataError
from data.records import LOADERS, load_records
from data.sft import build_split
from data.tokenize import TokenizeSettings
from training.cli import normalize_args, run_main
from training.checks import normalize_data_files
from training.config import Config, ConfigError, apply_overrides, build_config, cache_dir, load_recipe, parse_value
from training.model_source import locate_model_file

log = logging.getLogger("data")


COMMANDS = {"preview": "show examples as the model sees them", "export": "write canonical records as JSON lines",
            "stats": "length percentiles and padding cost"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    # One parser per command: argparse cannot intermix options and key=value words under subparsers.
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit("usage: python -m data {preview,export,stats} SOURCE [options] [key=value ...]\n\n" + __doc__)
    command = argv[0]
    p = argparse.ArgumentParser(prog=f"python -m data {command}", description=COMMANDS[command])
    p.add_argument("source", help=f"a recipe YAML or a dataset name ({', '.join(LOADERS)})")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, as for sft_train.py")
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--data_files", action="append", help="local files of the split (dataset name only; repeatable)")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (dataset name only; = model.name_or_path=...)")
    if command == "preview":
        p.add_argument("-n", type=int, default=3, help="number of examples")
        p.add_argument("--shuffled", action="store_true", help="take the first epoch's training order")
    if command == "export":
        p.add_argument("--out", default="-", help="output file; - for stdout")
    if command == "stats":
        p.add_argument("--batch_size", type=int, help="micro-batch size for the padding figure")
    args = p.parse_intermixed_args(argv[1:])
    args.command = command
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    """The recipe (or a one-dataset config) with the overrides applied, as sft_train.py would build it."""
    if Path(args.source).is_file() or args.source.endswith((".yaml", ".yml")):
        if args.data_files or args.tokenizer:
            raise ConfigError("--data_files and --tokenizer are for a dataset name; with a recipe use data_files.X.split=... "
                             "and model.name_or_path=... overrides")
        tree = load_recipe(args.source)
    elif args.source in LOADERS:
        tree = {"datasets": [args.source]}
        if args.data_files:
            tree["data_files"] = {args.source: {args.split: args.data_files}}
        if args.tokenizer:
            tree["model"] = {"name_or_path": args.tokenizer}
    else:
        raise ConfigError(f"{args.source!r} is neither a recipe file nor a dataset name ({', '.join(LOADERS)})")
    overrides = []
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"unexpected argument {item!r}: overrides are key=value")
        key, _, raw = item.partition("=")
        overrides.append((key.strip(), parse_value(raw)))
    return build_config(apply_overrides(tree, overrides))


def load_split(config: Config, split: str):
    """(tokenizer, settings, tokenized split) as training builds them; weights apply to the train split only."""
    from training.tokenizer import load_tokenizer  # imported here: export needs no tokenizer

    if not (config.model.tokenizer_name_or_path or config.model.name_or_path):
        raise ConfigError("no tokenizer: give --tokenizer PATH or model.name_or_path=PATH")
    locate_model_file("--tokenizer / model.tokenizer_name_or_path", config.model.tokenizer_name_or_path or config.model.name_or_path,
                      "tokenizer_config.json")
    tokenizer = load_tokenizer(config.model)
    settings = TokenizeSettings(config.max_length, config.max_prompt_length)
    data_files = normalize_data_files(config.data_files, config.datasets, log.warning)
    data = build_split(config.datasets, split, data_files, tokenizer, settings, str(cache_dir(config)),
                       config.tokenize_num_proc, weights=config.dataset_weights if split == "train" else None, seed=config.seed,
                       data_num_proc=config.data_num_proc)
    return tokenizer, settings, data


def render_example(example: dict, tokenizer):
    """A rich Panel: prompt dimmed, supervised runs highlighted, cut tokens marked, the id in the title, counts first."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    p, r, mask = example["prompt_ids"], example["response_ids"], example["response_mask"]
    prompt_cut = example["full_prompt_length"] - len(p)
    response_cut = example["full_response_length"] - len(r)
    cut_style = "bold white on red"
    text = Text()
    if prompt_cut and example["mode"] == "keep_end":
        text.append(f"[… {prompt_cut} prompt tokens cut]", style=cut_style)
    text.append(tokenizer.decode(p), style="dim")
    if prompt_cut and example["mode"] == "keep_start":
        text.append(f"[… {prompt_cut} prompt tokens cut]", style=cut_style)
    start = 0
    while start < len(r):  # runs of equal mask value, each decoded whole so multi-byte characters stay intact
        end = start
        while end < len(r) and mask[end] == mask[start]:
            end += 1
        text.append(tokenizer.decode(r[start:end]), style="bold black on green" if mask[start] else "")
        start = end
    if response_cut:
        text.append(f"[… {response_cut} response tokens cut, EOS among them]", style=cut_style)
    counts = (f"prompt {len(p)} + response {len(r)} = {len(p) + len(r)} tokens, {example['n_supervised']} supervised"
              + (", truncated" if example["truncated"] else ""))
    return Panel(Group(Text(counts, style="italic cyan"), text), title=example["example_id"], title_align="left")


def preview(args: argparse.Namespace) -> None:
    from rich.console import Console

    config = config_from_args(args)
    tokenizer, _, data = load_split(config, args.split)
    order = epoch_order(len(data), config.seed, 0) if args.shuffled else range(len(data))
    console = Console()
    for i in list(order)[: args.n]:
        console.print(render_example(data[i], tokenizer))
    console.print(f"{len(data)} examples in the {args.split} split of {config.datasets}")


def export(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    data_files = normalize_data_files(config.data_files, config.datasets, log.warning)
    cache = str(cache_dir(config))
    # A file is written under a temporary name and renamed at the end, so a failed export leaves no partial file.
    tmp = None if args.out == "-" else Path(args.out).with_name(f".{Path(args.out).name}.tmp-{os.getpid()}")
    out = sys.stdout if tmp is None else open(tmp, "w", encoding="utf-8")
    try:
        n = 0
        for name in config.datasets:
            records = load_records(name, args.split, files=data_files.get(name, {}).get(args.split), cache_dir=cache)
            for prompt, record in records.items():
                line = {"prompt": prompt, "responses": record["responses"], "pairs": [list(p) for p in record["pairs"]],
                        "sft_target": record["sft_target"]}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                n += 1
    except BaseException:
        if tmp is not None:
            out.close()
            tmp.unlink(missing_ok=True)
        raise
    if tmp is not None:
        out.close()
        os.replace(tmp, args.out)
        print(f"wrote {n} records to {args.out}", file=sys.stderr)


def padding_fraction(lengths: list[int], batch_size: int, seed: int) -> float:
    """Share of padded positions when consecutive micro-batches of the first epoch's order are padded to their longest."""
    padded = real = 0
    for plan in plan_batches(len(lengths), batch_size, seed, n_epochs=1, n_examples=None):
        batch = [lengths[i] for i in plan.indices]
        padded += max(batch) * len(batch)
        real += sum(batch)
    if padded == 0:
        raise ConfigError(f"--batch_size: {len(lengths)} examples make no full batch of {batch_size}")
    return 1 - real / padded


def stats(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    config = config_from_args(args)
    _, settings, data = load_split(config, args.split)
    columns = {c: np.array(data[c]) for c in ("full_prompt_length", "full_response_length")}
    prompt = np.array([len(x) for x in data["prompt_ids"]])
    response = np.array([len(x) for x in data["response_ids"]])
    rows = {
        "prompt": columns["full_prompt_length"], "response (with EOS)": columns["full_response_length"],
        "total": columns["full_prompt_length"] + columns["full_response_length"],
        "prompt, truncated": prompt, "response, truncated": response, "total, truncated": prompt + response,
    }
    quantiles = (50, 90, 95, 99)
    table = Table(title=f"tokens per example: {len(data)} examples, {config.datasets} {args.split}, "
                        f"max_length={settings.max_length}, max_prompt_length={settings.max_prompt_length}")
    for header in ("", "mean", *(f"p{q}" for q in quantiles), "max"):
        table.add_column(header, justify="right" if header else "left")
    for name, values in rows.items():
        table.add_row(name, f"{values.mean():.1f}", *(f"{np.percentile(values, q):.0f}" for q in quantiles), str(values.max()))
    console = Console()
    console.print(table)
    n_truncated = int(np.sum(data["truncated"]))
    console.print(f"truncated: {n_truncated} of {len(data)} ({n_truncated / len(data):.1%}); "
                  f"supervised tokens: {int(np.sum(data['n_supervised']))}")
    batch_size = args.batch_size or max(config.batch_size // config.gradient_accumulation_steps, 1)
    fraction = padding_fraction((prompt + response).tolist(), batch_size, config.seed)
    console.print(f"padding: {fraction:.1%} of positions in micro-batches of {batch_size} (training order, seed {config.seed})")


def main(argv: list[str] | None = None) -> None:
    import datasets

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    datasets.disable_progress_bars()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    {"preview": preview, "export": export, "stats": stats}[args.command](args)


if __name__ == "__main__":
    run_main(main)
