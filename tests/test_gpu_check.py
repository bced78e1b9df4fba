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
    # varlen_attn's kernel is CUDA-only: the dry run packs with sdpa_packed and says so.
    assert printed.startswith("gpu_check on CPU (dry run); packed cases on sdpa_packed (CPU: varlen_attn needs CUDA)")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    results = report["results"]
    assert list(results) == ["plain loop", "bf16 padded", "bf16 packed", "fp32 padded", "bf16 resumed", "DPO padded",
                             "DPO packed", "LoRA packed"]  # no compile case on CPU
    for name, r in results.items():
        assert len(r["losses"]) == 4 and r["tokens_per_second"] > 0 and r["mfu"] is None, name  # no MFU without a GPU
        assert f"{r['losses'][-1]:.4f}" in printed
    assert "x the plain loop" in printed
    # On CPU the stopped-and-resumed run is bit-identical to the uninterrupted one, and "bf16" is float32 here; the plain
    # loop starts from the same weights on the same batch (it has no warmup, so only its first loss agrees).
    assert results["bf16 resumed"]["losses"] == results["bf16 padded"]["losses"] == results["fp32 padded"]["losses"]
    assert results["bf16 packed"]["losses"] == pytest.approx(results["bf16 padded"]["losses"], rel=1e-5)
    assert results["plain loop"]["losses"][0] == pytest.approx(results["bf16 padded"]["losses"][0], rel=1e-5)
    assert results["DPO packed"]["chosen_logps"] == pytest.approx(results["DPO padded"]["chosen_logps"], rel=1e-5)
    assert results["DPO padded"]["losses"][0] == pytest.approx(0.6931, abs=1e-4)  # policy = reference at the start: ln 2
    assert [label for label, ok, _ in report["checks"] if not ok] == []
    assert printed.count("\nok  ") == len(report["checks"]) == 7
    # Checkpoints are deleted as the check goes (a 1B run's LATEST is about 11 GB); metrics stay.
    assert sorted(p.name for p in (tmp_path / "bf16_resumed").iterdir() if p.is_dir()) == []


def test_gpu_check_launches_the_real_script_with_the_fsdp_config():
    gpu_check = load_gpu_check()
    command = gpu_check.launch_command(1, ["exp_name=x"])
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[3:7] == ["--config_file", str(REPO / "accelerate_configs" / "fsdp_8gpu.yaml"), "--num_processes", "1"]
    assert command[-2:] == [str(REPO / "sft_train.py"), "exp_name=x"]
    assert gpu_check.launch_command(1, ["exp_name=x"], "dpo_train.py")[-2] == str(REPO / "dpo_train.py")
    runs = gpu_check.cases("gpu", "varlen_attn")
    assert runs["bf16 resumed"].invocations[1][-1] == "resume_from=auto"
    assert "model.fsdp_policy_mp=null" in runs["fp32 padded"].invocations[0]
    assert "model.attn_implementation=varlen_attn" in runs["bf16 packed"].invocations[0]
    assert runs["DPO packed"].script == runs["DPO padded"].script == "dpo_train.py" and runs["plain loop"].invocations == ()


def test_gpu_check_cases_their_updates_and_checks():
    """The extra cases run fewer updates (the whole check stays under 8 minutes on one GPU); the compiled packed case is
    always there on a GPU, the compiled padded one with --compile; compile and DPO each get a 2% check."""
    gpu_check = load_gpu_check()
    runs = gpu_check.cases("gpu", "varlen_attn")
    assert list(runs) == ["plain loop", "bf16 padded", "bf16 packed", "fp32 padded", "bf16 resumed", "bf16 packed+compile",
                          "DPO padded", "DPO packed", "LoRA packed"]
    batch = gpu_check.BATCH["gpu"]
    assert runs["bf16 packed+compile"].invocations == ([*runs["bf16 packed"].invocations[0], "compile=true",
                                                        f"n_examples={batch * 6}"],)
    for name in ("DPO padded", "DPO packed", "LoRA packed"):
        assert runs[name].invocations[0][-1] == f"n_examples={batch * 4}", name
    assert "bf16 padded+compile" in gpu_check.cases("gpu", "varlen_attn", compile_too=True)
    losses = {"bf16 padded": [2.0, 1.0], "bf16 packed": [2.0, 1.0], "fp32 padded": [2.0, 1.0], "bf16 resumed": [2.0, 1.0],
              "bf16 padded+compile": [2.0, 1.01], "bf16 packed+compile": [2.0, 1.03], "DPO padded": [0.6931, 0.68],
              "DPO packed": [0.6931, 0.69]}
    results = {n: {"losses": v} for n, v in losses.items()}
    results["DPO padded"]["chosen_logps"], results["DPO packed"]["chosen_logps"] = [-100.0], [-103.0]
    verdicts = {label: ok for label, ok, _ in gpu_check.checks(results, 1)}
    assert verdicts["bf16 padded+compile vs eager, worst update"] and not verdicts["bf16 packed+compile vs eager, worst update"]
    assert verdicts["DPO packed vs padded loss, update 1"] and not verdicts["DPO packed vs padded chosen logps, update 1"]


def test_gpu_check_targets_say_met_or_miss_from_the_measured_rates():
    gpu_check = load_gpu_check()

    def case(rate, mfu=None, peak=10.0):
        return {"tokens_per_second": rate, "mfu": mfu, "peak_memory_gb": peak, "losses": [1.0]}

    results = {"plain loop": case(10_000, peak=50), "bf16 padded": case(20_000, 0.11, 34), "bf16 packed": case(45_000, 0.36, 20),
               "bf16 resumed": case(90_000, 0.9, 99), "DPO padded": case(8_000), "DPO packed": case(12_000)}
    lines = gpu_check.target_lines(results)
    assert "met  packed / bf16 padded tokens/s                        2.25x  (>= 2x)" in lines
    # the best full fine-tuning case is bf16 packed: the stopped-and-resumed run's rate never counts
    assert "miss best full fine-tuning / plain loop tokens/s          4.50x  (>= 5x)" in lines
    assert "miss DPO packed / DPO padded tokens/s                     1.50x  (>= 2x)" in lines
    assert "met  best full fine-tuning MFU (bf16 packed)              36.0%  (>= 35%)" in lines
    assert "met  peak memory of bf16 packed / plain loop              0.40x  (<= 1x)" in lines
