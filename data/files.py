"""Local data files: resolve paths and globs, then read rows that name their file and line.

    from data.files import resolve_paths, iter_rows
    for where, row in iter_rows(resolve_paths(["data/train-*.jsonl.gz", "extra.parquet"])):
        ...  # where = "data/train-00.jsonl.gz:17" (1-based line), "x.json:[3]" or "extra.parquet:row 5" (0-based)

Supported: `.jsonl` / `.json` (one JSON object per line, optionally gzipped as `.jsonl.gz` / `.json.gz`), a `.json` file
that holds a single JSON array of objects, and `.parquet`. Every row must be a JSON object (a dict).
"""

import glob
import gzip
import json
import os
from typing import Iterable, Iterator

from training.checks import no_files_message
from training.errors import UserError
from training.files import json_lines

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


class DataError(UserError, ValueError):
    """Bad input data; the message names the file and line."""


def no_files_error(name: str, split: str) -> DataError:
    """A dataset without a hub source (jsonl: your own rows) named without local files for `split`."""
    return DataError(no_files_message(name, split))


def resolve_paths(spec: str | list[str]) -> list[str]:
    """Expand a path, a glob, or a list of them into a list of files (entries in order, each glob's matches sorted)."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise FileNotFoundError("no data files given")
    paths: list[str] = []
    for entry in entries:
        pattern = os.path.expanduser(entry)
        if os.path.isfile(pattern):  # checked first so that a file named like "a[1].jsonl" is taken literally
            paths.append(pattern)
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"data file pattern {entry!r} matches no file")
            paths.extend(matches)
        else:
            raise FileNotFoundError(f"data file {entry!r} does not exist")
    return paths


def iter_rows(paths: list[str]) -> Iterator[tuple[str, dict]]:
    """Yield `(where, row)` for every row of every file, in file order then row order."""
    for path in paths:
        if path.endswith(".parquet"):
            yield from _parquet_rows(path)
        elif path.endswith(JSON_SUFFIXES):
            yield from _json_rows(path)
        else:
            raise DataError(f"{path}: unsupported file type (use .jsonl, .json, .jsonl.gz, .json.gz or .parquet)")


def split_rows(hub_name: str, split: str, files: list[str] | None, cache_dir: str | None) -> Iterable[tuple[str, dict]]:
    """`(where, row)` for every row of one split: from local files (the rows of that split) or, with files=None, from the
    hub dataset `hub_name`."""
    if files is not None:
        return iter_rows(resolve_paths(files))
    import datasets  # imported here: slow, and only the hub path needs it

    dataset = datasets.load_dataset(hub_name, split=split, cache_dir=cache_dir)
    return ((f"{hub_name}:{split} row {i}", row) for i, row in enumerate(dataset))


def require_str(where: str, row: dict, field: str) -> str:
    """`row[field]`, which must be a string; otherwise a DataError naming where the row came from."""
    if field not in row:
        raise DataError(f"{where}: missing field {field!r} (row has {sorted(row)})")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def require_number(where: str, row: dict, field: str) -> int | float:
    """`row[field]`, which must be an int or float (not a bool); otherwise a DataError naming where."""
    if field not in row:
        raise DataError(f"{where}: missing field {field!r} (row has {sorted(row)})")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field {field!r} must be a number, got {type(value).__name__}")
    return value


def _check_object(where: str, row: object) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _json_rows(path: str) -> Iterator[tuple[str, dict]]:
    opener = gzip.open if path.endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            if path.endswith((".json", ".json.gz")):
                # A .json file is either JSON lines or one array; peek at the first non-blank character to tell.
                data = f.read()
                if data.lstrip().startswith(b"["):
                    yield from _json_array_rows(path, _decode(path, data))
                    return
                lines = iter(data.splitlines())
            else:
                lines = f
            for line_no, row in json_lines(path, lines, DataError):
                yield f"{path}:{line_no}", _check_object(f"{path}:{line_no}", row)
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path}: corrupt gzip file after line {line_no} ({e})") from None


def _decode(path: str, data: bytes) -> str:
    """A whole-file JSON array as text; a bad byte is reported with the number of its line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None


def _json_array_rows(path: str, text: str) -> Iterator[tuple[str, dict]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON at column {e.colno} ({e.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of objects or one object per line")
    for i, row in enumerate(rows):
        yield f"{path}:[{i}]", _check_object(f"{path}:[{i}]", row)


def _parquet_rows(path: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq  # imported here: pyarrow is slow to import and only parquet needs it

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for unreadable files
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    i = 0
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            yield f"{path}:row {i}", row
            i += 1
