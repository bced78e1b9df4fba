"""A disk that fills up half-way through a checkpoint, for tests: files opened for writing whose path contains `match`
raise OSError(ENOSPC) (or another errno) once `room` bytes have gone into them in all, as a real full disk does.

    disk = FullDisk(".tmp-step-16", room=20_000)
    monkeypatch.setattr(training.checkpoint, "open", disk.open, raising=False)   # torch.save's files (policy.pt, ...)
    install("tmp-LATEST/resume:0")        # in a launched process: the above, plus torch.distributed.checkpoint's streams
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os


class FullDisk:
    def __init__(self, match: str, room: int = 0, code: int = errno.ENOSPC):
        self.match, self.room, self.code, self.written = match, room, code, 0

    def open(self, path, mode="r", *args, **kwargs):
        if "w" in mode and "b" in mode and self.match in str(path):
            return Filling(self, path)
        return builtins.open(path, mode, *args, **kwargs)


class Filling(io.FileIO):
    def __init__(self, disk: FullDisk, path):
        super().__init__(path, "wb")
        self.disk = disk

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if self.disk.written + size > self.disk.room:
            raise OSError(self.disk.code, os.strerror(self.disk.code))  # a write(2) error names no file
        self.disk.written += size
        return super().write(data)


def install(spec: str) -> FullDisk:
    """`MATCH:ROOM`: checkpoint files and torch.distributed.checkpoint streams under MATCH fill the disk after ROOM bytes."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    from training import checkpoint

    match, _, room = spec.rpartition(":")
    disk = FullDisk(match, int(room))
    checkpoint.open = disk.open
    original = FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if "w" in mode and match in str(path):
            with disk.open(path, mode) as stream:
                yield stream
        else:
            with original(self, path, mode) as stream:
                yield stream

    FileSystem.create_stream = create_stream
    return disk
