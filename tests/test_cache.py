"""The tokenization cache is an optimisation, never a failure: corrupt entries are rebuilt, failed writes warn, writes are
fsynced before they are published, and temporary entries of dead processes are cleaned up."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

import data.cache
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
