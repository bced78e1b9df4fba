"""The tokenization cache is an optimisation, never a failure: corrupt entries are rebuilt, failed writes warn, writes are
fsynced before they are published, and temporary entries of dead processes are cleaned up."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

import data.cache
import data.hh
import data.records
import data.sft
import data.tokenize
from data.cache import tmp_suffix
from data.sft import build_split
from data.tokenize import TokenizeSettings

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo"
SETTINGS = TokenizeSettings(64, 48)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO))


@pytest.fixture
def files(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join((DEMO / "test.jsonl").read_text().splitlines(keepends=True)[:40]))
    return {"hh": {"test": [str(path)]}}


def split(files, tokenizer, cache):
    return build_split(["hh"], "test", files, tokenizer, SETTINGS, str(cache))


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "tokenized").iterdir())


def test_corrupt_entry_is_rebuilt_with_a_warning(files, tokenizer, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = split(files, tokenizer, cache)
    [entry] = entries(cache)
    [arrow] = entry.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])  # a disk that lost the tail of the file
    with caplog.at_level(logging.WARNING):
        again = split(files, tokenizer, cache)
    assert again.to_dict() == first.to_dict()
    assert "is unreadable" in caplog.text and "rebuilding it" in caplog.text
    assert entries(cache) == [entry]  # rebuilt in place: the next run reads it again
    assert datasets.load_from_disk(str(entry)).to_dict() == first.to_dict()


def test_failed_cache_write_warns_and_goes_on(files, tokenizer, tmp_path, caplog, monkeypatch):
    def disk_full(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        Path(path, "data-00000-of-00001.arrow").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", disk_full)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        data = split(files, tokenizer, cache)
    assert len(data) > 0 and "could not write the cache entry" in caplog.text and "No space left" in caplog.text
    assert entries(cache) == []  # nothing half-written left


def test_writes_are_fsynced_before_the_rename(files, tokenizer, tmp_path, monkeypatch):
    synced: set[str] = set()
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def rename(src, dst):
        if ".tmp-" in str(src):
            files_written = {str(p) for p in Path(src).rglob("*")} | {str(src)}
            assert files_written <= synced, f"published unsynced files: {sorted(files_written - synced)}"
            renamed.append(src)
        return real_rename(src, dst)

    renamed: list = []
    monkeypatch.setattr(data.cache.os, "fsync", fsync)
    monkeypatch.setattr(data.cache.os, "rename", rename)
    monkeypatch.setattr(data.records, "CACHED_LOCAL", {"hh"})  # as for local SE files: a records entry is written too
    split(files, tokenizer, tmp_path / "cache")
    assert len(renamed) == 2  # two entries published: the canonical records and the tokenized split, each synced first


def test_orphaned_temporary_entries_of_dead_processes_are_removed(files, tokenizer, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    parent = tmp_path / "cache" / "tokenized"
    orphan = parent / f"abc{tmp_suffix(dead_pid)}"
    live = parent / f"def{tmp_suffix(os.getppid())}"  # a live process still writing
    foreign = parent / "ghi.tmp-otherhost-1"  # another machine's write on shared storage
    for d in (orphan, live, foreign):
        (d / "sub").mkdir(parents=True)
    split(files, tokenizer, tmp_path / "cache")
    assert not orphan.exists() and live.exists() and foreign.exists()


# The split's cache key is computed from its inputs before any record is parsed: unchanged inputs are a hit that neither
# parses nor tokenizes; a changed input file, tokenizer (on disk or in memory) or setting is a rebuild.

def demo_tokenizer(directory=DEMO):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture
def tokenize_calls(monkeypatch):
    calls = []
    real = data.tokenize.tokenize_batch

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(data.tokenize, "tokenize_batch", counted)
    return calls


def test_unchanged_inputs_are_read_without_parsing_records(files, tmp_path, monkeypatch, tokenize_calls):
    cache = tmp_path / "cache"
    first = split(files, demo_tokenizer(), cache)
    assert tokenize_calls == [1]

    def must_not_parse(*args, **kwargs):
        raise AssertionError("records parsed on a cache hit")

    monkeypatch.setattr(data.sft, "load_records", must_not_parse)
    monkeypatch.setattr(data.hh, "hh_records", must_not_parse)
    again = split(files, demo_tokenizer(), cache)  # a new tokenizer object, as in a new run
    assert again.to_dict() == first.to_dict() and tokenize_calls == [1]
    assert not (cache / "records").exists()  # local HH files parse as fast as a records entry reads back: none written


def edit_data_file(files, tokenizer, tmp_path):
    path = Path(files["hh"]["test"][0])
    rows = path.read_text().splitlines(keepends=True)
    row = json.loads(rows[5])
    row["chosen"] += " And one more sentence."
    path.write_text("".join(rows[:5] + [json.dumps(row) + "\n"] + rows[6:]))  # same path, other bytes
    return files, tokenizer, SETTINGS


def edit_tokenizer_file(files, tokenizer, tmp_path):
    copy = tmp_path / "tokenizer-copy"
    shutil.copytree(DEMO, copy, ignore=shutil.ignore_patterns("*.jsonl"))
    spec = json.loads((copy / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][: len(spec["model"]["merges"]) // 2]  # same vocabulary, fewer merges
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    return files, demo_tokenizer(copy), SETTINGS


def add_token_in_memory(files, tokenizer, tmp_path):
    tokenizer.add_tokens(["Hum"])  # in memory only ("Human" becomes "Hum" + "an"): the files it was loaded from are unchanged
    return files, tokenizer, SETTINGS


def add_pad_token_in_memory(files, tokenizer, tmp_path):
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return files, tokenizer, SETTINGS


def other_settings(files, tokenizer, tmp_path):
    return files, tokenizer, TokenizeSettings(20, 12)  # the demo rows are shorter than SETTINGS: these truncate


@pytest.mark.parametrize("change", [edit_data_file, edit_tokenizer_file, add_token_in_memory, add_pad_token_in_memory,
                                    other_settings])
def test_a_changed_input_is_rebuilt(files, tmp_path, tokenize_calls, change):
    cache = tmp_path / "cache"
    tokenizer = demo_tokenizer()
    first = split(files, tokenizer, cache)
    new_files, new_tokenizer, settings = change(files, tokenizer, tmp_path)
    rebuilt = build_split(["hh"], "test", new_files, new_tokenizer, settings, str(cache))
    assert tokenize_calls == [1, 1] and len(entries(cache)) == 2
    fresh = build_split(["hh"], "test", new_files, new_tokenizer, settings, None)  # no cache at all
    assert rebuilt.to_dict() == fresh.to_dict()
    if change is not add_pad_token_in_memory:  # a pad token changes no id of this text, only the key
        assert rebuilt.to_dict() != first.to_dict()
