"""training.plots on a synthetic metrics.jsonl: the PNGs are real images, the drawn lines are the logged values, bad files
fail naming file and line.

    python -m pytest tests/test_plots.py
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from training.plots import build_figure, plot_run, read_metrics, smooth

REPO = Path(__file__).resolve().parents[1]


def synthetic_records() -> list[dict]:
    """60 train steps of 4 examples (every key varies per step), eval every 80 examples; eval lines have no lr etc."""
    records = []
    for step in range(60):
        seen = 4 * step
        if seen % 80 == 0:
            records.append({"examples_seen": seen, "loss/eval": 300.0 - seen / 4, "logps_eval/chosen": seen / 4 - 300.0})
        records.append({
            "examples_seen": seen,
            "loss/train": 320.0 - step + (step % 3),
            "logps_train/chosen": step - 320.0,
            "grad_norm": 1.0 + step % 7,
            "lr": 1e-6 * min(1.0, (step + 1) / 11),
            "tokens_per_second": 1000.0 + 10 * step,
            "examples_per_second": 8.0,
        })
    return records


def write_metrics(run_dir: Path, records: list[dict]) -> Path:
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"  # the first chunk; width and height follow as big-endian uint32
    return struct.unpack(">II", data[16:24])


def lines_by_label(fig) -> dict[str, tuple[list, list]]:
    (ax,) = fig.axes
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_plot_run_writes_valid_pngs(tmp_path):
    write_metrics(tmp_path, synthetic_records())
    paths = plot_run(tmp_path)
    assert paths == [tmp_path / "loss.png", tmp_path / "lr.png", tmp_path / "grad_norm.png", tmp_path / "throughput.png"]
    for path in paths:
        width, height = png_size(path)
        assert width > 0 and height > 0


def test_figures_draw_exactly_the_logged_series():
    records = synthetic_records()
    train = [r for r in records if "loss/train" in r]
    evals = [r for r in records if "loss/eval" in r]
    assert len(train) == 60 and [r["examples_seen"] for r in evals] == [0, 80, 160]

    loss = lines_by_label(build_figure(records, "loss"))
    assert set(loss) == {"loss/train", "loss/train (smoothed)", "loss/eval"}
    train_x = [4 * s for s in range(60)]
    train_y = [320.0 - s + (s % 3) for s in range(60)]
    assert loss["loss/train"] == (train_x, train_y)
    assert loss["loss/eval"] == ([0, 80, 160], [300.0, 280.0, 260.0])
    # 60 points -> window 60 // 25 = 2: each point is the mean of itself and the one before.
    smoothed = [train_y[0]] + [(a + b) / 2 for a, b in zip(train_y, train_y[1:])]
    assert loss["loss/train (smoothed)"] == (train_x, smoothed)

    assert lines_by_label(build_figure(records, "lr")) == {"lr": (train_x, [r["lr"] for r in train])}
    grad_norm = build_figure(records, "grad_norm")
    assert lines_by_label(grad_norm) == {"grad_norm": (train_x, [1.0 + s % 7 for s in range(60)])}
    assert grad_norm.axes[0].get_yscale() == "log"  # all positive
    throughput = lines_by_label(build_figure(records, "throughput"))
    assert throughput == {"tokens_per_second": (train_x, [1000.0 + 10 * s for s in range(60)])}


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert smooth([3.0, 6.0, 9.0, 0.0], 3) == [3.0, 4.5, 6.0, 5.0]
    assert smooth([5.0, 7.0], 1) == [5.0, 7.0]


def test_absent_series_are_skipped(tmp_path):
    # Only eval lines and train lines without throughput/lr: no lr.png, grad_norm.png or throughput.png.
    records = [
        {"examples_seen": 0, "loss/eval": 10.0},
        {"examples_seen": 4, "loss/train": 9.0},
        {"examples_seen": 8, "loss/train": 8.0, "lr": None},
        {"examples_seen": 8, "loss/eval": 7.5},
    ]
    write_metrics(tmp_path, records)
    assert plot_run(tmp_path) == [tmp_path / "loss.png"]
    assert not (tmp_path / "lr.png").exists()
    loss = lines_by_label(build_figure(records, "loss"))
    assert loss == {"loss/eval": ([0, 8], [10.0, 7.5]), "loss/train": ([4, 8], [9.0, 8.0])}  # 2 points: no smoothing


def test_missing_and_empty_files_name_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        plot_run(tmp_path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: empty metrics file")):
        plot_run(tmp_path)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"examples_seen": 8, "loss/train": 1.0', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"loss/train": 1.0}', "`examples_seen` must be an integer, got None"),
        ('{"examples_seen": 8.5}', "`examples_seen` must be an integer, got 8.5"),
        ('{"examples_seen": 8, "lr": "high"}', "`lr` must be a number, got 'high'"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"examples_seen": 0, "loss/train": 2.0}\n\n' + bad_line + "\n")
    with pytest.raises(ValueError) as err:
        read_metrics(path)
    assert str(err.value).startswith(f"{path}:3: {message}")


def test_cli_prints_written_paths_and_reports_errors(tmp_path):
    write_metrics(tmp_path, synthetic_records()[:5])
    result = subprocess.run([sys.executable, "-m", "training.plots", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / f"{n}.png") for n in ("loss", "lr", "grad_norm", "throughput")]

    missing = tmp_path / "nowhere"
    result = subprocess.run([sys.executable, "-m", "training.plots", str(missing)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {missing / 'metrics.jsonl'}: no such metrics file"
