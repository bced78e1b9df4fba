"""Anthropic HH-RLHF rows -> canonical records (prompt -> responses, preference pairs, SFT target).

    from data.hh import load_hh
    records = load_hh("test", files=["harmless-base-test.jsonl.gz"])  # or files=None for the hub dataset
    prompt, record = next(iter(records.items()))  # prompt ends with "\\n\\nAssistant:"

Each row is `{"chosen": transcript, "rejected": transcript}`. The prompt is `chosen` up to and including its last
"\\n\\nAssistant:"; both responses are the text after that many characters, unstripped. Rows with the same prompt merge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from data.files import DataError, require_str, split_rows

if TYPE_CHECKING:
    from data.records import Record

HUB_NAME = "Anthropic/hh-rlhf"
ASSISTANT_TURN = "\n\nAssistant:"


def split_transcript(where: str, chosen: str) -> str:
    """The prompt of a transcript: everything up to and including the last assistant turn marker."""
    end = chosen.rfind(ASSISTANT_TURN)
    if end == -1:
        raise DataError(f"{where}: 'chosen' has no {ASSISTANT_TURN!r} turn, so no prompt can be cut from it")
    return chosen[: end + len(ASSISTANT_TURN)]


def hh_records(rows: Iterable[tuple[str, dict]]) -> dict[str, Record]:
    """Records in first-occurrence order of their prompt; a repeated prompt adds its pair and takes the last chosen."""
    records: dict[str, Record] = {}
    for where, row in rows:
        chosen = require_str(where, row, "chosen")
        rejected = require_str(where, row, "rejected")
        prompt = split_transcript(where, chosen)
        # Like the reference, `rejected` is cut at the chosen prompt's length without checking it shares that prompt.
        chosen_response, rejected_response = chosen[len(prompt) :], rejected[len(prompt) :]
        record = records.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": ""})
        n = len(record["responses"])
        record["pairs"].append((n, n + 1))
        record["responses"].extend([chosen_response, rejected_response])
        record["sft_target"] = chosen_response
    return records


def load_hh(split: str, files: list[str] | None = None, cache_dir: str | None = None) -> dict[str, Record]:
    """Records of one split: from local files (the rows of that split) or, with files=None, from the hub dataset."""
    return hh_records(split_rows(HUB_NAME, split, files, cache_dir))
