"""The generic local `jsonl` kind: prompt/chosen[/rejected] rows -> records.

    python -m pytest tests/test_records_local.py -q
"""

import json
from pathlib import Path

import pytest

from data.files import DataError
from data.records import load_records


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_rows_with_and_without_rejected_merge_by_prompt(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "P1", "chosen": "c1", "rejected": "r1"},
            {"prompt": "P2", "chosen": "sft only"},
            {"prompt": "P1", "chosen": "c2"},  # no rejected: one more response, no pair
            {"prompt": "P1", "chosen": "c3", "rejected": "r3", "extra": 1},  # unknown fields are ignored
            {"prompt": "P2", "chosen": "c4", "rejected": None},  # null rejected = absent
        ],
    )
    records = load_records("jsonl", "train", files=[path])
    assert list(records) == ["P1", "P2"]
    assert records["P1"] == {"responses": ["c1", "r1", "c2", "c3", "r3"], "pairs": [(0, 1), (3, 4)], "sft_target": "c3"}
    assert records["P2"] == {"responses": ["sft only", "c4"], "pairs": [], "sft_target": "c4"}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "`messages` format need the tokenizer's chat template"),
        ({"chosen": "c"}, "missing field 'prompt'"),
        ({"prompt": "p", "chosen": ["c"]}, "field 'chosen' must be a string, got list"),
        ({"prompt": "p", "chosen": "c", "rejected": 3}, "field 'rejected' must be a string, got int"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "chosen": "c"}, row])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{message}"):
        load_records("jsonl", "train", files=[path])


def test_needs_files():
    with pytest.raises(DataError, match=r"datasets=\[jsonl\] reads your own files and none are given for the train split"):
        load_records("jsonl", "train")
