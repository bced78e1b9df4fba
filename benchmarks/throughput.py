"""Training throughput and memory of the batching, packing, attention and loss modes, on one fixed workload.

    OMP_NUM_THREADS=1 python benchmarks/throughput.py                          # every mode, 6 timed steps each after 1 warm-up
    OMP_NUM_THREADS=1 python benchmarks/throughput.py --steps 10 --modes padded,packed+sup+varlen --compile

Workload: a randomly initialised Llama (hidden 256, 4 layers, vocabulary 32,000 so the LM head weighs as in real models) trained
with the real `train_step` of sft_train.py on the 300 real HH rows under ../shared/data/hh (tokenized with the tiny GPT-2
tokenizer; the demo rows of recipes/demo when that file is absent), max_length 512, batch 8, RMSprop.

Modes: padded (the reference: reference order, right padding, full logits), +sup (loss.supervised_logits_only), bucketed
(batching=length_bucketed), packed (packing=true), +varlen (model.attn_implementation=sdpa_packed); any mode may end in +lora
(LoRA adapters of rank 16 on every linear layer of the blocks, the base frozen: `--modes packed+sup+varlen,packed+sup+varlen+lora`
compares it with full fine-tuning, whose losses then differ by design); --compile adds packed+sup
under torch.compile (on CPU it recompiles for every new shape, so a short run mostly measures compilation).

Every mode runs in its own worker process (so peak RSS is its own) holding its own copy of the model; the parent asks the
workers for one step each in turn, so all modes see the same machine load. Modes on the reference order train on the same
batches from the same weights, so their losses must agree (the `loss diff` column, against the padded baseline). Printed: one
table of non-pad tokens/s (per wall second and per CPU second of the worker), supervised tokens/s, step time and peak RSS,
each as a ratio to the padded baseline; then the attention alone, timed on the same batches in the three layouts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the packages live in the repository root
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

SHARED = REPO.parent / "shared" / "data"
HH_ROWS = SHARED / "hh" / "harmless-base-test-300.jsonl.gz"
TOKENIZER = SHARED / "reference" / "tiny-gpt2"

# name -> (batching, packing, supervised_logits_only, attn_implementation)
MODES = {
    "padded": ("reference", False, False, "sdpa"),
    "padded+sup": ("reference", False, True, "sdpa"),
    "bucketed": ("length_bucketed", False, False, "sdpa"),
    "bucketed+sup": ("length_bucketed", False, True, "sdpa"),
    "packed": ("reference", True, False, "sdpa"),
    "packed+sup": ("reference", True, True, "sdpa"),
    "packed+sup+varlen": ("reference", True, True, "sdpa_packed"),
}


def base_mode(mode: str) -> str:
    """The MODES entry under the suffixes: +lora (LoRA r=16 on all linear layers, base frozen), +compile."""
    return mode.replace("+lora", "").replace("+compile", "")


def worker(mode: str, args: argparse.Namespace, conn) -> None:
    """Build the mode's run, then run one training step per message and answer with its metrics."""
    import torch
    import transformers
    from accelerate import Accelerator

    import sft_train
    from data.sft import build_split
    from data.tokenize import TokenizeSettings
    from modeling.load import load_tokenizer
    from data.batches import plan_train_batches
    from modeling.lora import add_adapters
    from training.config import LoraConfig, load_config
    from training.loop import TrainState

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    batching, packing, supervised_only, attn = MODES[base_mode(mode)]
    work = Path(args.work_dir)
    config = load_config([
        "exp_name=throughput", f"model.name_or_path={args.tokenizer}", f"batch_size={args.batch_size}",
        f"max_length={args.max_length}", f"max_prompt_length={args.max_length // 2}", f"batching={batching}",
        f"packing={str(packing).lower()}", f"loss.supervised_logits_only={str(supervised_only).lower()}",
        f"loss.logits_chunk_tokens={args.chunk_tokens}", "lr=1e-4", "n_epochs=100", "wandb.enabled=false",
    ])
    tokenizer = load_tokenizer(config.model)
    files = {args.dataset: {"train": [str(args.data)]}}
    data = build_split([args.dataset], "train", files, tokenizer, TokenizeSettings(config.max_length, config.max_prompt_length),
                       str(work / "cache"))
    plans = plan_train_batches(config.batching, data, config.batch_size, config.seed, config.n_epochs, None)
    torch.manual_seed(0)
    model_config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, max_position_embeddings=args.max_length,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    model = transformers.AutoModelForCausalLM.from_config(model_config, attn_implementation=attn)
    if "+lora" in mode:  # the recipes' adapters: rank 16 on every linear layer of the blocks
        model = add_adapters(model, LoraConfig(enabled=True, r=16, alpha=32))
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    if mode.endswith("+compile"):
        model = torch.compile(model, dynamic=True)
    state = TrainState()
    conn.send("ready")
    while conn.recv() == "step":
        plan = next(plans)
        cpu_start = time.process_time()
        metrics = sft_train.train_step(config, accelerator, model, optimizer, scheduler, data, tokenizer.pad_token_id, state, work,
                                       plan.indices)
        metrics["cpu_seconds"] = time.process_time() - cpu_start
        metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        conn.send(metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)} (+compile appends)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000, help="model vocabulary (the tokenizer's ids are a prefix)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk_tokens", type=int, default=1024, help="loss.logits_chunk_tokens for the +sup modes")
    parser.add_argument("--compile", action="store_true", help="also run the best mode under torch.compile")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if base_mode(m) not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if args.compile:
        modes.append("packed+sup+compile")
    if HH_ROWS.exists() and TOKENIZER.exists():
        args.data, args.dataset, args.tokenizer = HH_ROWS, "hh", TOKENIZER
    else:
        print(f"{HH_ROWS} not found: using the demo rows of recipes/demo instead")
        args.data, args.dataset, args.tokenizer = REPO / "recipes" / "demo" / "train.jsonl", "hh", REPO / "recipes" / "demo"

    with tempfile.TemporaryDirectory() as work:
        args.work_dir = work
        results = run_interleaved(modes, args)
    print_table(modes, results, args)
    attention_table(args)


def run_interleaved(modes: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    ctx = mp.get_context("spawn")
    workers = {}
    for mode in modes:  # one at a time: the first tokenizes and fills the cache the others read
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(mode, args, child), daemon=True)
        proc.start()
        if parent.recv() != "ready":
            raise RuntimeError(f"worker for {mode} failed to start")
        workers[mode] = (proc, parent)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        for step in range(args.warmup + args.steps):
            for mode in modes:
                workers[mode][1].send("step")
                metrics = workers[mode][1].recv()
                if step >= args.warmup:
                    results[mode].append(metrics)
    finally:
        for proc, conn in workers.values():
            conn.send("stop")
            proc.join(timeout=30)
    return results


def summarize(rows: list[dict], batch_size: int) -> dict:
    seconds = [batch_size / r["examples_per_second"] for r in rows]  # the step's wall time, as train_step measured it
    total = sum(seconds)
    return {
        "tokens_per_second": sum(r["tokens_per_second"] * t for r, t in zip(rows, seconds)) / total,
        "supervised_tokens_per_second": sum(r["supervised_tokens_per_second"] * t for r, t in zip(rows, seconds)) / total,
        "step_seconds": total / len(rows),
        "tokens_per_cpu_second": sum(r["tokens_per_second"] * t for r, t in zip(rows, seconds)) / sum(r["cpu_seconds"] for r in rows),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
        "padding_fraction": sum(r["padding_fraction"] for r in rows) / len(rows),
        "losses": [r["loss/train"] for r in rows],
    }


def print_table(modes: list[str], results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    stats = {m: summarize(results[m], args.batch_size) for m in modes}
    base = stats.get("padded") or stats[modes[0]]
    base_losses = base["losses"]
    print(f"\n{args.steps} steps after {args.warmup} warm-up, batch {args.batch_size}, max_length {args.max_length}, "
          f"Llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, data {args.data.name}; ratios to `padded`")
    header = (f"{'mode':<26}{'tok/s':>8}{'x':>6}{'sup tok/s':>10}{'x':>6}{'step s':>8}{'x':>6}{'tok/cpu-s':>10}{'x':>6}"
              f"{'peak RSS MB':>12}{'x':>6}{'pad':>6}{'loss diff':>10}")
    print(header)
    print("-" * len(header))
    for mode in modes:
        s = stats[mode]
        same_order = MODES[base_mode(mode)][0] == "reference"
        diff = max(abs(a - b) / abs(b) for a, b in zip(s["losses"], base_losses)) if same_order else float("nan")
        ratio = {k: s[k] / base[k] for k in ("tokens_per_second", "supervised_tokens_per_second", "step_seconds",
                                               "tokens_per_cpu_second", "peak_rss_mb")}
        print(f"{mode:<26}{s['tokens_per_second']:>8.0f}{ratio['tokens_per_second']:>6.2f}"
              f"{s['supervised_tokens_per_second']:>10.0f}{ratio['supervised_tokens_per_second']:>6.2f}"
              f"{s['step_seconds']:>8.2f}{ratio['step_seconds']:>6.2f}"
              f"{s['tokens_per_cpu_second']:>10.0f}{ratio['tokens_per_cpu_second']:>6.2f}"
              f"{s['peak_rss_mb']:>12.0f}{ratio['peak_rss_mb']:>6.2f}{s['padding_fraction']:>6.2f}{diff:>10.1e}")
    print("tok/s: non-pad tokens per wall second; tok/cpu-s: per second of this process's CPU time (steadier on a shared machine);\n"
          "loss diff: max relative difference of the per-step train loss from `padded` (same batches; nan: other order)")
    if os.environ.get("THROUGHPUT_JSON"):
        Path(os.environ["THROUGHPUT_JSON"]).write_text(json.dumps(stats, indent=1))


def attention_table(args: argparse.Namespace) -> None:
    """Attention alone (forward + backward, one layer's shapes) on the benchmark's first batches: what each layout computes."""
    import torch
    import torch.nn.functional as F

    from data.batches import collate, plan_batches
    from data.packing import collate_packed
    from data.sft import build_split
    from data.tokenize import TokenizeSettings
    from modeling.load import load_tokenizer
    from training.config import load_config

    config = load_config(["exp_name=throughput", f"model.name_or_path={args.tokenizer}"])
    with tempfile.TemporaryDirectory() as work:
        data = build_split([args.dataset], "train", {args.dataset: {"train": [str(args.data)]}}, load_tokenizer(config.model),
                           TokenizeSettings(args.max_length, args.max_length // 2), work)
    heads, dim = args.hidden // 64, 64
    timings = {"padded, padding mask": 0.0, "packed, block-diagonal mask": 0.0, "packed, per example (sdpa_packed)": 0.0}
    for plan in list(plan_batches(len(data), args.batch_size, 0, 1, None))[: args.steps]:
        examples = [data[i] for i in plan.indices]
        padded, packed = collate(examples, 0), collate_packed(examples, 0, args.max_length)
        keep = padded["attention_mask"].bool()
        padding_mask = keep[:, None, None, :] & torch.ones(keep.shape[1], keep.shape[1], dtype=torch.bool).tril()
        owner = packed["example_index"]
        block_mask = (owner[:, None, :, None] == owner[:, None, None, :]) & torch.ones(owner.shape[1], owner.shape[1],
                                                                                        dtype=torch.bool).tril()
        spans = packed["packed_spans"]

        def per_example(q, k, v):
            return torch.cat([torch.cat([F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                                        is_causal=True) for s, e in row], dim=2)
                              for b, row in enumerate(spans)])

        cases = {"padded, padding mask": (keep.shape, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=padding_mask)),
                 "packed, block-diagonal mask": (owner.shape, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask)),
                 "packed, per example (sdpa_packed)": (owner.shape, per_example)}
        for name, (shape, fn) in cases.items():
            q, k, v = (torch.randn(shape[0], heads, shape[1], dim, requires_grad=True) for _ in range(3))
            start = time.perf_counter()
            fn(q, k, v).sum().backward()
            timings[name] += time.perf_counter() - start
    base = timings["padded, padding mask"]
    print(f"\nattention only (forward + backward of one layer, {heads} heads x {dim}, the same {args.steps} batches):")
    for name, seconds in timings.items():
        print(f"  {name:<36}{seconds:>8.3f} s{seconds / base:>7.2f}x")


if __name__ == "__main__":
    main()
