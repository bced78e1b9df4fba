"""Generic local preference/SFT data -> canonical records (dataset kind `jsonl`).

    from data.local import load_jsonl
    records = load_jsonl("train", files=["my-data/train-*.jsonl"])

Each row is `{"prompt": str, "chosen": str}` with an optional `"rejected": str`; the prompt is used verbatim (include
any turn markers yourself) and the responses follow it directly. Rows with the same prompt merge as in hh: responses
extend, a (chosen, rejected) pair is added when the row has `rejected`, and the SFT target is the last row's `chosen`.
The files are the split, so `split` only names it in messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from data.files import DataError, iter_rows, no_files_error, resolve_paths, require_str

if TYPE_CHECKING:
    from data.records import Record


def jsonl_records(rows: Iterable[tuple[str, dict]]) -> dict[str, Record]:
    """Records in first-occurrence order of their prompt."""
    records: dict[str, Record] = {}
    for where, row in rows:
        if "messages" in row and "prompt" not in row:
            raise DataError(
                f"{where}: rows in the chat `messages` format need the tokenizer's chat template and are read by the"
                " tokenization layer, not as prompt/chosen records"
            )
        prompt = require_str(where, row, "prompt")
        chosen = require_str(where, row, "chosen")
        record = records.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": ""})
        n = len(record["responses"])
        if "rejected" in row and row["rejected"] is not None:
            record["responses"].extend([chosen, require_str(where, row, "rejected")])
            record["pairs"].append((n, n + 1))
        else:
            record["responses"].append(chosen)
        record["sft_target"] = chosen
    return records


def load_jsonl(split: str, files: list[str] | None = None, cache_dir: str | None = None) -> dict[str, Record]:
    """Records of local files; `cache_dir` is unused (there is no hub dataset behind this kind)."""
    if files is None:
        raise no_files_error("jsonl", split)
    return jsonl_records(iter_rows(resolve_paths(files)))
