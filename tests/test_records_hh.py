"""hh records and the local file reader: exact match with the reference on real rows, merging, errors, file formats.

    python -m pytest tests/test_records_hh.py -q
"""

import gzip
import json
from pathlib import Path

import pytest

from data.files import DataError, iter_rows, resolve_paths
from data.hh import hh_records
from data.records import TRUNCATION_MODE, load_records

SHARED = Path(__file__).resolve().parents[2] / "shared"
HH300 = SHARED / "data" / "hh" / "harmless-base-test-300.jsonl.gz"
HH300_RECORDS = SHARED / "data" / "reference" / "hh300_records.jsonl"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def row(human: str, chosen: str, rejected: str) -> dict:
    prompt = f"\n\nHuman: {human}\n\nAssistant:"
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


@pytest.fixture
def hh300() -> dict:
    if not HH300.exists() or not HH300_RECORDS.exists():
        pytest.skip(f"shared HH sample not found under {SHARED}")
    return load_records("hh", "test", files=[str(HH300)])


def test_hh300_matches_reference_records_exactly(hh300):
    reference = [json.loads(line) for line in HH300_RECORDS.read_text().splitlines()]
    assert list(hh300) == [r["prompt"] for r in reference]
    for expected in reference:
        record = hh300[expected["prompt"]]
        assert record["responses"] == expected["responses"]
        assert record["pairs"] == [tuple(p) for p in expected["pairs"]]
        assert record["sft_target"] == expected["sft_target"]


def test_hh300_prompts_and_targets(hh300):
    assert len(hh300) == 300
    for prompt, record in hh300.items():
        assert prompt.endswith("\n\nAssistant:")
        assert record["sft_target"] != ""
        assert record["sft_target"] == record["responses"][record["pairs"][-1][0]]


def test_prompt_is_cut_at_the_last_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:go away"
    records = hh_records([("x:1", {"chosen": chosen, "rejected": rejected})])
    assert records == {
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:": {
            "responses": [" see you", "go away"],
            "pairs": [(0, 1)],
            "sft_target": " see you",
        }
    }


def test_repeated_prompts_merge_in_first_occurrence_order():
    rows = [row("a", " A1", " a1"), row("b", " B1", " b1"), row("a", " A2", " a2"), row("a", " A3", " a3")]
    records = hh_records((f"x:{i + 1}", r) for i, r in enumerate(rows))
    assert list(records) == ["\n\nHuman: a\n\nAssistant:", "\n\nHuman: b\n\nAssistant:"]
    assert records["\n\nHuman: a\n\nAssistant:"] == {
        "responses": [" A1", " a1", " A2", " a2", " A3", " a3"],
        "pairs": [(0, 1), (2, 3), (4, 5)],
        "sft_target": " A3",  # the last row's chosen response
    }
    assert records["\n\nHuman: b\n\nAssistant:"]["pairs"] == [(0, 1)]


def test_rejected_is_cut_at_the_chosen_prompt_length():
    # The reference never checks that `rejected` shares the prompt; it just slices at the same length.
    prompt = "\n\nHuman: q\n\nAssistant:"  # 22 characters
    records = hh_records([("x:1", {"chosen": prompt + " yes", "rejected": "\n\nHuman: other\n\nAssistant: no"})])
    # rejected's first 22 characters are "\n\nHuman: other\n\nAssist" (2 + 12 + 2 + 6), so "ant: no" is left.
    assert records[prompt]["responses"] == [" yes", "ant: no"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a", "rejected": ', "not valid JSON"),
        ('{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a"}', "missing field 'rejected'"),
        ('{"chosen": 5, "rejected": "x"}', "field 'chosen' must be a string, got int"),
        ('{"chosen": "\\n\\nHuman: q\\n\\nHelper: a", "rejected": "x"}', "no '\\\\n\\\\nAssistant:' turn"),
        ('["not", "an", "object"]', "expected a JSON object, got list"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    good = json.dumps(row("q", " a", " b"))
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")  # the blank line 2 still counts, so the bad row is line 3
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{message}"):
        load_records("hh", "test", files=[str(path)])


def test_gzip_glob_list_and_json_array(tmp_path):
    rows = [row(f"q{i}", f" c{i}", f" r{i}") for i in range(5)]
    with gzip.open(tmp_path / "part-1.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[2:4]))
    write_jsonl(tmp_path / "part-0.jsonl", rows[:2])
    (tmp_path / "part-2.json").write_text(json.dumps(rows[4:], indent=2))

    # A glob expands sorted by name; the file types mix freely.
    names = ["part-0.jsonl", "part-1.jsonl.gz", "part-2.json"]
    assert resolve_paths(str(tmp_path / "part-*")) == [str(tmp_path / name) for name in names]
    records = load_records("hh", "train", files=[str(tmp_path / "part-*")])
    assert list(records) == [f"\n\nHuman: q{i}\n\nAssistant:" for i in range(5)]
    assert [r["sft_target"] for r in records.values()] == [f" c{i}" for i in range(5)]

    # An explicit list keeps its own order.
    records = load_records("hh", "train", files=[str(tmp_path / "part-2.json"), str(tmp_path / "part-0.jsonl")])
    assert list(records) == [f"\n\nHuman: q{i}\n\nAssistant:" for i in (4, 0, 1)]

    wheres = [where for where, _ in iter_rows(resolve_paths(str(tmp_path / "part-*")))]
    assert wheres == [
        f"{tmp_path}/part-0.jsonl:1",
        f"{tmp_path}/part-0.jsonl:2",
        f"{tmp_path}/part-1.jsonl.gz:1",
        f"{tmp_path}/part-1.jsonl.gz:2",
        f"{tmp_path}/part-2.json:[0]",
    ]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [row("p", " c0", " r0"), row("q", " c1", " r1"), row("p", " c2", " r2")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hh.parquet")
    records = load_records("hh", "train", files=[str(tmp_path / "hh.parquet")])
    assert records == {
        "\n\nHuman: p\n\nAssistant:": {
            "responses": [" c0", " r0", " c2", " r2"],
            "pairs": [(0, 1), (2, 3)],
            "sft_target": " c2",
        },
        "\n\nHuman: q\n\nAssistant:": {"responses": [" c1", " r1"], "pairs": [(0, 1)], "sft_target": " c1"},
    }

    bad_rows = [row("p", " c", " r"), {"chosen": "\n\nHuman: q\n\nAssistant: c", "rejected": None}]
    pq.write_table(pa.Table.from_pylist(bad_rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:row 1: field 'rejected' must be a string, got NoneType"):
        load_records("hh", "train", files=[str(tmp_path / "bad.parquet")])


def test_missing_files_unknown_name_and_empty_result(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_records("hh", "test", files=[str(tmp_path / "nothing-here-*.jsonl")])
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_records("hh", "test", files=[str(tmp_path / "absent.jsonl")])
    with pytest.raises(ValueError, match="unknown dataset 'hhh'; valid names: hh, shp, se, jsonl"):
        load_records("hhh", "test", files=[])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"dataset 'hh' split 'test' from files .*empty\.jsonl.* produced no records"):
        load_records("hh", "test", files=[str(tmp_path / "empty.jsonl")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file type"):
        load_records("hh", "test", files=[str(tmp_path / "x.csv")])


def test_truncation_modes():
    assert TRUNCATION_MODE == {"hh": "keep_end", "shp": "keep_start", "se": "keep_start", "jsonl": "keep_start"}
