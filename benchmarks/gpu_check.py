"""GPU check of the headline path (FSDP2 + bf16) on the visible NVIDIA GPUs: one table, in under 8 minutes on one GPU.

    python benchmarks/gpu_check.py                       # GPU machine: every case through `accelerate launch`, one table
    python benchmarks/gpu_check.py --out /tmp/check      # keep the runs' metrics.jsonl there (checkpoints are deleted)
    python benchmarks/gpu_check.py --dry-run             # CPU, tiny model, in-process, 4 steps: checks the check itself
    python benchmarks/gpu_check.py --compile             # also bf16 padded with compile=true (compile time on top)
    python benchmarks/gpu_check.py --attn sdpa_packed    # the packed cases on another kernel
    python benchmarks/gpu_check.py --cases "DPO packed"  # the required cases and these (comma-separated)

Optional cases are skipped once the elapsed time plus the slowest case so far would pass --budget-minutes (8); the
table then names them. After the table, the speed targets (packed >= 2x padded, best full fine-tuning >= 35% MFU and
>= 5x the plain loop, its peak memory <= the plain loop's, DPO packed >= 2x DPO padded) say met or miss.

Needs torch with CUDA, transformers and accelerate, plus the rest of requirements.txt that the training script imports
(datasets, tokenizers, safetensors, pyyaml, rich, numpy, matplotlib); flash-attn is not needed (the packed cases run
torch's own varlen_attn, modeling/varlen_attention.py). No network: the model is a Llama of about 1B parameters built
from a config with random weights (hidden 2048, 16 layers, 16 heads, MLP 5632, vocab 32,000), the tokenizer is
recipes/demo's, and the data are synthetic HH-format dialogues of varied length (16 to 512 tokens) written by this
script. Disk: one LATEST checkpoint at a time (policy.pt 3.8 GB and the sharded resume state, 7.6 GB with RMSprop),
deleted once its case is read.

Every GPU case but the plain loop is the real command on the real script (sft_train.py, or dpo_train.py for DPO):

    accelerate launch --config_file accelerate_configs/fsdp_8gpu.yaml --num_processes <visible GPUs> sft_train.py <args>

Cases, all from the same random weights on the same batches (global batch 32, RMSprop lr 1e-5, max_length 512):
  plain loop      the baseline: a plain PyTorch loop in this process on one GPU, fp32 weights + bf16 autocast, padded
                  batches with their mask, full logits, no FSDP; 10 updates
  bf16 padded     model.fsdp_policy_mp=bfloat16, right padding, sdpa; 10 updates
  bf16 packed     the same with packing=true on --attn (varlen_attn: one flat row per micro-batch); 10 updates
  fp32 padded     model.fsdp_policy_mp=null: float32 compute (TF32 matmuls, allow_tf32=true); 10 updates
  bf16 resumed    bf16 padded stopped after 5 updates (max_updates_this_run=5 saves LATEST), then resume_from=auto
  bf16 packed+compile   bf16 packed with compile=true; 6 updates
  DPO padded, DPO packed   dpo_train.py (loss dpo, beta 0.1, live reference in bf16; policy and reference from the
                  same random weights, as an SFT policy.pt would give both), 32 pairs per batch; 4 updates
  LoRA packed     bf16 packed with lora.enabled=true (r 16, all linear layers); 4 updates
The table: tokens/s (non-pad, median of updates 3..), its ratio to the plain loop, MFU, peak GPU memory of rank 0, the
train loss of every update side by side, and the checks: bf16 within 2% of fp32 at update 1 and 5% after, packed within
2% of padded at update 1 (on the --attn kernel), the resumed run's first loss equal to the uninterrupted run's at that
update (relative 1e-4), each compiled case within 2% of its eager case at every update (bf16: the compiled kernels
round differently), DPO packed within 2% of DPO padded at update 1 (its loss, and the chosen log-probs, which the
kernel changes; the loss alone starts at ln 2 either way). Exit status 1 if a check fails.
In --dry-run the "bf16" cases compute in float32 (fsdp_policy_mp applies only under FSDP, the plain loop skips autocast),
the packed cases run sdpa_packed (varlen_attn needs CUDA; the table says so), compile cases are left out (CPU compile
time: tests/test_compile.py covers them) and nothing is launched.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for var, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
                   "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(var, value)

LAUNCH_CONFIG = REPO / "accelerate_configs" / "fsdp_8gpu.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WORDS = ("sun rock cat dog blue star red tree water fire one two three four five six seven eight nine ten small big "
         "river stone house light dark cold warm fast slow green yellow bird fish moon cloud rain snow wind road").split()

# name -> (model config, rows, updates, stop after, max_length)
SIZES = {
    "gpu": ({"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
             "num_key_value_heads": 16, "head_dim": 128, "vocab_size": 32000, "max_position_embeddings": 2048}, 400, 10, 5, 512),
    "dry-run": ({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512, "max_position_embeddings": 256}, 64, 4, 2, 128),
}
BATCH = {"gpu": 32, "dry-run": 8}
SHORT = {"bf16 packed+compile": 6, "bf16 padded+compile": 6, "DPO padded": 4, "DPO packed": 4, "LoRA packed": 4}  # updates
PLAIN = "plain loop"
DRY_RUN_PACKED = "sdpa_packed"  # the CPU packed kernel, used for --attn in a dry run
REQUIRED = (PLAIN, "bf16 padded", "bf16 packed", "fp32 padded", "bf16 resumed")  # first: the checks need them


class Case(NamedTuple):
    """The argument lists of a case's invocations (two for the stopped-and-resumed run) and the script they run."""

    invocations: tuple[list[str], ...] = ()
    script: str = "sft_train.py"


def write_model_dir(path: Path, overrides: dict) -> Path:
    """config.json for model.random_init (the demo's Llama config, resized) and the demo tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads((REPO / "recipes" / "demo" / "config.json").read_text())
    config.update(overrides, tie_word_embeddings=False)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    for name in TOKENIZER_FILES:
        shutil.copy(REPO / "recipes" / "demo" / name, path / name)
    return path


def write_data(path: Path, rows: int, max_words: int) -> tuple[Path, Path]:
    """HH-format train/test jsonl: a prompt and an answer of random words, lengths spread from a few to max_words words."""
    rng = random.Random(0)
    path.mkdir(parents=True, exist_ok=True)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(int(low * (high / low) ** rng.random())))  # log-uniform length

    files = []
    for split, n in (("train", rows), ("test", 64)):
        lines = []
        for _ in range(n):
            prompt = f"\n\nHuman: {words(4, max_words // 2)}\n\nAssistant:"
            lines.append(json.dumps({"chosen": f"{prompt} {words(2, max_words // 2)}", "rejected": f"{prompt} no"}))
        files.append(path / f"{split}.jsonl")
        files[-1].write_text("\n".join(lines) + "\n")
    return files[0], files[1]


def common_args(size: str, model_dir: Path, train: Path, test: Path, out: Path) -> list[str]:
    _, _, updates, _, max_length = SIZES[size]
    batch = BATCH[size]
    args = {
        "exp_name": "gpu_check", "model": "blank_model", "model.name_or_path": model_dir, "model.random_init": "true",
        "model.block_name": "LlamaDecoderLayer", "datasets": "[hh]", "data_files.hh.train": train, "data_files.hh.test": test,
        "batch_size": batch, "gradient_accumulation_steps": 1, "optimizer": "RMSprop", "lr": 1e-5, "warmup_steps": 2,
        "n_epochs": "null", "n_examples": batch * updates, "n_eval_examples": 32, "eval_batch_size": 32,
        "eval_every": 10**9, "do_first_eval": "false", "sample_during_eval": "false", "max_length": max_length,
        "max_prompt_length": max_length // 2, "minimum_log_interval_secs": 0, "wandb.enabled": "false", "export": "false",
        "local_dirs": f"[{out}]", "seed": 0,
    }
    return [f"{k}={v}" for k, v in args.items()]


def cases(size: str, attn: str, compile_too: bool = False) -> dict[str, Case]:
    """name -> its Case (the plain loop has no invocation: it runs in this process)."""
    _, _, updates, stop, _ = SIZES[size]
    batch = BATCH[size]
    bf16 = ["model.fsdp_policy_mp=bfloat16", "model.attn_implementation=sdpa", "packing=false"]
    packed = ["model.fsdp_policy_mp=bfloat16", f"model.attn_implementation={attn}", "packing=true"]
    dpo = ["loss.name=dpo", "loss.beta=0.1", "model.reference_dtype=bfloat16", "reference_logps=live"]
    runs = {
        PLAIN: Case(),
        "bf16 padded": Case((bf16,)),
        "bf16 packed": Case((packed,)),
        "fp32 padded": Case((["model.fsdp_policy_mp=null", "model.attn_implementation=sdpa", "packing=false"],)),
        "bf16 resumed": Case(([*bf16, f"max_updates_this_run={stop}"], [*bf16, "resume_from=auto"])),
    }
    if size != "dry-run":  # compile on CPU: minutes of inductor for a tiny model (tests/test_compile.py covers it)
        runs["bf16 packed+compile"] = Case(([*packed, "compile=true"],))
        if compile_too:
            runs["bf16 padded+compile"] = Case(([*bf16, "compile=true"],))
    runs["DPO padded"] = Case(([*bf16, *dpo],), "dpo_train.py")
    runs["DPO packed"] = Case(([*packed, *dpo],), "dpo_train.py")
    runs["LoRA packed"] = Case(([*packed, "lora.enabled=true", "lora.r=16", "lora.alpha=32"],))
    for name, n in SHORT.items():  # the extra cases run fewer updates: the whole check stays under 8 minutes
        if name in runs and n < updates:
            runs[name] = Case(tuple([*args, f"n_examples={batch * n}"] for args in runs[name].invocations), runs[name].script)
    return runs


def launch_command(n_gpus: int, args: list[str], script: str = "sft_train.py") -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIG), "--num_processes",
            str(n_gpus), "--main_process_port", "0", str(REPO / script), *args]


def run_launched(n_gpus: int, args: list[str], log: Path, script: str = "sft_train.py") -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    with open(log, "a") as f:
        result = subprocess.run(launch_command(n_gpus, args, script), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"a run failed (exit {result.returncode}); its output: {log}\n{tail(log)}")


def run_in_process(args: list[str], log: Path, script: str = "sft_train.py") -> None:
    import contextlib
    import importlib

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # each run builds its own Accelerator, as a launched process would
    GradientState._reset_state()
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        importlib.import_module(Path(script).stem).main(args)


def plain_loop(args: list[str], model_dir: Path, updates: int, device: str, autocast: bool) -> list[dict]:
    """The baseline a user would write first: fp32 weights on one device, bf16 autocast, right-padded batches with their
    attention mask, full-vocabulary logits, the mean of per-example summed NLL, RMSprop, no clipping or schedule. Same
    config (tokenized data, batches, seed, lr) as the suite's cases; one row per update like metrics.jsonl's."""
    import itertools

    import torch
    import transformers

    from data.batches import collate, plan_batches
    from data.sft import build_split
    from data.tokenize import TokenizeSettings
    from training.checks import normalize_data_files
    from training.config import cache_dir, load_config
    from training.throughput import peak_memory_gb, synchronize
    from training.tokenizer import load_tokenizer

    config = load_config(args)
    tokenizer = load_tokenizer(config.model)
    data = build_split(config.datasets, "train", normalize_data_files(config.data_files, config.datasets, print), tokenizer,
                       TokenizeSettings(config.max_length, config.max_prompt_length), str(cache_dir(config)))
    torch.manual_seed(config.seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model_dir),
                                                          dtype=torch.float32, attn_implementation="sdpa").to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.lr)
    device = torch.device(device)
    rows = []
    for plan in itertools.islice(plan_batches(len(data), config.batch_size, config.seed, None, config.n_examples), updates):
        examples = [data[i] for i in plan.indices]
        batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss = -(logp * (labels != -100)).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        elapsed = time.perf_counter() - start
        tokens = sum(len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples)
        rows.append({"loss/train": loss.item(), "tokens_per_second": tokens / elapsed, "peak_memory_gb": peak_memory_gb(device)})
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss/train" in r]


def summarize(rows: list[dict]) -> dict:
    timed = rows[2:] or rows  # the first updates include compilation of kernels and allocator warm-up
    mfu = [r["mfu"] for r in timed if "mfu" in r]
    summary = {"losses": [r["loss/train"] for r in rows],
               "tokens_per_second": statistics.median(r["tokens_per_second"] for r in timed),
               "mfu": statistics.median(mfu) if mfu else None, "peak_memory_gb": max(r["peak_memory_gb"] for r in rows)}
    if rows and "logps_train/chosen" in rows[0] and "rewards_train/chosen" in rows[0]:  # DPO: the policy's log-probs
        summary["chosen_logps"] = [r["logps_train/chosen"] for r in rows]
    return summary


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def checks(results: dict, stop: int) -> list[tuple[str, bool, str]]:
    bf16, fp32 = results["bf16 padded"]["losses"], results["fp32 padded"]["losses"]
    packed, resumed = results["bf16 packed"]["losses"], results["bf16 resumed"]["losses"]
    gaps = [relative(a, b) for a, b in zip(bf16, fp32)]
    compiled = [(f"{name}+compile vs eager, worst update", max(map(relative, results[f"{name}+compile"]["losses"],
                                                                     results[name]["losses"])))
                for name in ("bf16 padded", "bf16 packed") if f"{name}+compile" in results]
    dpo = []
    if "DPO padded" in results and "DPO packed" in results:
        padded_dpo, packed_dpo = results["DPO padded"], results["DPO packed"]
        dpo.append(("DPO packed vs padded loss, update 1", relative(packed_dpo["losses"][0], padded_dpo["losses"][0])))
        if "chosen_logps" in padded_dpo and "chosen_logps" in packed_dpo:
            dpo.append(("DPO packed vs padded chosen logps, update 1",
                        relative(packed_dpo["chosen_logps"][0], padded_dpo["chosen_logps"][0])))
    return [
        ("bf16 vs fp32 loss, update 1", gaps[0] <= 0.02, f"{gaps[0]:.2e}"),
        ("bf16 vs fp32 loss, worst update", max(gaps) <= 0.05, f"{max(gaps):.2e}"),
        ("packed vs padded loss, update 1", relative(packed[0], bf16[0]) <= 0.02, f"{relative(packed[0], bf16[0]):.2e}"),
        ("same updates in every case", len({len(bf16), len(fp32), len(packed), len(resumed)}) == 1, f"{len(bf16)}"),
        (f"resumed loss at update {stop + 1} = uninterrupted", relative(resumed[stop], bf16[stop]) <= 1e-4,
         f"{relative(resumed[stop], bf16[stop]):.2e}"),
        *[(label, gap <= 0.02, f"{gap:.2e}") for label, gap in compiled + dpo],
    ]


def target_lines(results: dict) -> list[str]:
    """The speed targets of the headline path, as measured (informational: the exit status is the checks')."""
    def rate(name: str) -> float | None:
        return results[name]["tokens_per_second"] if name in results else None

    full = [n for n in results if n != PLAIN and n != "bf16 resumed" and not n.startswith(("LoRA", "DPO"))]
    best = max(full, key=lambda n: results[n]["tokens_per_second"]) if full else None
    mfus = [(results[n]["mfu"], n) for n in full if results[n]["mfu"] is not None]
    wanted = [
        ("packed / bf16 padded tokens/s", rate("bf16 packed"), rate("bf16 padded"), 2.0),
        ("best full fine-tuning / plain loop tokens/s", rate(best) if best else None, rate(PLAIN), 5.0),
        ("DPO packed / DPO padded tokens/s", rate("DPO packed"), rate("DPO padded"), 2.0),
    ]
    lines = ["", "targets (informational)"]
    for label, a, b, goal in wanted:
        if a is not None and b:
            lines.append(f"{'met ' if a / b >= goal else 'miss'} {label:<46}{a / b:>11.2f}x  (>= {goal:g}x)")
    if mfus:
        mfu, name = max(mfus)
        lines.append(f"{'met ' if mfu >= 0.35 else 'miss'} {'best full fine-tuning MFU (' + name + ')':<46}{mfu:>12.1%}  (>= 35%)")
    if best and PLAIN in results:
        peak, plain = results[best]["peak_memory_gb"], results[PLAIN]["peak_memory_gb"]
        lines.append(f"{'met ' if peak <= plain else 'miss'} {'peak memory of ' + best + ' / plain loop':<46}"
                     f"{peak / max(plain, 1e-9):>11.2f}x  (<= 1x)")
    return lines


def table(results: dict, verdicts: list[tuple[str, bool, str]], device: str, seconds: dict, packed_kernel: str = "") -> str:
    names = list(results)
    width = max(14, max(len(n) for n in names) + 2)
    lines = [f"gpu_check on {device}" + (f"; packed cases on {packed_kernel}" if packed_kernel else ""), "",
             f"{'':<34}" + "".join(f"{n:>{width}}" for n in names)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<34}" + "".join(f"{v:>{width}}" for v in values))

    row("tokens/s (non-pad, median)", [f"{results[n]['tokens_per_second']:.0f}" for n in names])
    if PLAIN in results:
        row("x the plain loop", [f"{results[n]['tokens_per_second'] / results[PLAIN]['tokens_per_second']:.2f}" for n in names])
    row("MFU", [f"{results[n]['mfu']:.1%}" if results[n]["mfu"] is not None else "n/a" for n in names])
    row("peak memory GB (rank 0)", [f"{results[n]['peak_memory_gb']:.2f}" for n in names])
    row("wall seconds (launch to exit)", [f"{seconds[n]:.0f}" for n in names])
    for i in range(max(len(results[n]["losses"]) for n in names)):
        row(f"loss, update {i + 1}", [f"{results[n]['losses'][i]:.4f}" if i < len(results[n]["losses"]) else "-" for n in names])
    lines.append("")
    for label, ok, value in verdicts:
        lines.append(f"{'ok  ' if ok else 'FAIL'} {label:<46}{value:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, in-process")
    parser.add_argument("--out", type=Path, default=None, help="where runs go (default: a temporary directory)")
    parser.add_argument("--attn", default="varlen_attn", help="attention of the packed cases (e.g. sdpa_packed)")
    parser.add_argument("--compile", action="store_true", help="also the padded case with compile=true")
    parser.add_argument("--cases", default=None, help=f"comma-separated cases to run (default: all; {', '.join(REQUIRED)} "
                        "always run, the checks need them)")
    parser.add_argument("--budget-minutes", type=float, default=8.0,
                        help="skip an optional case once the elapsed time plus the slowest case so far would pass this")
    args = parser.parse_args(argv)
    size = "dry-run" if args.dry_run else "gpu"
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible; run with --dry-run to check the check on CPU")
        n_gpus, device = torch.cuda.device_count(), f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        attn = args.attn
    else:
        n_gpus, device = 0, "CPU (dry run)"
        attn = DRY_RUN_PACKED if args.attn == "varlen_attn" else args.attn  # varlen_attn's kernel is CUDA-only
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    model_config, rows, updates, stop, max_length = SIZES[size]
    model_dir = write_model_dir(out / "model", model_config)
    train, test = write_data(out / "data", rows, max_length // 2)
    base = common_args(size, model_dir, train, test, out)
    results, seconds, skipped = {}, {}, []
    chosen = cases(size, attn, args.compile)
    if args.cases:
        wanted = {n.strip() for n in args.cases.split(",")}
        unknown = wanted - set(chosen)
        if unknown:
            raise SystemExit(f"--cases: unknown {', '.join(sorted(unknown))}; choose from {', '.join(chosen)}")
        chosen = {n: c for n, c in chosen.items() if n in wanted or n in REQUIRED}
    began = time.perf_counter()
    for name, case in chosen.items():
        if name not in REQUIRED and seconds and \
                time.perf_counter() - began + max(seconds.values()) > args.budget_minutes * 60:
            skipped.append(name)  # the required cases come first, so the checks always have their runs
            continue
        run_dir = out / name.replace(" ", "_")
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        if name == PLAIN:
            results[name] = summarize(plain_loop([*base, f"run_dir={run_dir}"], model_dir, updates,
                                                 "cpu" if args.dry_run else "cuda", autocast=not args.dry_run))
            seconds[name] = time.perf_counter() - start
            continue
        for extra in case.invocations:
            argv_run = [*base, f"run_dir={run_dir}", *extra]
            if args.dry_run:
                run_in_process(argv_run, out / "log.txt", case.script)
            else:
                print(" ".join(launch_command(n_gpus, argv_run, case.script)), flush=True)
                run_launched(n_gpus, argv_run, out / "log.txt", case.script)
        seconds[name] = time.perf_counter() - start
        results[name] = summarize(train_rows(run_dir))
        for checkpoint in [p for p in run_dir.iterdir() if p.is_dir()]:  # keep metrics.jsonl, free the disk (~11 GB each)
            shutil.rmtree(checkpoint)
    verdicts = checks(results, stop)
    print(table(results, verdicts, device, seconds, attn + (" (CPU: varlen_attn needs CUDA)" if attn != args.attn else "")))
    print("\n".join(target_lines(results)))
    if skipped:
        print(f"skipped (--budget-minutes {args.budget_minutes:g}): {', '.join(skipped)}")
    (out / "gpu_check.json").write_text(json.dumps({"device": device, "packed_kernel": attn, "results": results,
                                                    "seconds": seconds, "checks": verdicts, "skipped": skipped}, indent=1))
    return 0 if all(ok for _, ok, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
