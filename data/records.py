"""Canonical preference records for every dataset, by name.

    from data.records import load_records, TRUNCATION_MODE
    records = load_records("hh", "test")                                # hub dataset Anthropic/hh-rlhf
    records = load_records("hh", "test", files=["hh/test-*.jsonl.gz"])  # local files with the hub's row schema
    for prompt, r in records.items():   # first-occurrence order of the prompt
        r["responses"], r["pairs"], r["sft_target"]  # pairs are (index preferred, index other) into responses

Names: hh, shp, se (hub datasets or local copies of their rows) and jsonl (local rows of prompt/chosen[/rejected]).
`TRUNCATION_MODE[name]` says which end of an over-long prompt to keep.

With a `cache_dir`, records of hub sources and of local StackExchange files (CACHED_LOCAL) are cached in
`{cache_dir}/records/{key}`, keyed by dataset, split, the source's content (local files) or fingerprint (hub revision) and
RECORDS_VERSION: StackExchange's HTML cleaning (2.4 h on one core) is done once, not by every process of every run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, TypedDict

from data import hh, se, shp
from data.cache import read_entry, write_entry
from data.files import DataError, no_files_error, resolve_paths
from data.hh import load_hh
from data.local import load_jsonl
from data.se import load_se
from data.shp import load_shp

RECORDS_VERSION = "r1"  # bump when a loader's rules change, so old cache entries are not reused


class Record(TypedDict):
    responses: list[str]
    pairs: list[tuple[int, int]]  # (index of the preferred response, index of the other)
    sft_target: str


LOADERS: dict[str, Callable[[str, list[str] | None, str | None], dict[str, Record]]] = {
    "hh": load_hh,
    "shp": load_shp,
    "se": load_se,
    "jsonl": load_jsonl,
}

# hh prompts are long multi-turn transcripts whose end (the last human turn) matters most; the rest keep their start.
TRUNCATION_MODE: dict[str, str] = {name: "keep_end" if name == "hh" else "keep_start" for name in LOADERS}


# Loaders whose per-row work (HTML cleaning) is worth spreading over processes.
PARALLEL = {"se"}
# Loaders whose local files are worth a records entry. The others' files parse about as fast as their entry reads back
# (2,312 HH rows: 75 ms parsed, 54 ms read back, 130 ms parsed and written), so for them an entry would only slow the first
# build; hub sources are always cached (the hub dataset is loaded and iterated row by row).
CACHED_LOCAL = {"se"}


def load_records(
    name: str, split: str, files: list[str] | None = None, cache_dir: str | None = None, num_proc: int | None = None
) -> dict[str, Record]:
    """Records of dataset `name`, split `split`: from the hub (files=None) or from local files/globs of its rows."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(LOADERS)}")
    paths = None if files is None else resolve_paths(files)
    cached = cache_dir is not None and (paths is None or name in CACHED_LOCAL)
    path = Path(cache_dir, "records", records_key(name, split, paths, cache_dir)) if cached else None
    records = read_entry(path, _load) if path is not None else None
    if records is None:
        records = LOADERS[name](split, paths, cache_dir, **({"num_proc": num_proc} if name in PARALLEL else {}))
        if path is not None and records:
            write_entry(path, lambda tmp: _save(records, tmp))
    if not records:
        source = "the hub" if paths is None else f"files {paths}"
        message = f"dataset {name!r} split {split!r} from {source} produced no records"
        if name == "shp":
            message += " (rows are kept only when max(score_A/score_B, score_B/score_A) >= 2; the filter removed all)"
        raise DataError(message)
    return records


HUB_SOURCES = {"hh": (hh.HUB_NAME, None), "shp": (shp.HUB_NAME, None), "se": (se.HUB_NAME, "train")}  # (name, split read)


def records_key(name: str, split: str, paths: list[str] | None, cache_dir: str | None) -> str:
    """Dataset, split, loader version and the source: the bytes of local files in order, or the hub dataset's fingerprint."""
    h = hashlib.sha256(f"{RECORDS_VERSION}|{name}|{split}".encode())
    if paths is not None:
        for p in paths:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            h.update(b"\0")
    else:
        if name not in HUB_SOURCES:
            raise no_files_error(name, split)
        import datasets  # imported here: slow

        hub_name, hub_split = HUB_SOURCES[name]
        h.update(datasets.load_dataset(hub_name, split=hub_split or split, cache_dir=cache_dir)._fingerprint.encode())
    return h.hexdigest()[:24]


def _save(records: dict[str, Record], tmp: Path) -> None:
    with open(tmp / "records.jsonl", "w", encoding="utf-8") as f:
        for prompt, r in records.items():
            f.write(json.dumps([prompt, r["responses"], r["pairs"], r["sft_target"]], ensure_ascii=False) + "\n")
    (tmp / "count.json").write_text(json.dumps(len(records)))


def _load(path: Path) -> dict[str, Record]:
    records: dict[str, Record] = {}
    with open(path / "records.jsonl", encoding="utf-8") as f:
        for line in f:
            prompt, responses, pairs, sft_target = json.loads(line)
            records[prompt] = {"responses": responses, "pairs": [tuple(p) for p in pairs], "sft_target": sft_target}
    if len(records) != json.loads((path / "count.json").read_text()):
        raise ValueError("truncated")
    return records
