"""Metrics to `{run_dir}/metrics.jsonl` (every record), the console and wandb (throttled), samples to `samples.jsonl`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Written to a file or pipe, lines keep their length instead of being wrapped at 80 columns.
console = Console(soft_wrap=not sys.stdout.isatty())


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


class MetricsLogger:
    """Main-process logger. `log` always appends to metrics.jsonl; console/wandb at most every `min_interval` seconds."""

    def __init__(self, run_dir: Path | None, wandb_run=None, min_interval: float = 0.0, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.wandb_run = wandb_run
        # A resumed wandb run already holds the steps its first life logged (up to the crash): log only later ones.
        self.wandb_from = wandb_run.step if wandb_run is not None and getattr(wandb_run, "resumed", False) else 0
        self.min_interval = min_interval
        self.last_print = float("-inf")
        self.progress: Progress | None = None

    def start_progress(self, total_examples: int, done: int) -> None:
        """A progress bar in examples; log lines print above it."""
        if not self.enabled or not console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold blue]training"), BarColumn(), MofNCompleteColumn(), TextColumn("examples"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
        )
        self.task = self.progress.add_task("train", total=total_examples, completed=done)
        self.progress.start()

    def advance(self, examples_seen: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=examples_seen)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def log(self, metrics: dict[str, Any], examples_seen: int, force: bool = False) -> None:
        if not self.enabled:
            return
        record = {"examples_seen": examples_seen, **metrics}
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        now = time.monotonic()
        if force or now - self.last_print >= self.min_interval:
            self.last_print = now
            console.print(f"[bold]{examples_seen:>8}[/bold] {format_metrics(metrics)}", highlight=False)
            if self.wandb_run is not None and examples_seen >= self.wandb_from:
                self.wandb_run.log(metrics, step=examples_seen)

    def samples(self, rows: list[dict[str, Any]], examples_seen: int) -> None:
        """Generations at an eval: one JSON line each in samples.jsonl, a wandb table, and a short console table."""
        if not self.enabled or not rows:
            return
        if self.run_dir is not None:
            with open(self.run_dir / "samples.jsonl", "a") as f:
                for row in rows:
                    f.write(json.dumps({"examples_seen": examples_seen, **row}) + "\n")
        if self.wandb_run is not None and examples_seen >= self.wandb_from:
            import wandb

            table = wandb.Table(columns=["step", "prompt", "sample"], data=[[examples_seen, r["prompt"], r["sample"]] for r in rows])
            self.wandb_run.log({"policy_samples": table}, step=examples_seen)
        table = Table(title=f"samples at {examples_seen} examples", show_lines=True)
        table.add_column("prompt (end)", overflow="fold", max_width=60)
        table.add_column("sample", overflow="fold")
        for row in rows[:4]:
            table.add_row(row["prompt"][-200:], row["sample"][:400])
        console.print(table)


def check_wandb_credentials(config) -> None:
    """wandb enabled, online and without credentials would fail (or prompt) after the model loaded: refuse it first."""
    from training.config import ConfigError

    if not config.wandb.enabled or config.debug:
        return
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or \
            os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    netrc = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        with open(netrc) as f:
            if host in f.read():
                return
    except OSError:
        pass
    raise ConfigError("wandb.enabled=true but no wandb credentials were found (WANDB_API_KEY or `wandb login`); log in, "
                      "or log locally with WANDB_MODE=offline, or turn it off with wandb.enabled=false")
