"""The reference model's log-probs of each pair, live or precomputed once and cached.

    reference_logps = ReferenceLogps(config, accelerator, reference_model, score, cache_dir)
    reference_logps.precompute({"train": (train_pairs, train_indices), "eval": (eval_pairs, None)})   # precompute only
    chosen, rejected = reference_logps("train", pairs, batch)                  # per pair, on the batch's device

`score(model, pairs, batch=None)` returns the summed log-probs (chosen, rejected) of `pairs` under `model`, collating them
when no batch is given. Live, every call runs the reference on the step's batch under no_grad. Precomputed, one pass scores
every pair of every split before training (each data-parallel process its share of each batch, then gathered), and the
values are written to `{cache_dir}/reference_logps/{split}-{key}.pt`. The key hashes what the numbers depend on: the
reference weights (the archive's content, else the base model and seed), reference_dtype, the tokenized pairs, and the
settings that change the arithmetic (packing, attention kernel, supervised-only logits, chunking). A different archive or
data therefore never reuses stale values; eval reads the same store as training, so it never scores with the policy.
Only the train pairs the run's batches hold are scored (a NaN marks a pair not scored yet); a later run or a resume with
more examples scores the missing ones and adds them to the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import broadcast_object_list

from training.config import Config
from training.distributed import data_parallel, gather_dp
from training.logger import console

FORMAT_VERSION = "reference-logps-v2"  # v2: log-probs summed along the padded row (modeling/loss.py example_sums)
CHUNK_BYTES = 1 << 24


class ReferenceLogps:
    def __init__(self, config: Config, accelerator, model, score: Callable, cache_dir: str | Path):
        self.config, self.accelerator, self.model, self.score = config, accelerator, model, score
        self.cache_dir = Path(cache_dir)
        self.store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, split: str, pairs: list[dict], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's (chosen, rejected) log-probs of `pairs` (each with its dataset `index`) in `split`."""
        if split in self.store:
            chosen, rejected = self.store[split]
            index = torch.tensor([p["index"] for p in pairs], dtype=torch.long)
            chosen, rejected = chosen[index], rejected[index]
            if torch.isnan(chosen).any() or torch.isnan(rejected).any():
                raise RuntimeError(f"{split} pairs {index[torch.isnan(chosen + rejected)].tolist()} were not precomputed")
            device = batch["input_ids"].device
            return chosen.to(device), rejected.to(device)
        if self.model is None:
            raise RuntimeError(f"no reference log-probs for split {split!r}: it was not precomputed and the reference is freed")
        with torch.no_grad():
            return self.score(self.model, pairs, batch)

    def precompute(self, splits: dict) -> None:
        """Fill the store so the reference model can be freed. `splits` maps a split name to (dataset, indices): the pairs
        the run will use (None: all). Cached values are reused; pairs not scored before are scored now and added."""
        for split, (dataset, indices) in splits.items():
            path = self.cache_dir / "reference_logps" / f"{split}-{self.key(dataset)}.pt"
            # The main process reads the file (a node-local cache exists on its node only) and shares the values, so every
            # process takes the same branch below (scoring is collective).
            saved = torch.load(path, map_location="cpu", weights_only=True) if self.accelerator.is_main_process and path.is_file() else None
            if self.accelerator.num_processes > 1:
                saved = broadcast_object_list([saved])[0]
            if saved is not None:
                chosen, rejected = saved["chosen"], saved["rejected"]
            else:
                chosen, rejected = torch.full((len(dataset),), float("nan")), torch.full((len(dataset),), float("nan"))
            wanted = sorted(set(range(len(dataset)) if indices is None else indices))
            missing = [i for i in wanted if torch.isnan(chosen[i]) or torch.isnan(rejected[i])]
            if missing:
                start = time.perf_counter()
                chosen[missing], rejected[missing] = self.score_all(dataset, missing)
                if self.accelerator.is_main_process:
                    write_atomic({"chosen": chosen, "rejected": rejected}, path)
                    console.print(f"reference log-probs of {len(missing)} {split} pairs computed in "
                                  f"{time.perf_counter() - start:.1f}s and cached at {path}", soft_wrap=True, highlight=False)
                self.accelerator.wait_for_everyone()
            elif self.accelerator.is_main_process:
                console.print(f"reference log-probs of {len(wanted)} {split} pairs read from {path}", soft_wrap=True, highlight=False)
            self.store[split] = (chosen, rejected)

    def score_all(self, dataset, wanted: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs `wanted` of `dataset`, in batches of eval_batch_size pairs, each split over the data-parallel processes."""
        rank, world = data_parallel(self.accelerator)
        chosen, rejected = [], []
        size = self.config.eval_batch_size
        for start in range(0, len(wanted), size):
            indices = wanted[start:start + size]
            local = -(-len(indices) // world)
            padded = indices + indices[-1:] * (local * world - len(indices))  # equal shares: every process runs each forward
            mine = [{**dataset[i], "index": i} for i in padded[rank * local:(rank + 1) * local]]
            c, r = self.score(self.model, mine)
            chosen.append(gather_dp(self.accelerator, c.float())[: len(indices)].cpu())
            rejected.append(gather_dp(self.accelerator, r.float())[: len(indices)].cpu())
        return torch.cat(chosen), torch.cat(rejected)

    def key(self, dataset) -> str:
        c, m = self.config, self.config.model
        weights = {"archive": file_digest(m.archive, self.cache_dir) if m.archive else None, "model": m.name_or_path,
                   "random_init_seed": c.seed if m.random_init and not m.archive else None}
        settings = {"reference_dtype": m.reference_dtype, "attn": m.attn_implementation, "packing": c.packing,
                    "max_length": c.max_length, "supervised_only": c.loss.supervised_logits_only,
                    "chunk": c.loss.logits_chunk_tokens}
        h = hashlib.sha256(json.dumps([FORMAT_VERSION, weights, settings], sort_keys=True).encode())
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            h.update(column.encode() + b"\0")
            for start in range(0, len(dataset), 10_000):
                h.update(json.dumps(dataset[start:start + 10_000][column]).encode())
        return h.hexdigest()[:24]


def file_digest(path: str | Path, cache_dir: Path) -> str:
    """sha256 of a file's content, remembered per (path, size, mtime) so a large archive is read once."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_path = cache_dir / "reference_logps" / "digests.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    tag = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    if tag not in memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                h.update(block)
        memo[tag] = h.hexdigest()
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f"{memo_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    return memo[tag]


def write_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
