"""Canonical preference records for every dataset, by name.

    from data.records import load_records, TRUNCATION_MODE
    records = load_records("hh", "test")                                # hub dataset Anthropic/hh-rlhf
    records = load_records("hh", "test", files=["hh/test-*.jsonl.gz"])  # local files with the hub's row schema
    for prompt, r in records.items():   # first-occurrence order of the prompt
        r["responses"], r["pairs"], r["sft_target"]  # pairs are (index preferred, index other) into responses

Names: hh, shp, se (hub datasets or local copies of their rows) and jsonl (local rows of prompt/chosen[/rejected]).
`TRUNCATION_MODE[name]` says which end of an over-long prompt to keep.
"""

from typing import Callable, TypedDict

from data.files import DataError, resolve_paths
from data.hh import load_hh
from data.local import load_jsonl
from data.se import load_se
from data.shp import load_shp


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


def load_records(
    name: str, split: str, files: list[str] | None = None, cache_dir: str | None = None, num_proc: int | None = None
) -> dict[str, Record]:
    """Records of dataset `name`, split `split`: from the hub (files=None) or from local files/globs of its rows."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(LOADERS)}")
    paths = None if files is None else resolve_paths(files)
    records = LOADERS[name](split, paths, cache_dir, **({"num_proc": num_proc} if name in PARALLEL else {}))
    if not records:
        source = "the hub" if paths is None else f"files {paths}"
        message = f"dataset {name!r} split {split!r} from {source} produced no records"
        if name == "shp":
            message += " (rows are kept only when max(score_A/score_B, score_B/score_A) >= 2; the filter removed all)"
        raise DataError(message)
    return records
