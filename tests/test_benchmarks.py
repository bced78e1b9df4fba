"""benchmarks/throughput.py still runs against the suite's code: its baseline and suite workers, in-process, on a small
tiny-model workload."""

from __future__ import annotations

import argparse
import importlib.util

import pytest

from tests.tiny import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_workers_time_equal_work(reference_dir, hh_rows_path, tmp_path):
    """The naive loop and the suite's padded and packed modes see the same examples (equal real and supervised tokens),
    packing computes no more positions, and the suite's two modes give the same loss on the same batch and weights."""
    from accelerate.state import AcceleratorState, GradientState

    bench = load_benchmark()
    args = argparse.Namespace(workload="tiny", steps=1, batch_size=4, max_length=96, profile=False, vocab=32000,
                              work_dir=str(tmp_path), real_model=tmp_path / "absent")
    try:
        results = {"naive": bench.naive_run("naive", None, args)}
        for mode in ("padded", "packed"):
            results[mode] = bench.suite_run(mode, bench.SUITE_MODES[mode], args)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    counts = {m: r["counts"] for m, r in results.items()}
    assert len(counts["naive"]) == 1
    assert [(c["tokens"], c["supervised"]) for c in counts["naive"]] == [(c["tokens"], c["supervised"]) for c in counts["padded"]] \
        == [(c["tokens"], c["supervised"]) for c in counts["packed"]]
    assert counts["packed"][0]["positions"] <= counts["padded"][0]["positions"] == counts["naive"][0]["positions"]
    assert results["packed"]["losses"][0] == pytest.approx(results["padded"]["losses"][0], rel=1e-5)
    assert all(r["wall_s"] > 0 and r["peak_rss_mb"] > 0 for r in results.values())
