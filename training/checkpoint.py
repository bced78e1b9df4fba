"""Checkpoints: the DPO hand-off format, written so that a crash at any moment leaves the previous one usable.

A checkpoint directory (`step-{N}/` or `LATEST/`) holds `policy.pt`, `optimizer.pt` and `scheduler.pt`, each a dict
`{"step_idx": N, "state": <state_dict>, "metrics": <eval metrics>}` (the reference's format; `policy.pt` is the input of DPO),
plus `train_state.pt` (counters, data position, RNG states) for resume and a `complete` marker written last.
Everything is written into a temporary directory that is renamed into place, so a directory without `complete` never appears
under a final name. All files load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILES = ("policy.pt", "optimizer.pt", "scheduler.pt", "train_state.pt")
MARKER = "complete"


class CheckpointError(RuntimeError):
    """A checkpoint or archive that cannot be used; the message names the file."""


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
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])


def write_checkpoint(
    run_dir: Path,
    name: str,
    step_idx: int,
    policy_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    train_state: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write `{run_dir}/{name}/` atomically (main process only). An existing directory of that name is replaced."""
    run_dir = Path(run_dir)
    final = run_dir / name
    tmp = run_dir / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier write
    tmp.mkdir(parents=True)
    metrics = plain(metrics)
    for filename, state in (("policy.pt", policy_state), ("optimizer.pt", optimizer_state), ("scheduler.pt", scheduler_state)):
        save_file({"step_idx": step_idx, "state": state, "metrics": metrics}, tmp / filename)
    save_file(train_state, tmp / "train_state.pt")
    with open(tmp / MARKER, "w") as f:
        json.dump({"step_idx": step_idx}, f)
        f.flush()
        os.fsync(f.fileno())
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
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.rename(dst, old)
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if old.exists():
        shutil.rmtree(old)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(run_dir: Path) -> None:
    """Undo a crash between the two renames of `replace_dir`: put a moved-aside complete checkpoint back."""
    for old in Path(run_dir).glob(".old-*"):
        dst = old.parent / old.name[len(".old-"):]
        if not dst.exists() and is_complete(old):
            os.rename(old, dst)


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file() and all((Path(path) / f).is_file() for f in CHECKPOINT_FILES)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by examples seen; LATEST wins a tie)."""
    found = []
    for path in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        if (path.name == "LATEST" or path.name.startswith("step-")) and is_complete(path):
            step = json.loads((path / MARKER).read_text())["step_idx"]
            found.append((step, path.name == "LATEST", path))
    return [p for _, _, p in sorted(found)]


def step_dirs(run_dir: Path) -> list[Path]:
    """step-N checkpoints, oldest first."""
    dirs = [p for p in Path(run_dir).glob("step-*") if p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def prune(run_dir: Path, keep_last: int | None) -> None:
    if keep_last is None:
        return
    for path in step_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(path)


def load_file(path: str | Path) -> Any:
    """torch.load with weights_only=True; a missing, truncated or foreign file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated zips and unpickling errors
        raise CheckpointError(f"cannot load {path}: the file is corrupt, truncated or not a checkpoint ({type(e).__name__}: {e})") from e


def load_archive(path: str | Path) -> dict[str, Any]:
    """A policy.pt-style file: {"step_idx", "state", "metrics"}."""
    archive = load_file(path)
    if not isinstance(archive, dict) or not {"step_idx", "state", "metrics"} <= archive.keys():
        raise CheckpointError(f"{path} is not a policy/optimizer/scheduler checkpoint: expected keys step_idx, state, metrics")
    return archive


def resolve_resume(resume_from: str, run_dir: Path) -> Path:
    """`auto` -> the newest complete checkpoint of run_dir; a path must be a complete checkpoint."""
    if resume_from == "auto":
        recover(run_dir)
        found = complete_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"resume_from=auto: no complete checkpoint in {run_dir}")
        return found[-1]
    path = Path(resume_from)
    if not is_complete(path):
        raise CheckpointError(f"resume_from: {path} is not a complete checkpoint (missing {MARKER} or one of {', '.join(CHECKPOINT_FILES)})")
    return path
