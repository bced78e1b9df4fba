"""benchmarks/gpu_check.py in its CPU dry-run mode: the same cases, table and checks on a tiny model, in-process."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.tiny import REPO


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_dry_run_prints_one_table_and_passes_its_checks(tmp_path, capsys):
    from accelerate.state import AcceleratorState, GradientState

    gpu_check = load_gpu_check()
    try:
        assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    printed = capsys.readouterr().out
    assert printed.startswith("gpu_check on CPU (dry run)")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    results = report["results"]
    assert list(results) == ["bf16 padded", "bf16 packed", "fp32 padded", "bf16 resumed"]
    for name, r in results.items():
        assert len(r["losses"]) == 4 and r["tokens_per_second"] > 0 and r["mfu"] is None, name  # no MFU without a GPU
        assert f"{r['losses'][-1]:.4f}" in printed
    # On CPU the stopped-and-resumed run is bit-identical to the uninterrupted one, and "bf16" is float32 here.
    assert results["bf16 resumed"]["losses"] == results["bf16 padded"]["losses"] == results["fp32 padded"]["losses"]
    assert results["bf16 packed"]["losses"] == pytest.approx(results["bf16 padded"]["losses"], rel=1e-5)
    assert [label for label, ok, _ in report["checks"] if not ok] == []
    assert printed.count("\nok  ") == len(report["checks"]) == 5
    # Checkpoints are deleted as the check goes (a 1B run's LATEST is about 11 GB); metrics stay.
    assert sorted(p.name for p in (tmp_path / "bf16_resumed").iterdir() if p.is_dir()) == []


def test_gpu_check_launches_the_real_script_with_the_fsdp_config():
    gpu_check = load_gpu_check()
    command = gpu_check.launch_command(1, ["exp_name=x"])
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[3:7] == ["--config_file", str(REPO / "accelerate_configs" / "fsdp_8gpu.yaml"), "--num_processes", "1"]
    assert command[-2:] == [str(REPO / "sft_train.py"), "exp_name=x"]
    runs = gpu_check.cases("gpu", "sdpa_packed")
    assert runs["bf16 resumed"][1][-1] == "resume_from=auto" and "model.fsdp_policy_mp=null" in runs["fp32 padded"][0]


def test_gpu_check_compile_cases_and_their_check():
    gpu_check = load_gpu_check()
    assert list(gpu_check.cases("gpu", "sdpa_packed")) == ["bf16 padded", "bf16 packed", "fp32 padded", "bf16 resumed"]
    runs = gpu_check.cases("gpu", "sdpa_packed", compile_too=True)
    assert runs["bf16 padded+compile"] == [[*runs["bf16 padded"][0], "compile=true"]]
    assert runs["bf16 packed+compile"] == [[*runs["bf16 packed"][0], "compile=true"]]
    losses = {"bf16 padded": [2.0, 1.0], "bf16 packed": [2.0, 1.0], "fp32 padded": [2.0, 1.0], "bf16 resumed": [2.0, 1.0],
              "bf16 padded+compile": [2.0, 1.01], "bf16 packed+compile": [2.0, 1.03]}
    verdicts = {label: ok for label, ok, _ in gpu_check.checks({n: {"losses": v} for n, v in losses.items()}, 1)}
    assert verdicts["bf16 padded+compile vs eager, worst update"] and not verdicts["bf16 packed+compile vs eager, worst update"]
