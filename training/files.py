"""Small file-system helpers of the run directory, the checkpoints and the data cache.

    fsync(path)                                        # a file's data, or a directory's entries, on disk
    pid_alive(pid)                                     # whether a process of this host still runs (stale locks, temp dirs)
    for number, row in json_lines(path, lines, DataError): ...   # JSON lines; a bad line raises DataError naming path:line
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator


def fsync(path: str | Path) -> None:
    """Flush a file's data (or a directory's entries, e.g. after a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def json_lines(path: str | Path, lines: Iterable[str | bytes], error: type[Exception] = ValueError
               ) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of the JSON-lines file `path` (`lines`: its lines, text or bytes). A line
    that is not UTF-8 or not JSON raises `error` naming `path:line`; bytes are decoded line by line, so a bad byte is
    reported on its own line."""
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{number}: not valid JSON at column {e.colno} ({e.msg})") from None
        yield number, value
