"""PNG plots of a run's `metrics.jsonl`, written next to it.

    python -m training.plots RUN_DIR        # writes RUN_DIR/{loss,lr,grad_norm,throughput}.png and prints their paths

or from Python: `plot_run(run_dir)` returns the written paths. The x axis is always `examples_seen`. A plot whose metrics
were never logged is skipped. `build_figure(records, name)` returns the matplotlib Figure without saving it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.files import json_lines

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn: seconds off every training run's start
    from matplotlib.figure import Figure

# Plot name -> (title, y label, metrics drawn). Only these keys are type-checked; other keys in a record are ignored.
PLOTS: dict[str, tuple[str, str, list[str]]] = {
    "loss": ("Loss", "loss", ["loss/train", "loss/eval"]),
    "lr": ("Learning rate", "lr", ["lr"]),
    "grad_norm": ("Gradient norm (before clipping)", "grad_norm", ["grad_norm"]),
    "throughput": ("Throughput", "tokens / second", ["tokens_per_second"]),
}
PLOTTED_KEYS = {key for _, _, keys in PLOTS.values() for key in keys}
SMOOTH_KEYS = {"loss/train"}  # noisy per-step series get a trailing mean drawn over the faint raw line


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a missing/empty file or a bad line raises an error naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file")
    records = []
    with open(path, "rb") as f:
        for lineno, record in json_lines(path, f):
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if not isinstance(record.get("examples_seen"), int) or isinstance(record["examples_seen"], bool):
                raise ValueError(f"{path}:{lineno}: `examples_seen` must be an integer, got {record.get('examples_seen')!r}")
            for key in PLOTTED_KEYS & record.keys():
                if record[key] is not None and not _is_number(record[key]):
                    raise ValueError(f"{path}:{lineno}: `{key}` must be a number, got {record[key]!r}")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: empty metrics file")
    return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(examples_seen, value) of the records that logged `key` (null values are left out)."""
    points = [(r["examples_seen"], r[key]) for r in records if r.get(key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean: point i is the mean of the last `window` values up to i (fewer at the start)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def smoothing_window(n_points: int) -> int:
    """About 1/25 of the run, so a long run's curve is readable and a short one is left almost raw."""
    return max(1, n_points // 25)


def build_figure(records: list[dict[str, Any]], name: str) -> Figure | None:
    """The figure of plot `name` (a key of PLOTS), or None when none of its metrics were logged.

    Each line's label is the metric name ("loss/train"), with " (smoothed)" for the trailing mean of a smoothed series.
    """
    title, ylabel, keys = PLOTS[name]
    drawn = {key: series(records, key) for key in keys}
    drawn = {key: xy for key, xy in drawn.items() if xy[0]}
    if not drawn:
        return None
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot) renders with Agg when saved to PNG: no display, no global figure state.
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for key, (x, y) in drawn.items():
        window = smoothing_window(len(y)) if key in SMOOTH_KEYS else 1
        if window > 1:
            (raw,) = ax.plot(x, y, alpha=0.25, linewidth=0.8, label=key)
            ax.plot(x, smooth(y, window), color=raw.get_color(), linewidth=1.6, label=f"{key} (smoothed)")
        else:
            # Sparse series (eval) get markers so single points show.
            ax.plot(x, y, marker="o" if len(x) < 50 else None, markersize=3, label=key)
    if name == "grad_norm" and all(v > 0 and math.isfinite(v) for _, ys in drawn.values() for v in ys):
        ax.set_yscale("log")  # spikes span orders of magnitude
    ax.set_title(title)
    ax.set_xlabel("examples seen")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(ax.get_lines()) > 1:
        ax.legend()
    return fig


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write `{name}.png` into run_dir for every plot in PLOTS that has data; return the written paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    written = []
    for name in PLOTS:
        fig = build_figure(records, name)
        if fig is None:
            continue
        path = run_dir / f"{name}.png"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")  # renamed into place: no half-written PNG
        try:
            fig.savefig(tmp, dpi=120)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(path)
    return written


def plot_run_or_warn(run_dir: str | Path) -> list[Path]:
    """plot_run at the end of training: a plot is never worth failing a finished run, so a failure only warns."""
    try:
        return plot_run(run_dir)
    except Exception as e:
        logging.getLogger(__name__).warning("plots for %s failed: %s: %s", run_dir, type(e).__name__, e)
        return []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot RUN_DIR/metrics.jsonl into PNGs in RUN_DIR.")
    parser.add_argument("run_dir", help="directory holding metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        from training.errors import UserError

        raise UserError(str(err)) from None
    for path in paths:
        print(path)


if __name__ == "__main__":
    from training.cli import run_main

    run_main(main)
