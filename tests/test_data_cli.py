"""`python -m data` preview / export / stats on the real HH rows and the reference tokenizer.

    python -m pytest tests/test_data_cli.py -q
"""

import json
from pathlib import Path

import numpy as np
import pytest

from data.__main__ import main, padding_fraction, render_example
from data.records import load_records
from training.cli import run_main

SHARED = Path(__file__).resolve().parents[2] / "shared"
HH_ROWS = SHARED / "data" / "hh" / "harmless-base-test-300.jsonl.gz"
REFERENCE = SHARED / "data" / "reference"


@pytest.fixture(scope="module")
def hh_path() -> str:
    if not HH_ROWS.is_file():
        pytest.skip(f"real HH rows not available at {HH_ROWS}")
    return str(HH_ROWS)


@pytest.fixture(scope="module")
def tokenizer():
    if not (REFERENCE / "tiny-gpt2").is_dir():
        pytest.skip(f"reference outputs not available at {REFERENCE}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(REFERENCE / "tiny-gpt2"))


def test_export_equals_reference_records(hh_path, tmp_path):
    reference = REFERENCE / "hh300_records.jsonl"
    if not reference.is_file():
        pytest.skip(f"reference records not available at {reference}")
    out = tmp_path / "records.jsonl"
    main(["export", "hh", "--split", "test", "--data_files", hh_path, "--out", str(out), f"local_dirs=[{tmp_path}]"])
    ours = out.read_text(encoding="utf-8").splitlines()
    theirs = reference.read_text(encoding="utf-8").splitlines()
    assert len(ours) == len(theirs) == 300  # the 300 rows hold 300 distinct prompts
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert json.loads(a) == json.loads(b), f"line {i + 1}"


def test_preview_marks_truncation_and_counts(hh_path, tokenizer, tmp_path, capsys):
    main(["preview", "hh", "--split", "test", "--data_files", hh_path, "--tokenizer", str(REFERENCE / "tiny-gpt2"),
          "-n", "2", "max_length=64", "max_prompt_length=32", f"local_dirs=[{tmp_path}]"])
    out = capsys.readouterr().out
    flat = " ".join(line.strip().strip("│╭╰╮╯").strip() for line in out.splitlines())  # undo rich's wrapping at spaces
    prompt, record = next(iter(load_records("hh", "test", files=[hh_path]).items()))
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    n_response = len(tokenizer(record["sft_target"], add_special_tokens=False)["input_ids"]) + 1
    assert n_prompt + n_response > 64 and n_response > 32  # both steps cut example 0
    assert "─ hh/test/0 ─" in out and "prompt 32 + response 32 = 64 tokens, 32 supervised, truncated" in flat
    assert f"[… {n_prompt - 32} prompt tokens cut]" in flat
    assert f"[… {n_response - 32} response tokens cut, EOS among them]" in flat
    assert "─ hh/test/1 ─" in out and "hh/test/2" not in out
    assert "300 examples in the test split of ['hh']" in flat


def test_preview_highlights_exactly_the_supervised_tokens(tokenizer):
    ids = tokenizer("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao", add_special_tokens=False)["input_ids"]
    mask = [0] * 4 + [1] * 3 + [0] * 5 + [1] * (len(ids) - 12)
    example = {"prompt_ids": [], "response_ids": ids, "response_mask": mask, "full_prompt_length": 0,
               "full_response_length": len(ids), "mode": "keep_start", "example_id": "x", "n_supervised": sum(mask),
               "truncated": False}
    counts, text = render_example(example, tokenizer).renderable.renderables
    assert counts.plain == f"prompt 0 + response {len(ids)} = {len(ids)} tokens, {sum(mask)} supervised"
    highlighted = "".join(text.plain[s.start:s.end] for s in text.spans if "green" in str(s.style))
    expected = tokenizer.decode(ids[4:7]) + tokenizer.decode(ids[12:])
    assert highlighted == expected and expected


def test_stats_from_a_recipe(hh_path, tokenizer, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"datasets: [hh]\ndata_files: {{hh: {{test: {hh_path}}}}}\nmodel: {{name_or_path: {REFERENCE / 'tiny-gpt2'}}}\n"
        f"max_length: 4096\nmax_prompt_length: 2048\nlocal_dirs: [{tmp_path}]\n"
    )
    main(["stats", str(recipe), "--split", "test", "--batch_size", "300"])
    out = capsys.readouterr().out
    records = load_records("hh", "test", files=[hh_path])
    prompts = np.array([len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in records])
    totals = prompts + np.array([len(tokenizer(r["sft_target"], add_special_tokens=False)["input_ids"]) + 1
                                 for r in records.values()])
    prompt_row = next(line for line in out.splitlines() if "│ prompt " in line)
    cells = [c.strip() for c in prompt_row.split("│") if c.strip()]
    assert cells == ["prompt", f"{prompts.mean():.1f}", *(f"{np.percentile(prompts, q):.0f}" for q in (50, 90, 95, 99)),
                     str(prompts.max())]
    # one batch of all 300 examples: padding = 1 - sum / (300 * longest), whatever the order
    assert f"padding: {1 - totals.sum() / (300 * totals.max()):.1%} of positions in micro-batches of 300" in out
    assert "truncated: 0 of 300" in out


def test_padding_fraction_in_training_order():
    assert padding_fraction([5, 5, 5, 5], 2, seed=0) == 0
    lengths = [1, 2, 3, 4, 5]  # batches of 4 drop one example; which one depends on the order
    fraction = padding_fraction(lengths, 4, seed=0)
    from data.batches import epoch_order

    kept = [lengths[i] for i in epoch_order(5, 0, 0)[:4]]
    assert fraction == pytest.approx(1 - sum(kept) / (4 * max(kept)))


def test_bad_source_and_missing_tokenizer(hh_path, tmp_path, capsys):
    def error_line(args):
        with pytest.raises(SystemExit) as e:
            run_main(main, args)
        assert e.value.code == 2
        return capsys.readouterr().err

    assert error_line(["stats", "hhh"]) == "error: 'hhh' is neither a recipe file nor a dataset name (hh, shp, se, jsonl)\n"
    assert error_line(["preview", "hh", "--data_files", hh_path, f"local_dirs=[{tmp_path}]"]).startswith("error: no tokenizer")
    with pytest.raises(SystemExit, match="usage"):
        main(["show", "hh"])
    out = tmp_path / "out.jsonl"
    assert error_line(["export", "hh", "--data_files", "/no/such.jsonl", "--out", str(out), f"local_dirs=[{tmp_path}]"]) == \
        "error: data file '/no/such.jsonl' does not exist\n"
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))  # nothing half-written
