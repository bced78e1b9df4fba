"""DPO runs of the real script on a tiny model: the loss is invariant to how a batch is split, precomputed reference
log-probs equal the live ones, resume is bit-exact, and sft_train.py -> dpo_train.py works through the command line.

    python -m pytest tests/test_dpo_runs.py

Without model.archive both the policy and the reference are the tiny model's seeded random init, so they start equal.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import debug_launcher

import dpo_train
from data.pairs import build_pair_split
from data.tokenize import TokenizeSettings
from modeling.load import load_model, load_tokenizer
from tests.tiny import tiny_data, tiny_model_dir, tiny_run_args
from training.checkpoint import load_archive
from training.config import load_config

REPO = Path(__file__).resolve().parents[1]
B = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    model = tiny_model_dir(root / "model")
    train, test = tiny_data(root, n_train=16, n_test=8)
    return root, model, train, test


def dpo_args(tiny, run: str, **overrides) -> list[str]:
    root, model, train, test = tiny
    settings = dict(run_dir=root / run, loss__name="dpo", loss__beta=0.5, model__reference_dtype="float32")
    return tiny_run_args(root, model, train, test, **{**settings, **overrides})


def one_step_args(tiny, run: str, ga: int, **overrides) -> list[str]:
    return dpo_args(tiny, run, batch_size=B, gradient_accumulation_steps=ga, optimizer="SGD", lr=1.0, warmup_steps=0,
                    max_grad_norm=1e9, n_epochs=None, n_examples=B, do_first_eval=False, **overrides)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_main(*argvs: list[str]) -> None:
    reset_accelerate()
    for argv in argvs:
        dpo_train.main(argv)


def records(run_dir: Path, key: str = "loss/train") -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_archive(run_dir / "LATEST" / "policy.pt")["state"]


def expected_step(tiny, beta: float = 0.5) -> tuple[float, dict, dict]:
    """(loss, w0, w0 - g): g from autograd on the mean DPO loss of the first batch's pairs, each sequence forwarded alone."""
    root, model_dir, train, test = tiny
    config = load_config(one_step_args(tiny, "unused", 1))
    tokenizer = load_tokenizer(config.model)
    pairs = build_pair_split(["hh"], "train", {"hh": {"train": [str(train)]}}, tokenizer,
                             TokenizeSettings(config.max_length, config.max_prompt_length), None)
    from data.batches import plan_batches
    from data.pairs import prompt_groups

    first = next(plan_batches(len(pairs), B, config.seed, None, B, groups=prompt_groups(pairs)))
    torch.manual_seed(config.seed)
    model = load_model(config.model)
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def logp(m, prompt, response):
        ids = torch.tensor([prompt + response])
        logps = torch.log_softmax(m(input_ids=ids).logits[0, :-1].float(), -1)
        return logps[len(prompt) - 1:].gather(1, torch.tensor(response)[:, None]).sum()

    losses = []
    for i in first.indices:
        p = pairs[i]
        with torch.no_grad():
            ref = logp(model, p["prompt_ids"], p["chosen_ids"]) - logp(model, p["prompt_ids"], p["rejected_ids"])
        h = logp(model, p["prompt_ids"], p["chosen_ids"]) - logp(model, p["prompt_ids"], p["rejected_ids"]) - ref
        losses.append(-F.logsigmoid(beta * h))
    loss = torch.stack(losses).mean()
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            param -= param.grad
    return loss.item(), w0, {k: v.detach().clone() for k, v in model.state_dict().items()}


def relative_gap(a: dict, b: dict, w0: dict) -> float:
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b)
    den = sum(((b[k].double() - w0[k].double()) ** 2).sum() for k in b)
    return float((num / den).sqrt())


@pytest.mark.slow
def test_one_dpo_step_is_the_same_for_every_split(tiny):
    """1 process x 1 or 4 micro-batches, packed, and 2 processes x 2 micro-batches: one SGD step with lr 1 moves the weights
    by exactly the gradient of the mean DPO loss over the batch's pairs (computed pair by pair, unpadded)."""
    root = tiny[0]
    run_main(one_step_args(tiny, "1x1", 1), one_step_args(tiny, "1x4", 4), one_step_args(tiny, "1x2-packed", 2, packing=True))
    debug_launcher(run_main, args=(one_step_args(tiny, "2x2", 2),), num_processes=2)
    loss, w0, w1 = expected_step(tiny)
    assert loss == pytest.approx(math.log(2), rel=1e-6)  # at w0 the policy equals the reference; the gradient is not 0
    for name in ("1x1", "1x4", "1x2-packed", "2x2"):
        (step,) = records(root / name)
        assert step["loss/train"] == pytest.approx(loss, rel=1e-6), name
        assert relative_gap(weights(root / name), w1, w0) < 1e-5, name
        assert step["rewards_train/accuracies"] == 0.0  # policy = reference: equal rewards are not "accurate"
    assert relative_gap(w1, w0, {k: torch.zeros_like(v) for k, v in w0.items()}) > 1e-4  # the step moved the weights


@pytest.mark.slow
def test_precomputed_reference_logps_equal_the_live_reference(tiny, capsys):
    """Losses at the first and the last step and every eval (also after training, when a mistaken implementation would
    score the eval pairs with the trained policy) equal those of the live reference; a second run reads the cache."""
    root = tiny[0]
    common = dict(n_epochs=2, eval_every=8, optimizer="SGD", lr=1.0)  # SGD: float noise is not amplified as by RMSprop
    run_main(dpo_args(tiny, "live", **common), dpo_args(tiny, "pre", reference_logps="precompute", **common))
    assert "reference log-probs of 4 eval pairs computed" in capsys.readouterr().out
    live, pre = records(root / "live"), records(root / "pre")
    assert len(live) == len(pre) == 8
    for step in (0, -1):
        for key in ("loss/train", "rewards_train/margins", "grad_norm"):
            # padding widths differ between the two paths: log-probs near -50 agree to float32 noise, not bit for bit
            assert pre[step][key] == pytest.approx(live[step][key], rel=1e-5, abs=1e-5), (step, key)
    live_eval, pre_eval = records(root / "live", "loss/eval"), records(root / "pre", "loss/eval")
    assert [r["examples_seen"] for r in pre_eval] == [0, 8, 16, 24, 32]
    for a, b in zip(live_eval, pre_eval):
        assert b["loss/eval"] == pytest.approx(a["loss/eval"], rel=1e-5), a["examples_seen"]
        # rewards hold the policy's log-probs: a one-ulp reference difference (batch composition) at one train pair grows to
        # ~1e-4 in them after a few SGD steps at lr 1; a reference scored with the trained policy would be off by ~1
        assert b["rewards_eval/chosen"] == pytest.approx(a["rewards_eval/chosen"], rel=1e-5, abs=1e-4), a["examples_seen"]
    assert live_eval[-1]["loss/eval"] < math.log(2) - 1e-3  # training moved the policy away from the reference

    run_main(dpo_args(tiny, "pre-again", reference_logps="precompute", **common))
    out = capsys.readouterr().out
    assert "reference log-probs of 16 train pairs read from" in out and "computed" not in out
    assert records(root / "pre-again")[-1]["loss/train"] == pre[-1]["loss/train"]


@pytest.mark.slow
def test_dpo_resume_is_bit_exact(tiny):
    """Stopped after 3 updates and resumed (also with precomputed reference log-probs), a run ends with the same weights
    and metrics as the uninterrupted one."""
    root = tiny[0]
    for mode in ("live", "precompute"):
        common = dict(n_epochs=2, eval_every=8, optimizer="AdamW", reference_logps=mode)
        whole, parts = f"whole-{mode}", f"parts-{mode}"
        run_main(dpo_args(tiny, whole, **common), dpo_args(tiny, parts, max_updates_this_run=3, **common),
                 dpo_args(tiny, parts, resume_from="auto", **common))
        a, b = weights(root / whole), weights(root / parts)
        assert all(torch.equal(a[k], b[k]) for k in a), mode
        strip = lambda rs: [{k: v for k, v in r.items() if "per_second" not in k and k != "peak_memory_gb"} for r in rs]
        assert strip(records(root / parts)) == strip(records(root / whole)), mode
        assert strip(records(root / parts, "loss/eval")) == strip(records(root / whole, "loss/eval")), mode


def subprocess_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("ACCELERATE_USE_CPU", None)
    return env


@pytest.mark.slow
def test_sft_then_dpo_through_the_command_line(tmp_path):
    """python sft_train.py recipes/demo.yaml, then python dpo_train.py recipes/demo_dpo.yaml on its LATEST/policy.pt: the
    archive loads strictly into both models (the first eval sees policy = reference: loss ln 2, rewards 0), and the DPO
    run leaves the same checkpoint contract (policy.pt, hf export). Both command lines run, one after the other, in children
    forked from one process that imported the libraries once (tests/cli_runner.py), each as `python SCRIPT ARGS` would."""
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    small = ["n_examples=64", "eval_every=64", "n_eval_examples=16", "eval_batch_size=16", "batch_size=16",
             "n_eval_model_samples=4", f"local_dirs=[{tmp_path}]"]
    cases = [{"id": "sft", "argv": ["sft_train.py", "recipes/demo.yaml", f"run_dir={sft}", "export=false", *small]},
             {"id": "dpo", "argv": ["dpo_train.py", "recipes/demo_dpo.yaml", f"run_dir={dpo}",
                                    f"model.archive={sft / 'LATEST' / 'policy.pt'}", *small]}]
    (tmp_path / "cases.json").write_text(json.dumps([{**case, "cwd": str(REPO)} for case in cases]))
    subprocess.run([sys.executable, str(REPO / "tests" / "cli_runner.py"), str(tmp_path / "cases.json"),
                    str(tmp_path / "results.json")], cwd=REPO, env=subprocess_env(), check=True, timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["id"] for r in results] == ["sft", "dpo"]
    for result in results:
        assert result["code"] == 0, (result["id"], result["stderr"][-3000:])
    assert "train: 12000 pairs of 12000 prompts" in results[1]["stdout"]
    assert "done: 64 examples, 4 updates" in results[0]["stdout"] and "policy (the input of DPO)" in results[0]["stdout"]
    assert "done: 64 pairs, 4 updates" in results[1]["stdout"]  # batch_size and n_examples count pairs here
    assert f"policy (the DPO-trained policy): {dpo}/LATEST/policy.pt" in results[1]["stdout"]
    outputs = results[1]["stdout"].split("done: ")[1].splitlines()[1:]  # policy, export, plots: their paths in one column
    assert len(outputs) == 3 and len({line.index(str(dpo)) for line in outputs}) == 1, outputs
    log = results[1]["stdout"] + results[1]["stderr"]
    assert all(f"loading archive {sft / 'LATEST' / 'policy.pt'} into the {role} (step 64" in log for role in ("reference", "policy"))
    first, last = records(dpo, "loss/eval")[0], records(dpo, "loss/eval")[-1]
    assert first["examples_seen"] == 0 and first["loss/eval"] == pytest.approx(math.log(2), rel=1e-6)
    assert first["rewards_eval/margins"] == 0.0 and first["rewards_eval/accuracies"] == 0.0
    assert last["examples_seen"] == 64 and last["rewards_eval/accuracies"] > 0.5
    sft_state, dpo_archive = weights(sft), load_archive(dpo / "LATEST" / "policy.pt")
    assert dpo_archive["step_idx"] == 64 and set(dpo_archive["state"]) == set(sft_state)
    assert (dpo / "hf" / "model.safetensors").is_file() and (dpo / "loss.png").is_file()


@pytest.mark.slow
def test_fsdp_shards_the_reference_like_the_policy(tiny, tmp_path):
    """Forced FSDP2 on 2 CPU processes: the live reference is sharded per block as the policy is (only rank 0 reads the
    weights; the other receives its shards), and the run matches one process."""
    from tests.test_distributed import FORCED, make_tiny_llama, run_forked

    root = tiny[0]
    model_dir = make_tiny_llama(tmp_path / "llama")  # saved weights: from_pretrained loads them on rank 0 only under FSDP
    common = dict(model__random_init=False, model__name_or_path=model_dir, model__block_name="LlamaDecoderLayer",
                  batch_size=4, gradient_accumulation_steps=2, n_epochs=None, n_examples=8, eval_every=8, optimizer="AdamW")
    run_main(dpo_args(tiny, "fsdp-1proc", **common))
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    result = run_forked([FORCED, "fsdp", "--script", "dpo_train", *dpo_args(tiny, "fsdp-2proc", **common)], tmp_path,
                        timeout=600, **env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "reference model: float32, sharded in 3 FSDP2 units" in result.stdout  # 2 blocks + the root
    assert json.loads((root / "fsdp-2proc" / "parallel.json").read_text())["mode"] == "fsdp"
    one, two = records(root / "fsdp-1proc"), records(root / "fsdp-2proc")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("loss/train", "grad_norm", "rewards_train/margins", "logps_train/chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(records(root / "fsdp-1proc", "loss/eval"), records(root / "fsdp-2proc", "loss/eval")):
        assert b["loss/eval"] == pytest.approx(a["loss/eval"], rel=1e-5)
        assert b["logps_eval/rejected"] == pytest.approx(a["logps_eval/rejected"], rel=1e-5)
