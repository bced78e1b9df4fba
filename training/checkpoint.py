"""Checkpoints: the DPO hand-off format, written so that a crash at any moment leaves the previous one usable.

A checkpoint directory (`step-{N}/` or `LATEST/`) holds `policy.pt`, `optimizer.pt` and `scheduler.pt`, each a dict
`{"step_idx": N, "state": <state_dict>, "metrics": <eval metrics>}` (the reference's format; `policy.pt` is the input of DPO),
plus `train_state.pt` (counters, data position, RNG states) for resume and a `complete` marker written last. FSDP/TP runs
write `resume/` instead of `optimizer.pt`: the model and optimizer shards of every process (torch.distributed.checkpoint),
which load under any number of processes; `optimizer.pt` is then written only with save_full_optimizer.
Everything is written into a temporary directory that is renamed into place, so a directory without `complete` never appears
under a final name; replacing `LATEST` moves the old one aside first and `recover` puts it back after a crash between the two
renames, so a kill at any moment leaves a loadable LATEST. All files load with `torch.load(weights_only=True)`.

`train_state.pt` also records the sizes of metrics.jsonl and samples.jsonl when the checkpoint was written: a run resumed
into the same run_dir cuts both files back to those sizes (`rewind_logs`), dropping the records of steps that are trained
again, so the logs of a resumed run read like those of one uninterrupted run (no duplicated steps).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.errors import UserError
from training.files import fsync

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("policy.pt", "scheduler.pt", "train_state.pt")  # plus optimizer.pt or the sharded resume state
RESUME_DIR = "resume"  # the sharded resume state of FSDP/TP runs: model and optimizer shards (torch.distributed.checkpoint)
MARKER = "complete"
LOG_FILES = ("metrics.jsonl", "samples.jsonl")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or archive that cannot be used; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (disk full, quota, I/O error); the earlier complete ones are intact."""


# What a write that stops half-way says, by errno (torch.save itself reports only "unexpected pos" in inline_container.cc,
# with the OSError of the file's write as its context).
WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded", errno.EIO: "an I/O error",
                errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too large for the file system"}


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself, its cause or context (torch.save's RuntimeError), or one of the failures that
    torch.distributed.checkpoint's CheckpointException gathered from the processes."""
    seen = set()
    todo = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # {rank: (exception, traceback)}
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


def write_failure(run_dir: Path, name: str, what: str, error: BaseException, clean: bool = True) -> CheckpointWriteError | None:
    """The one-line error for checkpoint `name` whose `what` could not be written, or None when `error` is not a failed
    write (a bug keeps its traceback). `clean`: remove the temporary directory (main process), so the space is free again
    and no partial checkpoint is left; the previous checkpoint of that name, if any, was never touched."""
    os_error = os_error_in(error)
    if os_error is not None:
        code = errno.errorcode.get(os_error.errno, str(os_error.errno))
        reason = f"{WRITE_ERRNOS.get(os_error.errno, os_error.strerror or os.strerror(os_error.errno))} ({code})"
    elif "inline_container" in str(error) or "PytorchStreamWriter" in str(error):
        reason = f"the write stopped short: {' '.join(str(error).split())[:200]}"
    else:
        return None
    run_dir = Path(run_dir)
    if clean:
        shutil.rmtree(tmp_dir(run_dir, name), ignore_errors=True)
    previous = complete_checkpoints(run_dir)
    intact = f"the last complete checkpoint, {previous[-1]}, is intact" if previous else "no earlier checkpoint exists"
    return CheckpointWriteError(f"could not write checkpoint {name}: {what}: {reason}; nothing was left under "
                                f"{run_dir / name} by this write and {intact}; free space (or move run_dir), then continue "
                                f"with resume_from=auto run_dir={run_dir}")


def plain(value: Any) -> Any:
    """Metrics as plain Python types so the file loads with weights_only=True."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    return value


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],  # sampling during eval on GPUs
    }


def set_rng_state(state: dict[str, Any] | list[dict[str, Any]], rank: int = 0) -> None:
    """Inverse of `rng_state`, also after `plain` turned its tensors into lists. A list holds one state per process: this
    process takes its own (or the first, when the run had fewer processes)."""
    if isinstance(state, list):
        state = state[rank] if rank < len(state) else state[0]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.int64).astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def tmp_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / f".tmp-{name}"


def start_checkpoint(run_dir: Path, name: str) -> Path:
    """A fresh, empty temporary directory for checkpoint `name` (main process, before any process writes into it)."""
    tmp = tmp_dir(run_dir, name)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier write
    tmp.mkdir(parents=True)
    return tmp


def write_checkpoint(
    run_dir: Path,
    name: str,
    step_idx: int,
    policy_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    scheduler_state: dict[str, Any],
    train_state: dict[str, Any],
    metrics: dict[str, Any],
    started: bool = False,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write `{run_dir}/{name}/` atomically (main process only). An existing directory of that name is replaced.

    `started`: the temporary directory already holds what the other processes wrote (the sharded resume state); otherwise
    it is made afresh. `optimizer_state` None writes no optimizer.pt (the sharded resume state holds the optimizer).
    `extra` maps further file names to states saved in the same format (a LoRA run's `adapter.pt`).
    """
    run_dir = Path(run_dir)
    final = run_dir / name
    tmp = tmp_dir(run_dir, name)
    current = tmp
    try:  # a failed write (disk full, quota, I/O error) is one line naming the file; the earlier checkpoints stay
        if not started:
            start_checkpoint(run_dir, name)
        metrics = plain(metrics)
        files = {"policy.pt": policy_state, "optimizer.pt": optimizer_state, "scheduler.pt": scheduler_state, **(extra or {})}
        for filename, state in files.items():
            if state is not None:
                current = tmp / filename
                save_file({"step_idx": step_idx, "state": state, "metrics": metrics}, current)
        current = tmp / "train_state.pt"
        save_file(train_state, current)
        current = tmp / MARKER
        with open(current, "w") as f:
            # written_at orders checkpoints of the same step (and survives copying the run dir, unlike mtimes)
            json.dump({"step_idx": step_idx, "written_at": time.time(), "metrics": metrics}, f)
            f.flush()
            os.fsync(f.fileno())
        current = tmp
        fsync(tmp)  # the files' directory entries, before the rename publishes them
    except Exception as e:
        failure = write_failure(run_dir, name, str(current), e)
        if failure is None:
            raise
        raise failure from e
    replace_dir(tmp, final)
    return final


def save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is first moved aside to `.old-{name}` so one complete copy always exists."""
    old = dst.parent / f".old-{dst.name}"
    if old.exists() and not dst.exists() and is_complete(old):
        os.rename(old, dst)  # an earlier crash between the renames: never delete the only complete copy
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.rename(dst, old)
    os.rename(src, dst)
    fsync(dst.parent)
    if old.exists():
        shutil.rmtree(old)


def recover(run_dir: Path) -> None:
    """After a crash: put a moved-aside complete checkpoint back (a kill between the two renames of `replace_dir`) and
    finish deleting pruned ones. Partly written `.tmp-*` directories are left for the next write of that name to replace."""
    for old in Path(run_dir).glob(".old-*"):
        dst = old.parent / old.name[len(".old-"):]
        if not dst.exists() and is_complete(old):
            os.rename(old, dst)
    for doomed in Path(run_dir).glob(".del-*"):
        shutil.rmtree(doomed, ignore_errors=True)


def is_complete(path: Path) -> bool:
    path = Path(path)
    has_optimizer = (path / "optimizer.pt").is_file() or is_sharded(path)
    return (path / MARKER).is_file() and has_optimizer and all((path / f).is_file() for f in CHECKPOINT_FILES)


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint's resume state is sharded (written by every process of an FSDP/TP run)."""
    return (Path(path) / RESUME_DIR / ".metadata").is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first: by examples seen, then by write time (a LATEST saved on SIGTERM at N
    examples precedes the step-N written after the eval at N by the resumed run). A checkpoint whose marker is malformed is
    skipped with a warning naming the file."""
    found = []
    for path in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        if (path.name == "LATEST" or path.name.startswith("step-")) and is_complete(path):
            marker = read_marker(path)
            if marker is not None:
                found.append((marker["step_idx"], marker.get("written_at", 0.0), path.name == "LATEST", path))
    return [p for *_, p in sorted(found)]


def read_marker(path: Path) -> dict[str, Any] | None:
    """The `complete` marker of a checkpoint, or None (with a warning) when it is not the JSON this module writes."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
        if isinstance(marker, dict) and isinstance(marker.get("step_idx"), int) and isinstance(marker.get("written_at", 0.0), (int, float)):
            return marker
        problem = "expected {step_idx, written_at, metrics}"
    except (OSError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    log.warning("ignoring checkpoint %s: malformed marker %s (%s)", path, Path(path) / MARKER, problem)
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a complete-looking checkpoint would not load, checked cheaply: train_state.pt loads, the other files are whole
    zip archives (torch's format keeps its index at the end, so a truncated file fails here without reading the tensors)."""
    import zipfile

    for name in (*CHECKPOINT_FILES, "optimizer.pt"):  # the sharded resume state is read by torch.distributed.checkpoint
        if name == "train_state.pt" or not (Path(path) / name).is_file():
            continue
        try:
            with zipfile.ZipFile(Path(path) / name) as archive:
                archive.namelist()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{Path(path) / name}: {e}"
    try:
        load_train_state(Path(path) / "train_state.pt")
    except CheckpointError as e:
        return str(e)
    return None


def last_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose eval metrics (kept in its marker) are all finite."""
    for path in reversed(complete_checkpoints(run_dir)):
        metrics = (read_marker(path) or {}).get("metrics", {})
        if all(math.isfinite(v) for v in metrics.values() if isinstance(v, (int, float))):
            return path
    return None


def step_dirs(run_dir: Path) -> list[Path]:
    """step-N checkpoints, oldest first."""
    dirs = [p for p in Path(run_dir).glob("step-*") if p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def prune(run_dir: Path, keep_last: int | None) -> None:
    """Delete all but the newest `keep_last` step-N dirs; each is renamed away first, so a kill never leaves half of one."""
    if keep_last is None:
        return
    for path in step_dirs(run_dir)[:-keep_last]:
        doomed = path.parent / f".del-{path.name}"
        os.rename(path, doomed)
        shutil.rmtree(doomed)


def log_sizes(run_dir: Path) -> dict[str, int]:
    """Byte sizes of the run's log files now, stored in train_state.pt for `rewind_logs`."""
    return {name: (Path(run_dir) / name).stat().st_size for name in LOG_FILES if (Path(run_dir) / name).is_file()}


def rewind_logs(run_dir: Path, sizes: dict[str, int]) -> None:
    """Cut the log files back to their sizes at a checkpoint (main process, before the resumed run logs anything).

    A log that did not exist then is emptied; a log shorter than recorded (edited by hand) is left alone."""
    for name in LOG_FILES:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        size = sizes.get(name, 0)
        if path.stat().st_size > size:
            with open(path, "r+b") as f:
                f.truncate(size)


def load_file(path: str | Path) -> Any:
    """torch.load with weights_only=True; a missing, truncated or foreign file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        # mmap: the tensors stay in the page cache (shared by the processes of a node) until they are copied into place
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for truncated zips and unpickling errors
        raise CheckpointError(f"cannot load {path}: the file is corrupt, truncated or not a checkpoint ({type(e).__name__}: {e})") from e


def load_archive(path: str | Path) -> dict[str, Any]:
    """A policy.pt-style file: {"step_idx", "state", "metrics"}."""
    archive = load_file(path)
    if not isinstance(archive, dict) or not {"step_idx", "state", "metrics"} <= archive.keys():
        raise CheckpointError(f"{path} is not a policy/optimizer/scheduler checkpoint: expected keys step_idx, state, metrics")
    return archive


def load_train_state(path: str | Path) -> dict[str, Any]:
    """train_state.pt: the loop's counters and data position, plus `rng` and `logs`."""
    state = load_file(path)
    if not isinstance(state, dict) or not {"examples_seen", "updates", "epoch", "offset", "rng"} <= state.keys():
        raise CheckpointError(f"{path} is not a train_state.pt: expected a dict with examples_seen, updates, epoch, offset, rng")
    return state


def resolve_archive(archive: str) -> tuple[str, str | None]:
    """model.archive as a policy.pt file: a file as given; a checkpoint directory (runs/x/LATEST, runs/x/step-N) gives its
    policy.pt, a run directory (runs/x) its LATEST/policy.pt. Returns (file, a line saying which file, or None when the
    file was given); CheckpointError says which file was expected where."""
    path = Path(archive).expanduser()
    if path.is_file():
        return archive, None
    expected = "a policy.pt file, a checkpoint directory holding one (runs/NAME/LATEST) or a run directory (runs/NAME)"
    if not path.exists():
        raise CheckpointError(f"model.archive: {archive} does not exist; expected {expected}")
    if not path.is_dir():
        raise CheckpointError(f"model.archive: {archive} is not a file or a directory; expected {expected}")
    for candidate, kind in ((path / "policy.pt", "checkpoint directory"), (path / "LATEST" / "policy.pt", "run directory")):
        if candidate.is_file():
            return str(candidate), f"model.archive: {archive} is a {kind}; using {candidate}"
    steps = step_dirs(path)
    hint = f" (its newest checkpoint: {steps[-1] / 'policy.pt'})" if steps and (steps[-1] / "policy.pt").is_file() else ""
    raise CheckpointError(f"model.archive: {archive} is a directory without {path / 'policy.pt'} or "
                          f"{path / 'LATEST' / 'policy.pt'}{hint}; expected {expected}")


def resolve_resume(resume_from: str, run_dir: str | Path | None) -> Path:
    """`auto` -> the newest complete checkpoint of run_dir that loads (a newer one that does not is skipped with a warning,
    so a restart loop does not stick on it); a path must be a complete checkpoint (run_dir may be unset)."""
    if resume_from == "auto":
        if run_dir is None:
            raise CheckpointError("resume_from=auto needs run_dir=PATH (the run to continue)")
        run_dir = Path(run_dir)
        recover(run_dir)
        found = complete_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"resume_from=auto: no complete checkpoint in {run_dir}")
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            log.warning("resume_from=auto: skipping %s, it does not load (%s)", path, problem)
        raise CheckpointError(f"resume_from=auto: no checkpoint in {run_dir} loads (damaged: {', '.join(p.name for p in found)}); "
                              "start over with overwrite=true or resume another run's checkpoint")
    path = Path(resume_from)
    if not is_complete(path):
        raise CheckpointError(f"resume_from: {path} is not a complete checkpoint (missing {MARKER}, one of "
                              f"{', '.join(CHECKPOINT_FILES)}, or both optimizer.pt and {RESUME_DIR}/)")
    if (problem := checkpoint_problem(path)) is not None:
        raise CheckpointError(f"resume_from: {path} does not load ({problem}); resume_from=auto takes the newest one that does")
    return path


class BackgroundWriter:
    """Runs the main process's checkpoint writes in a thread, one at a time, so the other processes keep training instead
    of waiting in a collective (and running into its time-out) while a 27 GB policy.pt goes to slow storage.

    `submit` first waits for the previous write, so at most one gathered copy of the weights is held; `wait` before using
    what was written (export) and before exit. An error in the thread is raised by the next `submit` or `wait`; the
    training loop asks `failed` after every update, so a failed write stops the run at once (training/loop.py).
    """

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, fn, *args) -> None:
        self.wait()
        self.thread = threading.Thread(target=self._run, args=(fn, *args), name="checkpoint-writer")
        self.thread.start()

    def _run(self, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:  # re-raised in the training thread
            self.error = e

    def failed(self) -> bool:
        """Whether the write in the thread has ended in an error (which `wait` raises)."""
        return self.error is not None and (self.thread is None or not self.thread.is_alive())

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


writer = BackgroundWriter()  # one per process: only the main process submits
