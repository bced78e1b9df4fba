"""shp and se records from hand-built rows: filter, pair direction, merging, targets, HTML cleaning and the 1 % split.

    python -m pytest tests/test_records_shp_se.py -q
"""

import json
from pathlib import Path

import pytest

from data.files import DataError
from data.records import load_records
from data.se import clean_html, se_records
from data.shp import shp_records


def shp_row(history: str, a: str, b: str, score_a: float, score_b: float, label: int) -> dict:
    return {
        "history": history,
        "human_ref_A": a,
        "human_ref_B": b,
        "score_A": score_a,
        "score_B": score_b,
        "labels": label,
    }


def prompt(text: str) -> str:
    return "\n\nHuman: " + text + "\n\nAssistant:"


def numbered(rows: list[dict]) -> list[tuple[str, dict]]:
    return [(f"rows.jsonl:{i + 1}", row) for i, row in enumerate(rows)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_shp_ratio_filter_direction_merge_and_targets():
    rows = [
        shp_row("late", "l1", "l2", 3, 2, 1),  # ratio 1.5: dropped, so "late" is placed by its later kept row
        shp_row("h1", "a", "b", 2, 1, 1),  # ratio exactly 2.0: kept
        shp_row("h2", "x", "y", 199, 100, 1),  # ratio 1.99: dropped
        shp_row("h3", "low", "high", 1, 10, 1),  # label says A although B scored higher: the label decides the pair
        shp_row("late", "l3", "l4", 100, 200, 0),  # B/A = 2.0: kept
        shp_row("h1", "c", "d", 3, 9, 0),  # merges into h1 after its two responses
    ]
    records = shp_records(numbered(rows))
    assert list(records) == [prompt("h1"), prompt("h3"), prompt("late")]
    assert records[prompt("h1")] == {
        "responses": [" a", " b", " c", " d"],
        "pairs": [(0, 1), (3, 2)],
        "sft_target": " d",  # scores 2, 1, 3, 9
    }
    assert records[prompt("h3")] == {"responses": [" low", " high"], "pairs": [(0, 1)], "sft_target": " high"}
    assert records[prompt("late")] == {"responses": [" l3", " l4"], "pairs": [(1, 0)], "sft_target": " l4"}


def test_shp_target_ties_and_repeated_texts():
    rows = [
        shp_row("tie", "x", "y", 10, 5, 1),
        shp_row("tie", "z", "w", 10, 1, 1),  # " z" ties " x" at 10: the first wins
        shp_row("dup", "same", "other", 1, 4, 0),
        shp_row("dup", "same", "low", 100, 2, 1),  # " same" is ranked by its first score (1), not 100
    ]
    records = shp_records(numbered(rows))
    assert records[prompt("tie")]["sft_target"] == " x"
    assert records[prompt("dup")] == {
        "responses": [" same", " other", " same", " low"],
        "pairs": [(1, 0), (2, 3)],
        "sft_target": " other",  # first-occurrence scores: same 1, other 4, low 2
    }


def test_shp_bad_rows_and_all_filtered(tmp_path):
    with pytest.raises(DataError, match=r"rows\.jsonl:2: field 'labels' must be 0 or 1, got 2"):
        shp_records(numbered([shp_row("a", "b", "c", 4, 1, 1), shp_row("a", "b", "c", 4, 1, 2)]))
    with pytest.raises(DataError, match=r"rows\.jsonl:1: scores must be positive"):
        shp_records(numbered([shp_row("a", "b", "c", 0, 1, 1)]))
    with pytest.raises(DataError, match=r"rows\.jsonl:1: missing field 'human_ref_B'"):
        shp_records(numbered([{"history": "a", "human_ref_A": "b", "score_A": 1, "score_B": 2, "labels": 1}]))
    with pytest.raises(DataError, match=r"rows\.jsonl:1: field 'score_A' must be a number, got str"):
        shp_records(numbered([shp_row("a", "b", "c", "4", 1, 1)]))

    path = write_jsonl(tmp_path / "shp.jsonl", [shp_row("a", "b", "c", 3, 2, 1), shp_row("d", "e", "f", 1, 1, 0)])
    with pytest.raises(DataError, match=r"dataset 'shp' split 'test' .* produced no records .*filter removed all"):
        load_records("shp", "test", files=[str(path)])
    write_jsonl(tmp_path / "shp.jsonl", [shp_row("a", "b", "c", 3, 2, 1), shp_row("d", "e", "f", 5, 1, 0)])
    assert load_records("shp", "test", files=[str(path)]) == {
        prompt("d"): {"responses": [" e", " f"], "pairs": [(1, 0)], "sft_target": " e"}
    }


@pytest.mark.parametrize(
    "html, cleaned",
    [
        ("<p>Hello <b>bold</b> world</p>", "Hello  world"),  # only the p's direct text
        ("<p>use <code>f()</code> now</p>", "use  now"),  # inline code inside a p is a nested tag: dropped
        ("<pre>lead<code>x = 1\n</code> mid <code>y</code></pre>", "<code>x = 1\n</code>\n\n<code>y</code>"),
        ("<code>int</code>", "<code>int</code>"),  # top-level code keeps its tags, as code in a <pre> does
        ("<code>a<b>b</b></code><p>t</p>", "<code>ab</code>\n\nt"),  # all of a code's text, nested tags too
        ("<pre><div><code>z</code></div></pre>", "<code>z</code>"),  # code at any depth in a <pre>
        ("stray<p>a</p>more", "a"),  # text outside any tag is dropped
        ("<p>outer <p>inner</p> tail</p>", "outer  tail"),  # html.parser nests the p; the nested one is dropped
        ("<p>see <!--hidden--> this</p><!--top-->", "see hidden this"),  # comment text in a p is kept, top-level not
        ("<p>a&nbsp;b &amp; c</p>", "a\xa0b & c"),
        ("<h1>T</h1><ul><li>x</li></ul><pre>no code</pre><p>end</p>", "end"),
        ("<p>line<br>two</p>", "linetwo"),  # beautifulsoup4 < 4.15 keeps text after <br> as the p's own text
        ("just text", ""),
    ],
)
def test_se_html_cleaning(html, cleaned):
    assert clean_html(html) == cleaned


def se_row(question: str, *answers: tuple[str, int]) -> dict:
    return {"question": question, "answers": [{"text": text, "pm_score": score} for text, score in answers]}


def test_se_pairs_targets_and_shared_prompts():
    rows = [
        se_row("<p>Q</p>", ("<p>a</p>", 3), ("<p>b</p>", 5), ("<p>c</p>", 3)),
        se_row("plain text", ("<p>e1</p>", 1), ("<p>e2</p>", 1)),
        se_row("<p>other</p>", ("<p>same</p>", 1), ("<p>diff</p>", 2), ("<p>same</p>", 5)),
        se_row("<p>Q</p><div>noise</div>", ("<p>last</p>", 2), ("<p>word</p>", 7)),  # also cleans to "Q"
        se_row("<ul><li>x</li></ul>", ("<p>f</p>", 4), ("<p>g</p>", 0)),  # also cleans to ""
    ]
    records = se_records(numbered(rows))
    # "Q" keeps the first row's position but the last row's content; the same for the two empty questions.
    assert list(records) == [prompt("Q"), prompt(""), prompt("other")]
    assert records[prompt("Q")] == {"responses": [" last", " word"], "pairs": [(1, 0)], "sft_target": " word"}
    assert records[prompt("")] == {"responses": [" f", " g"], "pairs": [(0, 1)], "sft_target": " f"}
    assert records[prompt("other")] == {
        "responses": [" same", " diff", " same"],
        "pairs": [(1, 0), (2, 0), (2, 1)],  # scores 1, 2, 5: the higher score wins each pair
        "sft_target": " diff",  # " same" ranks by its first score, 1
    }

    first_q = se_records(numbered(rows[:2]))
    assert first_q[prompt("Q")] == {
        "responses": [" a", " b", " c"],
        "pairs": [(1, 0), (2, 0), (1, 2)],  # scores 3, 5, 3: (0, 2) ties, so 2 is preferred
        "sft_target": " b",
    }
    assert first_q[prompt("")] == {"responses": [" e1", " e2"], "pairs": [(1, 0)], "sft_target": " e1"}


def test_se_bad_rows():
    with pytest.raises(DataError, match=r"rows\.jsonl:1 answers\[1\]: missing field 'pm_score'"):
        se_records(numbered([{"question": "q", "answers": [{"text": "a", "pm_score": 1}, {"text": "b"}]}]))
    with pytest.raises(DataError, match=r"rows\.jsonl:1: field 'answers' must be a list"):
        se_records(numbered([{"question": "q", "answers": "a"}]))


def test_se_split_is_the_seed_42_shuffle_of_all_rows(tmp_path):
    import datasets

    rows = [se_row(f"<p>q{i}</p>", (f"<p>a{i}</p>", i), (f"<p>b{i}</p>", 1)) for i in range(250)]
    path = write_jsonl(tmp_path / "se.jsonl", rows)
    test = load_records("se", "test", files=[str(path)])
    train = load_records("se", "train", files=[str(path)])

    shuffled = datasets.Dataset.from_list(rows).shuffle(seed=42)["question"]
    expected = [prompt(clean_html(q)) for q in shuffled]
    assert len(test) == 2  # int(250 * 0.01)
    assert list(test) == expected[:2]
    assert list(train) == expected[2:]
    assert sorted(list(test) + list(train)) == sorted(prompt(f"q{i}") for i in range(250))
    assert list(test) != [prompt("q0"), prompt("q1")]  # really shuffled

    with pytest.raises(DataError, match=r"dataset 'se' split 'test' .* produced no records"):
        load_records("se", "test", files=[str(write_jsonl(tmp_path / "small.jsonl", rows[:99]))])  # int(0.99) = 0
    with pytest.raises(ValueError, match="se has splits 'train' and 'test', got 'validation'"):
        load_records("se", "validation", files=[str(path)])


def test_se_cleaning_in_several_processes_gives_the_same_records():
    from data import se

    rows = [se_row(f"<p>q{i % 500}</p><code>c{i}</code>", (f"<p>a{i}</p><pre><code>x{i}</code></pre>", i % 7), (f"<p>b{i}</p>", 3))
            for i in range(600)]  # 1,800 documents: enough for several cleaning tasks
    serial = se_records(numbered(rows))
    parallel = se_records(numbered(rows), num_proc=2)
    assert len(serial) == 600 and 1800 >= 4 * se.CLEAN_CHUNK
    assert list(parallel.items()) == list(serial.items())


def test_records_are_cached_by_dataset_split_and_source_content(tmp_path, monkeypatch):
    from data import se

    rows = [se_row(f"<p>q{i}</p>", (f"<p>a{i}</p>", i), (f"<p>b{i}</p>", 1)) for i in range(250)]
    path = write_jsonl(tmp_path / "se.jsonl", rows)
    cache = str(tmp_path / "cache")
    built = load_records("se", "train", files=[str(path)], cache_dir=cache)
    assert len(list((tmp_path / "cache" / "records").iterdir())) == 1

    def no_cleaning(html):
        raise AssertionError("cleaned again")

    monkeypatch.setattr(se, "clean_html", no_cleaning)
    cached = load_records("se", "train", files=[str(path)], cache_dir=cache)
    assert list(cached.items()) == list(built.items())  # same records, same order, pairs as tuples
    with pytest.raises(AssertionError, match="cleaned again"):
        load_records("se", "test", files=[str(path)], cache_dir=cache)  # another split: its own entry
    write_jsonl(path, rows[:-1] + [se_row("<p>new</p>", ("<p>x</p>", 1))])
    with pytest.raises(AssertionError, match="cleaned again"):
        load_records("se", "train", files=[str(path)], cache_dir=cache)  # changed content: rebuilt
