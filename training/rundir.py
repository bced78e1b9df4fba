"""A run directory belongs to one run: a finished run is never overwritten, two live runs never share one, and a resumed
run is the same run (same data order, same meaning of the counters).

    claim = claim_run_dir(run_dir, resuming=config.resume_from is not None, overwrite=config.overwrite)   # main process
    try:
        ...                                     # train
    finally:
        claim.release(failed=...)               # the lock goes; a failed start leaves no empty run dir behind

    problems = resume_mismatches(saved_signature, run_signature(config, data_fingerprint))

The lock is `{run_dir}/.lock`, created exclusively and holding host, pid and start time. A lock whose process is gone on this
host is stale and taken over with a warning; a lock of another host is refused with the way out (delete it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import Config, ConfigError
from training.files import pid_alive

log = logging.getLogger(__name__)

LOCK = ".lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "wandb_id")
RUN_DIRS = ("LATEST", "hf")


def run_contents(run_dir: Path) -> list[str]:
    """What in run_dir belongs to a run (checkpoints, logs, config, export), by name."""
    if not run_dir.is_dir():
        return []
    names = []
    for path in sorted(run_dir.iterdir()):
        if path.name in RUN_FILES or path.name in RUN_DIRS or path.name.startswith(("step-", ".old-")) \
                or (path.suffix == ".png" and (run_dir / "metrics.jsonl").exists()):
            names.append(path.name)
    return names


def describe_run(run_dir: Path, names: list[str]) -> str:
    checkpoints = [n for n in names if n == "LATEST" or n.startswith("step-")]
    if checkpoints:
        return f"checkpoints {', '.join(checkpoints[:4])}{' ...' if len(checkpoints) > 4 else ''}"
    return ", ".join(names)


@dataclass
class RunDirClaim:
    run_dir: Path
    created: bool  # the directory did not exist before this run

    def release(self, failed: bool = False) -> None:
        """Drop the lock. After a failed start (nothing logged or saved yet) remove what this run wrote."""
        if failed:
            leftovers = [n for n in run_contents(self.run_dir) if n != "config.yaml"]
            if not leftovers:
                (self.run_dir / "config.yaml").unlink(missing_ok=True)
        (self.run_dir / LOCK).unlink(missing_ok=True)
        if failed and self.created:
            try:
                self.run_dir.rmdir()  # only if empty
            except OSError:
                pass


def claim_run_dir(run_dir: str | Path, resuming: bool, overwrite: bool) -> RunDirClaim:
    """Lock run_dir for this run; refuse one that holds a run unless resuming or overwrite=true (which clears it)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} exists and is not a directory")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise ConfigError(f"run_dir: cannot create {run_dir} (permission denied); choose run_dir=PATH where you can write") from None
    acquire_lock(run_dir)
    claim = RunDirClaim(run_dir, created)
    try:
        names = run_contents(run_dir)
        if names and not resuming:
            if not overwrite:
                raise ConfigError(
                    f"run_dir {run_dir} already holds a run ({describe_run(run_dir, names)}); continue it with "
                    f"resume_from=auto, start over there with overwrite=true, or choose another run_dir"
                )
            log.warning("overwrite=true: deleting the earlier run in %s (%s)", run_dir, ", ".join(names))
            clear_run(run_dir, names)
    except BaseException:
        claim.release()
        raise
    return claim


def clear_run(run_dir: Path, names: list[str]) -> None:
    """Delete an earlier run's files; each directory is renamed away first, so a kill never leaves half a checkpoint."""
    for name in names:
        path = run_dir / name
        if path.is_dir():
            doomed = run_dir / f".del-{name}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.rename(path, doomed)
            shutil.rmtree(doomed)
        else:
            path.unlink(missing_ok=True)


def acquire_lock(run_dir: Path) -> None:
    path = run_dir / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"]):
                log.warning("taking over the stale lock %s of pid %s (no longer running)", path, holder["pid"])
                path.unlink(missing_ok=True)
                continue
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
            raise ConfigError(f"run_dir {run_dir} is in use by another run ({who}); wait for it, choose another run_dir, "
                              f"or delete {path} if that run is no longer alive") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise ConfigError(f"run_dir {run_dir}: could not take the lock {path}; another run started at the same moment")


def read_lock(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


# Settings that fix the data order or what the counters (examples_seen, epoch, offset) and the optimizer state mean.
# Changing any other setting (eval cadence, logging, n_examples, checkpoint retention) on resume is safe.
SIGNATURE_KEYS = ("batch_size", "gradient_accumulation_steps", "max_tokens_per_micro_batch", "seed", "datasets",
                  "dataset_weights", "max_length", "max_prompt_length", "optimizer", "batching", "length_bucket_window")


def run_signature(config: Config, data_fingerprint: str | None = None) -> dict[str, Any]:
    signature = {key: getattr(config, key) for key in SIGNATURE_KEYS}
    if data_fingerprint is not None:
        signature["train_data"] = data_fingerprint
    return signature


def resume_mismatches(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """`key: checkpoint X, now Y` for every signature key both sides record and that differs."""
    if not saved:
        return []  # a checkpoint written before signatures were recorded
    out = []
    for key, value in current.items():
        if key in saved and saved[key] != value:
            if key == "train_data":
                out.append(f"the training data (content hash {saved[key][:12]} in the checkpoint, {value[:12]} now)")
            else:
                out.append(f"{key}: checkpoint {saved[key]!r}, now {value!r}")
    return out


def check_resume(saved: dict[str, Any] | None, current: dict[str, Any], resume_dir: Path, force: bool) -> None:
    """Refuse to continue a checkpoint under settings that change the data order or the counters (resume_force overrides)."""
    problems = resume_mismatches(saved, current)
    if not problems:
        return
    text = "; ".join(problems)
    if force:
        log.warning("resume_force=true: resuming %s although %s", resume_dir, text)
        return
    raise ConfigError(f"resume_from {resume_dir}: the run differs from the checkpoint's in {text}; resuming would mix two "
                      f"runs. Use the checkpoint's values, start a new run_dir, or set resume_force=true")


def on_main_process(accelerator, fn):
    """`fn()` on the main process only (None elsewhere); a user error it raises is raised on every process (printed once by
    training.cli), so no process is left waiting in a collective for one that has stopped."""
    from accelerate.utils import broadcast_object_list

    from training.errors import UserError

    result, error, message = None, None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as e:
            error, message = e, str(e)
    if accelerator.num_processes > 1:
        message = broadcast_object_list([message])[0]
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return result
