"""Stanford Human Preferences (SHP) rows -> canonical records.

    from data.shp import load_shp
    records = load_shp("train")                          # hub dataset stanfordnlp/SHP
    records = load_shp("test", files=["shp-test.jsonl"])  # local rows with the hub's fields

A row has `history`, `human_ref_A`, `human_ref_B`, `score_A`, `score_B` and `labels` (1: A preferred). The prompt is
"\\n\\nHuman: " + history + "\\n\\nAssistant:", the responses " " + each reference. Only rows whose scores differ by a
factor of at least 2 are kept; rows with the same history merge. The SFT target is the best-scored response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from data.files import DataError, require_number, require_str, split_rows

if TYPE_CHECKING:
    from data.records import Record

HUB_NAME = "stanfordnlp/SHP"
MIN_SCORE_RATIO = 2


def shp_records(rows: Iterable[tuple[str, dict]]) -> dict[str, Record]:
    """Records in the order of each prompt's first kept row."""
    records: dict[str, Record] = {}
    scores_by_prompt: dict[str, list[int | float]] = {}
    for where, row in rows:
        history = require_str(where, row, "history")
        ref_a, ref_b = require_str(where, row, "human_ref_A"), require_str(where, row, "human_ref_B")
        score_a, score_b = require_number(where, row, "score_A"), require_number(where, row, "score_B")
        label = row.get("labels")
        if isinstance(label, bool) or label not in (0, 1):
            raise DataError(f"{where}: field 'labels' must be 0 or 1, got {label!r}")
        if score_a <= 0 or score_b <= 0:
            raise DataError(f"{where}: scores must be positive to take their ratio, got {score_a} and {score_b}")
        # Division, not cross-multiplication, so float scores round exactly as the reference's filter does.
        if max(score_a / score_b, score_b / score_a) < MIN_SCORE_RATIO:
            continue
        prompt = "\n\nHuman: " + history + "\n\nAssistant:"
        record = records.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": ""})
        n = len(record["responses"])
        # The direction follows the human label, which can disagree with the scores.
        record["pairs"].append((n, n + 1) if label == 1 else (n + 1, n))
        record["responses"].extend([" " + ref_a, " " + ref_b])
        scores_by_prompt.setdefault(prompt, []).extend([score_a, score_b])
    for prompt, record in records.items():
        responses, scores = record["responses"], scores_by_prompt[prompt]
        # A response text that repeats is ranked by the score of its first occurrence; max() keeps the first on ties.
        record["sft_target"] = max(responses, key=lambda text: scores[responses.index(text)])
    return records


def load_shp(split: str, files: list[str] | None = None, cache_dir: str | None = None) -> dict[str, Record]:
    """Records of one split: from local files (the rows of that split) or, with files=None, from the hub dataset."""
    return shp_records(split_rows(HUB_NAME, split, files, cache_dir))
