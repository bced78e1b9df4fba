"""GPU check of the headline path (FSDP2 + bf16) on the visible NVIDIA GPUs: one table, in under 8 minutes on one GPU.

    python benchmarks/gpu_check.py                       # GPU machine: every case through `accelerate launch`, one table
    python benchmarks/gpu_check.py --out /tmp/check      # keep the runs' metrics.jsonl there (checkpoints are deleted)
    python benchmarks/gpu_check.py --dry-run             # CPU, tiny model, in-process, 4 steps: checks the check itself
    python benchmarks/gpu_check.py --compile             # also bf16 padded and packed with compile=true (compile time on top)

Needs torch with CUDA, transformers and accelerate, plus the rest of requirements.txt that the training script imports
(datasets, tokenizers, safetensors, pyyaml, rich, numpy, matplotlib); flash-attn is optional (`--attn flash_attention_2`
packs into one varlen row). No network: the model is a Llama of about 1B parameters built from a config with random
weights (hidden 2048, 16 layers, 16 heads, MLP 5632, vocab 32,000), the tokenizer is recipes/demo's, and the data are
synthetic HH-format dialogues of varied length (16 to 512 tokens) written by this script. Disk: one LATEST checkpoint
at a time (policy.pt 3.8 GB and the sharded resume state, 7.6 GB with RMSprop), deleted once its case is read.

Every GPU case is the real command on the real script:

    accelerate launch --config_file accelerate_configs/fsdp_8gpu.yaml --num_processes <visible GPUs> sft_train.py <args>

Cases, all from the same random weights on the same batches (global batch 32, RMSprop lr 1e-5, max_length 512):
  bf16 padded   model.fsdp_policy_mp=bfloat16, right padding, sdpa; 10 updates
  bf16 packed   the same with packing=true (sdpa_packed, or --attn)
  fp32 padded   model.fsdp_policy_mp=null: float32 compute (TF32 matmuls, allow_tf32=true)
  bf16 resumed  bf16 padded stopped after 5 updates (max_updates_this_run=5 saves LATEST), then resume_from=auto
The table: tokens/s (non-pad, median of updates 3..), MFU, peak GPU memory of rank 0, the train loss of every update
side by side, and the checks: bf16 within 2% of fp32 at update 1 and 5% after, packed within 2% of padded at update 1,
the resumed run's first loss equal to the uninterrupted run's at that update (relative 1e-4); with --compile, each compiled
case within 2% of its eager case at every update (bf16: the compiled kernels round differently). Exit status 1 if a check fails.
In --dry-run the "bf16" cases compute in float32 (fsdp_policy_mp applies only under FSDP) and nothing is launched.
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


def cases(size: str, attn: str, compile_too: bool = False) -> dict[str, list[list[str]]]:
    """name -> the argument lists of its invocations (two for the stopped-and-resumed run)."""
    stop = SIZES[size][3]
    bf16 = ["model.fsdp_policy_mp=bfloat16", "model.attn_implementation=sdpa", "packing=false"]
    runs = {
        "bf16 padded": [bf16],
        "bf16 packed": [["model.fsdp_policy_mp=bfloat16", f"model.attn_implementation={attn}", "packing=true"]],
        "fp32 padded": [["model.fsdp_policy_mp=null", "model.attn_implementation=sdpa", "packing=false"]],
        "bf16 resumed": [[*bf16, f"max_updates_this_run={stop}"], [*bf16, "resume_from=auto"]],
    }
    if compile_too:  # --compile: the padded and packed cases again under compile=true
        runs["bf16 padded+compile"] = [[*bf16, "compile=true"]]
        runs["bf16 packed+compile"] = [[*runs["bf16 packed"][0], "compile=true"]]
    return runs


def launch_command(n_gpus: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIG), "--num_processes",
            str(n_gpus), "--main_process_port", "0", str(REPO / "sft_train.py"), *args]


def run_launched(n_gpus: int, args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    with open(log, "a") as f:
        result = subprocess.run(launch_command(n_gpus, args), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"a run failed (exit {result.returncode}); its output: {log}\n{tail(log)}")


def run_in_process(args: list[str], log: Path) -> None:
    import contextlib

    from accelerate.state import AcceleratorState, GradientState

    import sft_train

    AcceleratorState._reset_state(True)  # each run builds its own Accelerator, as a launched process would
    GradientState._reset_state()
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        sft_train.main(args)


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss/train" in r]


def summarize(rows: list[dict]) -> dict:
    timed = rows[2:] or rows  # the first updates include compilation of kernels and allocator warm-up
    mfu = [r["mfu"] for r in timed if "mfu" in r]
    return {"losses": [r["loss/train"] for r in rows], "tokens_per_second": statistics.median(r["tokens_per_second"] for r in timed),
            "mfu": statistics.median(mfu) if mfu else None, "peak_memory_gb": max(r["peak_memory_gb"] for r in rows)}


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def checks(results: dict, stop: int) -> list[tuple[str, bool, str]]:
    bf16, fp32 = results["bf16 padded"]["losses"], results["fp32 padded"]["losses"]
    packed, resumed = results["bf16 packed"]["losses"], results["bf16 resumed"]["losses"]
    gaps = [relative(a, b) for a, b in zip(bf16, fp32)]
    compiled = [(f"{name}+compile vs eager, worst update", max(map(relative, results[f"{name}+compile"]["losses"],
                                                                     results[name]["losses"])))
                for name in ("bf16 padded", "bf16 packed") if f"{name}+compile" in results]
    return [
        ("bf16 vs fp32 loss, update 1", gaps[0] <= 0.02, f"{gaps[0]:.2e}"),
        ("bf16 vs fp32 loss, worst update", max(gaps) <= 0.05, f"{max(gaps):.2e}"),
        ("packed vs padded loss, update 1", relative(packed[0], bf16[0]) <= 0.02, f"{relative(packed[0], bf16[0]):.2e}"),
        ("same updates in every case", len({len(bf16), len(fp32), len(packed), len(resumed)}) == 1, f"{len(bf16)}"),
        (f"resumed loss at update {stop + 1} = uninterrupted", relative(resumed[stop], bf16[stop]) <= 1e-4,
         f"{relative(resumed[stop], bf16[stop]):.2e}"),
        *[(label, gap <= 0.02, f"{gap:.2e}") for label, gap in compiled],
    ]


def table(results: dict, verdicts: list[tuple[str, bool, str]], device: str, seconds: dict) -> str:
    names = list(results)
    width = max(14, max(len(n) for n in names) + 2)
    lines = [f"gpu_check on {device}", "", f"{'':<34}" + "".join(f"{n:>{width}}" for n in names)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<34}" + "".join(f"{v:>{width}}" for v in values))

    row("tokens/s (non-pad, median)", [f"{results[n]['tokens_per_second']:.0f}" for n in names])
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
    parser.add_argument("--attn", default="sdpa_packed", help="attention of the packed case (e.g. flash_attention_2)")
    parser.add_argument("--compile", action="store_true", help="also the padded and packed cases with compile=true")
    args = parser.parse_args(argv)
    size = "dry-run" if args.dry_run else "gpu"
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible; run with --dry-run to check the check on CPU")
        n_gpus, device = torch.cuda.device_count(), f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        n_gpus, device = 0, "CPU (dry run)"
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    model_config, rows, _, stop, max_length = SIZES[size]
    model_dir = write_model_dir(out / "model", model_config)
    train, test = write_data(out / "data", rows, max_length // 2)
    base = common_args(size, model_dir, train, test, out)
    results, seconds = {}, {}
    for name, invocations in cases(size, args.attn, args.compile).items():
        run_dir = out / name.replace(" ", "_")
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        for extra in invocations:
            argv_run = [*base, f"run_dir={run_dir}", *extra]
            if args.dry_run:
                run_in_process(argv_run, out / "log.txt")
            else:
                print(" ".join(launch_command(n_gpus, argv_run)), flush=True)
                run_launched(n_gpus, argv_run, out / "log.txt")
        seconds[name] = time.perf_counter() - start
        results[name] = summarize(train_rows(run_dir))
        for checkpoint in [p for p in run_dir.iterdir() if p.is_dir()]:  # keep metrics.jsonl, free the disk (~11 GB each)
            shutil.rmtree(checkpoint)
    verdicts = checks(results, stop)
    print(table(results, verdicts, device, seconds))
    (out / "gpu_check.json").write_text(json.dumps({"device": device, "results": results, "seconds": seconds,
                                                    "checks": verdicts}, indent=1))
    return 0 if all(ok for _, ok, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
