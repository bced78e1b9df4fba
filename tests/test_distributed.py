"""Scaling out: DDP, FSDP2 and tensor parallelism reproduce the one-process run; bad combinations fail early.

    python -m pytest tests/test_distributed.py -m "not slow"     # unit checks, a few seconds
    python -m pytest tests/test_distributed.py                   # plus 2-process CPU runs (about 2 minutes on 2 cores)

The multi-process tests run the real script on 2 gloo processes. DDP goes through `accelerate launch` with
accelerate_configs/cpu_2proc.yaml; FSDP2 and TP, which accelerate refuses on CPU, go through
tests/dist_scripts/forced_launch.py, which only switches the Accelerator's state (shared/design/cpu-parallel.md), in 2
processes forked from the test process (run_forked; the launcher itself where a run needs a fresh interpreter). All runs
train the same tiny Llama on the same global batches.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from accelerate.utils import DistributedType

from training import checkpoint as ckpt
from training.config import ConfigError, build_config
from training.distributed import (block_candidates, check_setup, data_parallel, fsdp_plugin, model_load_kwargs, prepare_model,
                                  raise_open_file_limit)
from training.state_dicts import ids_to_names, names_to_ids

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo"
FORCED = REPO / "tests" / "dist_scripts" / "forced_launch.py"


def make_tiny_llama(path: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A 2-layer Llama (hidden 32) with the demo tokenizer, saved as a real checkpoint (TP needs from_pretrained)."""
    config = json.loads((DEMO / "config.json").read_text())
    config.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=hidden // 2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO / name, path / name)
    return path


def recipe(model_dir: Path, **extra) -> list[str]:
    """3 AdamW updates of 4 examples (2 micro-batches), evals with 3 samples at 0, 8 and 12 examples, a step-8 checkpoint."""
    args = {
        "exp_name": "dist", "model": "blank_model", "model.name_or_path": model_dir, "model.block_name": "LlamaDecoderLayer",
        "datasets": "[hh]", "data_files.hh.train": DEMO / "train.jsonl", "data_files.hh.test": DEMO / "test.jsonl",
        "batch_size": 4, "gradient_accumulation_steps": 2, "optimizer": "AdamW", "lr": 1e-2, "warmup_steps": 0,
        "n_epochs": "null", "n_examples": 12, "n_eval_examples": 8, "eval_batch_size": 4, "eval_every": 8,
        "sample_during_eval": "true", "n_eval_model_samples": 3, "max_new_tokens": 4, "max_length": 64,
        "max_prompt_length": 48, "minimum_log_interval_secs": 0, "wandb.enabled": "false", "export": "false",
    }
    return [f"{k}={v}" for k, v in {**args, **extra}.items()]


def config_for(model_dir: Path, **extra):
    return build_config({"exp_name": "x", "model": {"name": "blank_model", "name_or_path": str(model_dir),
                                                     "block_name": "LlamaDecoderLayer", **extra}})


def fake_accelerator(mode: str, rank: int = 0, world: int = 2):
    """What parallel_mode/check_setup/data_parallel (and start_run, for the attention kernel) read from an Accelerator."""
    tp = SimpleNamespace(tp_enabled=True, tp_size=world) if mode == "tp" else None
    kind = {"single": DistributedType.NO, "ddp": DistributedType.MULTI_CPU, "fsdp": DistributedType.FSDP,
            "tp": DistributedType.MULTI_CPU}[mode]
    return SimpleNamespace(parallelism_config=tp, distributed_type=kind, num_processes=1 if mode == "single" else world,
                           process_index=rank, device=torch.device("cpu"))


# ---- unit checks ----

def test_fsdp_plugin_takes_block_precision_and_checkpointing_from_the_recipe(tiny_llama, monkeypatch):
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # the plugin writes it back; monkeypatch restores it
    monkeypatch.setenv("FSDP_VERSION", "2")
    config = config_for(tiny_llama, fsdp_policy_mp="bfloat16")
    config.activation_checkpointing = True
    plugin = fsdp_plugin(config)
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy  # without it the class names would be ignored
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert (plugin.mixed_precision_policy.param_dtype, plugin.mixed_precision_policy.reduce_dtype) == (torch.bfloat16,) * 2
    assert plugin.activation_checkpointing is True
    assert plugin.cpu_ram_efficient_loading is True and os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "True"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert fsdp_plugin(config_for(tiny_llama)).mixed_precision_policy is None  # fsdp_policy_mp null: policy_dtype throughout


def test_fsdp_plugin_refuses_fsdp1_and_a_missing_block_name(tiny_llama, monkeypatch):
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1; this suite runs FSDP2 only"):
        fsdp_plugin(config_for(tiny_llama))
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match="model.block_name is required with FSDP"):
        fsdp_plugin(config_for(tiny_llama, block_name=None))


def test_fsdp_block_name_absent_from_the_model_lists_the_block_classes(tiny_llama):
    with pytest.raises(ConfigError) as err:
        check_setup(config_for(tiny_llama, block_name="GPTNeoXLayer"), fake_accelerator("fsdp"))
    assert "model.block_name='GPTNeoXLayer' matches no module of LlamaForCausalLM" in str(err.value)
    assert str(err.value).endswith("its block classes: LlamaDecoderLayer")
    check_setup(config_for(tiny_llama), fake_accelerator("fsdp"))  # the right name passes
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
    assert block_candidates(model) == ["GPT2Block"]


def test_tensor_parallel_needs_a_model_with_a_plan_and_all_processes(tiny_llama, tmp_path):
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(gpt2)
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel \(.*gpt2\) has no tensor-parallel plan"):
        check_setup(config_for(gpt2, block_name="GPT2Block"), fake_accelerator("tp"))
    check_setup(config_for(tiny_llama), fake_accelerator("tp"))
    accelerator = fake_accelerator("tp", world=4)
    accelerator.parallelism_config.tp_size = 2
    with pytest.raises(ConfigError, match=r"tp_size \(2\) must equal the number of processes \(4\)"):
        check_setup(config_for(tiny_llama), accelerator)
    with pytest.raises(ConfigError, match="model.random_init and model.archive are not supported"):
        check_setup(config_for(tiny_llama, random_init=True), fake_accelerator("tp"))
    kwargs = model_load_kwargs(config_for(tiny_llama), fake_accelerator("tp"))
    assert list(kwargs) == ["distributed_config"] and kwargs["distributed_config"].tp_size == 2


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "tp"])
def test_device_map_is_refused_with_several_processes(tiny_llama, mode):
    with pytest.raises(ConfigError, match=rf"model.device_map=balanced spreads ONE process .* this launch has 2 processes \({mode}\)"):
        check_setup(config_for(tiny_llama, device_map="balanced"), fake_accelerator(mode))


def test_device_map_goes_to_from_pretrained_in_one_process(tiny_llama):
    config = config_for(tiny_llama, device_map="balanced")
    check_setup(config, fake_accelerator("single"))
    assert model_load_kwargs(config, fake_accelerator("single")) == {"device_map": "balanced"}
    assert model_load_kwargs(config_for(tiny_llama), fake_accelerator("single")) == {}
    with pytest.raises(ConfigError, match="does not apply to model.random_init"):
        check_setup(config_for(tiny_llama, device_map="balanced", random_init=True), fake_accelerator("single"))


def test_data_parallel_rank_and_size_per_mode():
    assert data_parallel(fake_accelerator("single")) == (0, 1)
    assert data_parallel(fake_accelerator("ddp", rank=1)) == (1, 2)
    assert data_parallel(fake_accelerator("fsdp", rank=1)) == (1, 2)
    assert data_parallel(fake_accelerator("tp", rank=1)) == (0, 1)  # TP ranks share the batch


def test_open_file_soft_limit_is_raised_to_the_hard_limit_for_several_processes():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip(f"hard open-file limit {hard} cannot be tested")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard))
        assert raise_open_file_limit(fake_accelerator("single")) is None
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (32, hard)
        assert raise_open_file_limit(fake_accelerator("ddp")) == f"raised the open-file soft limit from 32 to {hard}"
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert raise_open_file_limit(fake_accelerator("ddp")) is None  # already at the hard limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_optimizer_state_converts_between_parameter_names_and_ids():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW([{"params": [model[0].weight, model[0].bias]}, {"params": list(model[2].parameters()), "lr": 0.1}])
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    by_id = optimizer.state_dict()
    model[2] = checkpoint_wrapper(model[2])  # wrappers rename parameters; the saved names must not change
    by_name = ids_to_names(by_id, model, optimizer)
    assert list(by_name["state"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [g["params"] for g in by_name["param_groups"]] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    assert by_name["state"]["2.bias"]["exp_avg"] is by_id["state"][3]["exp_avg"]
    back = names_to_ids(by_name)
    assert back["param_groups"] == by_id["param_groups"]
    assert list(back["state"]) == [0, 1, 2, 3] and all(back["state"][i] is by_id["state"][i] for i in range(4))


def test_prepare_model_keeps_buffers_float32_under_fsdp_mixed_precision_and_checkpoints_blocks_otherwise(tiny_llama):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    prepare_model(config_for(tiny_llama, fsdp_policy_mp="bfloat16"), fake_accelerator("fsdp"), model)
    assert {name: b.dtype for name, b in model.named_buffers()} == \
        {"model.rotary_emb.inv_freq": torch.float32, "model.rotary_emb.original_inv_freq": torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights stay in policy_dtype
    config = config_for(tiny_llama)
    config.activation_checkpointing = True
    prepare_model(config, fake_accelerator("ddp"), model)
    assert model.is_activation_checkpointing


@pytest.mark.parametrize("mode, extra, message", [
    ("ddp", ["model.device_map=balanced"], "model.device_map=balanced spreads ONE process"),
    ("fsdp", ["model.block_name=GPT2Block"], "model.block_name='GPT2Block' matches no module of LlamaForCausalLM"),
])
def test_the_script_stops_on_a_bad_combination_before_loading_anything(tiny_llama, tmp_path, monkeypatch, mode, extra, message):
    import sft_train
    import stage

    monkeypatch.setattr(stage, "build_accelerator", lambda config: fake_accelerator(mode))
    with pytest.raises(ConfigError, match=message):
        sft_train.main([*recipe(tiny_llama), f"run_dir={tmp_path / 'r'}", f"local_dirs=[{tmp_path}]",
                        *extra])
    assert not (tmp_path / "r").exists()


def test_the_process_group_gets_the_configured_time_out():
    import datetime

    from training.distributed import process_group_kwargs

    config = build_config({"exp_name": "x", "dist_timeout_minutes": 0.5})
    assert process_group_kwargs(config).to_kwargs() == {"timeout": datetime.timedelta(seconds=30)}
    assert build_config({"exp_name": "x"}).dist_timeout_minutes == 60  # not NCCL's 10 minutes


def test_data_is_prepared_once_per_node_on_node_local_disk_and_once_in_all_on_shared_storage(tmp_path, monkeypatch):
    import datetime

    from training.distributed import data_first, on_shared_storage

    mounts = "/dev/sda1 / ext4 rw 0 0\nhome:/export /home nfs4 rw 0 0\n/dev/nvme0 /scr-ssd xfs rw 0 0\n" \
             "lfs@o2ib:/fs /lustre lustre rw 0 0\nfs /mnt/fuse fuse.sshfs rw 0 0\n"
    assert not on_shared_storage("/scr-ssd/alice/cache", mounts)
    assert on_shared_storage("/home/alice/cache", mounts)
    assert on_shared_storage("/lustre/alice", mounts) and on_shared_storage("/mnt/fuse/x", mounts)
    assert not on_shared_storage("/homework", mounts)  # a prefix of the name is not a mount point above it

    waits = []
    for local_rank, rank in ((0, 0), (0, 8), (3, 11)):  # node 0's first, node 1's first, another process of node 1
        accelerator = SimpleNamespace(num_processes=16, is_local_main_process=local_rank == 0, is_main_process=rank == 0)
        for node_local in (True, False):
            with monkeypatch.context() as m:
                m.setattr(torch.distributed, "new_group", lambda **kw: kw)
                m.setattr(torch.distributed, "barrier", lambda group: waits.append(("barrier", group["timeout"])))
                m.setattr(torch.distributed, "destroy_process_group", lambda group: None)
                with data_first(accelerator, tmp_path, node_local):
                    waits.append(("prepare", rank, node_local))
    day = datetime.timedelta(days=1)
    # the first process of a cache prepares, then releases the others; they wait first (in a gloo group, for up to a day)
    assert waits == [("prepare", 0, True), ("barrier", day), ("prepare", 0, False), ("barrier", day),
                     ("prepare", 8, True), ("barrier", day), ("barrier", day), ("prepare", 8, False),
                     ("barrier", day), ("prepare", 11, True), ("barrier", day), ("prepare", 11, False)]
    with data_first(SimpleNamespace(num_processes=1, is_local_main_process=True, is_main_process=True), tmp_path / "new", None):
        pass  # one process: no group; the file system type is detected from this machine's mounts


def test_the_cache_is_per_user_under_the_local_dir(tmp_path, monkeypatch):
    import getpass

    from training.config import cache_dir, default_run_dir

    monkeypatch.setattr(getpass, "getuser", lambda: "bob")
    config = build_config({"exp_name": "x", "local_dirs": [str(tmp_path / "missing"), str(tmp_path)]})
    assert cache_dir(config) == tmp_path / "bob" / "cache"  # another user's {local_dir}/cache never gets in the way
    assert default_run_dir(config).parent == tmp_path / "bob"


# ---- 2-process runs ----

def run(command: list[str], tmp: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", **env}
    env = {k: v for k, v in env.items() if v is not None}
    result = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    (tmp / f"log-{len(list(tmp.glob('log-*')))}.txt").write_text(result.stdout + result.stderr)
    return result


def run_forked(command: list[str], tmp: Path, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 script ARGS` (command: [script, *ARGS]) on CPU, without the launcher
    and without fresh interpreters: two children forked from this process, which has torch, transformers and the scripts
    imported already (about 10 s per run on 2 cores). Each child gets the environment the launcher gives its workers
    (RANK, WORLD_SIZE, MASTER_ADDR, ... and accelerate's settings), its own accelerate state, and runs the script as
    __main__; whatever a run patches ends with its child, and when one child fails the other is stopped, as the launcher
    does. A compile=true child compiles in its own thread (the compile workers of this process are not the child's); the
    compile caches are shared. Environment read at interpreter start-up (MALLOC_*) does not reach a child: set such things
    from the script (forced_launch.py's MMAP_THRESHOLD)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp / f"log-{len(list(tmp.glob('log-*')))}.txt"
    base = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "ACCELERATE_MIXED_PRECISION": "no",
            "ACCELERATE_DYNAMO_BACKEND": "NO", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", **env}
    pids = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                from accelerate.state import AcceleratorState, GradientState

                os.environ.update({**base, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                out = os.open(f"{log}.{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(out, 1)
                os.dup2(out, 2)
                sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
                logging.root.handlers = []  # logging as in a fresh interpreter, not into this process's captured log
                logging.root.setLevel(logging.WARNING)
                AcceleratorState._reset_state(True)
                GradientState._reset_state()
                if "compile=true" in command:
                    import torch._inductor.config as inductor

                    inductor.compile_threads = 1
                sys.argv = [str(c) for c in command]
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    deadline, codes = time.monotonic() + timeout, {}
    try:
        while len(codes) < len(pids):
            for pid in set(pids) - set(codes):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline or any(codes.values()):  # as the launcher, stop the other when one fails
                break
            time.sleep(0.05)
    finally:  # also when this process is interrupted: no child outlives the test
        for pid in set(pids) - set(codes):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            codes[pid] = -signal.SIGKILL
    output = "".join(Path(f"{log}.{rank}").read_text(errors="replace") for rank in range(2))
    log.write_text(output)
    returncode = next((c for c in (codes[p] for p in pids) if c != 0), 0)
    return subprocess.CompletedProcess(command, returncode, output, "")


def in_process(args: list[str]) -> None:
    """sft_train.main(args) here, on a fresh accelerate state (an earlier run or a fake accelerator may have left one)."""
    import sft_train
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    sft_train.main(args)


def launch(tmp: Path, run_dir: Path, model_dir: Path, mode: str, *extra: str, env: dict | None = None, ok: bool = True):
    """mode: 1proc (sft_train.main in this process: the reference runs need no fresh interpreter, and the real command line
    is run by ddp and tests/test_first_contact.py), ddp (cpu_2proc.yaml through the real launcher), ddp_forked (the same 2
    gloo processes, forked: see run_forked), fsdp or tp (forced on 2 CPU processes, forked). `env`: more environment variables (forced_launch.py's hooks). `ok=False`: the run must fail; its output is
    returned."""
    args = [*recipe(model_dir), f"run_dir={run_dir}", f"local_dirs=[{tmp / 'cache'}]", *extra]
    env = env or {}
    if mode == "1proc":
        assert ok and not env, "1proc runs in this process: no hooks, and it must succeed"
        in_process(args)
        return run_dir
    if mode == "ddp":
        # No ACCELERATE_USE_CPU: the script itself must make the two processes one group (two solo rank-0 processes would
        # each log every step, which assert_same_training catches).
        result = run(["-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml", "sft_train.py", *args],
                     tmp, ACCELERATE_USE_CPU=None)
    elif mode == "ddp_forked":
        result = run_forked([REPO / "sft_train.py", *args], tmp, **env)
    else:
        fsdp_env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
        env = {**(fsdp_env if mode == "fsdp" else {}), **env}
        result = run_forked([FORCED, mode, *args], tmp, **env)
    if not ok:
        assert result.returncode != 0, "the run should have failed"
        return result.stdout + result.stderr
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(run_dir: Path, baseline: Path, rel: float = 1e-5) -> None:
    ours, theirs = metrics(run_dir), metrics(baseline)
    assert [m["examples_seen"] for m in ours] == [m["examples_seen"] for m in theirs] == [0, 4, 8, 8, 12, 12]
    for a, b in zip(ours, theirs):
        for key in ("loss/train", "nll_per_token/train", "grad_norm", "loss/eval", "nll_per_token/eval"):
            assert (key in a) == (key in b)
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=rel), (a["examples_seen"], key)
    assert_same_checkpoint(run_dir / "LATEST", baseline / "LATEST")
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["examples_seen"] for s in samples] == [0, 0, 0, 8, 8, 8, 12, 12, 12]  # 3 samples per eval, none doubled


def assert_same_checkpoint(ours: Path, theirs: Path, atol: float = 1e-5) -> None:
    policy, reference = torch.load(ours / "policy.pt")["state"], torch.load(theirs / "policy.pt")["state"]
    assert list(policy) == list(reference)  # the unwrapped model's keys, in order
    for key in reference:
        assert policy[key].dtype == reference[key].dtype and not isinstance(policy[key], torch.distributed.tensor.DTensor)
        torch.testing.assert_close(policy[key], reference[key], atol=atol, rtol=0, msg=key)
    optim, optim_ref = torch.load(ours / "optimizer.pt")["state"], torch.load(theirs / "optimizer.pt")["state"]
    assert optim["param_groups"] == optim_ref["param_groups"]
    n_params = sum(len(g["params"]) for g in optim_ref["param_groups"])  # all parameters, or a LoRA run's adapters
    assert list(optim["state"]) == list(optim_ref["state"]) == list(range(n_params))
    assert n_params == (len(torch.load(theirs / "adapter.pt")["state"]) if (theirs / "adapter.pt").exists() else len(reference))
    for i, state in optim_ref["state"].items():
        assert set(optim["state"][i]) == set(state)
        for name, value in state.items():
            torch.testing.assert_close(optim["state"][i][name], value, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def runs(dist_runs) -> dict:
    """The 1-process baseline (tests/conftest.py dist_runs)."""
    return dist_runs


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(runs):
    run_dir = launch(runs["tmp"], runs["tmp"] / "ddp", runs["model"], "ddp")
    assert_same_training(run_dir, runs["1proc"])


@pytest.fixture(scope="module")
def fsdp_run(runs) -> Path:
    # save_full_optimizer: the full optimizer.pt next to the sharded resume state, to compare with the 1-process run
    return launch(runs["tmp"], runs["tmp"] / "fsdp", runs["model"], "fsdp", "save_full_optimizer=true")


@pytest.mark.slow
def test_fsdp2_wraps_exactly_the_blocks_and_matches_one_process(fsdp_run, runs):
    facts = json.loads((fsdp_run / "parallel.json").read_text())
    assert facts["mode"] == "fsdp"
    units = dict(facts["fsdp_units"])
    blocks = {name for name, cls in units.items() if cls == "FSDPLlamaDecoderLayer"}
    assert blocks == {"model.layers.0", "model.layers.1"}
    # Besides the blocks, accelerate gives the root, the input embedding and the output tail their own units.
    assert set(units) - blocks == {"", "model.embed_tokens", "model.norm", "lm_head"}
    assert_same_training(fsdp_run, runs["1proc"])
    assert sorted(p.name for p in fsdp_run.iterdir() if p.is_dir()) == ["LATEST", "step-8"]


def assert_resumed_exactly(dump: Path, checkpoint: Path) -> None:
    """The full model and optimizer state right after a resume equal, bit for bit, those the checkpoint was saved from."""
    loaded = torch.load(dump)
    policy, optim = ckpt.load_archive(checkpoint / "policy.pt")["state"], ckpt.load_archive(checkpoint / "optimizer.pt")["state"]
    assert list(loaded["policy"]) == list(policy)
    assert all(torch.equal(loaded["policy"][k], v) for k, v in policy.items())
    assert loaded["optimizer"]["param_groups"] == optim["param_groups"]
    assert list(loaded["optimizer"]["state"]) == list(optim["state"])
    for i, state in optim["state"].items():
        assert set(loaded["optimizer"]["state"][i]) == set(state)
        assert all(torch.equal(loaded["optimizer"]["state"][i][k], v) for k, v in state.items()), i


@pytest.mark.slow
def test_sharded_resume_state_from_2_processes_resumes_bit_exactly_on_1(fsdp_run, runs, tmp_path, monkeypatch):
    import training.loop
    from tests.forcing import dumping_resume

    checkpoint = fsdp_run / "step-8"
    assert ckpt.is_sharded(checkpoint) and (checkpoint / "resume" / ".metadata").is_file()
    assert sorted(p.name for p in (checkpoint / "resume").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    monkeypatch.setattr(training.loop, "resume", dumping_resume(training.loop.resume, str(tmp_path / "resumed.pt")))
    launch(runs["tmp"], tmp_path / "on-1", runs["model"], "1proc", f"resume_from={checkpoint}", "save_full_optimizer=true")
    assert_resumed_exactly(tmp_path / "resumed.pt", checkpoint)
    # and the next steps follow the 2-process run (1 and 2 processes agree to float rounding, see assert_same_training)
    assert metrics(tmp_path / "on-1")[0]["loss/train"] == pytest.approx(metrics(fsdp_run)[4]["loss/train"], rel=1e-5)
    assert not ckpt.is_sharded(tmp_path / "on-1" / "LATEST")  # one process writes the full layout


@pytest.mark.slow
def test_a_full_checkpoint_of_one_process_resumes_under_fsdp2(runs, tmp_path):
    checkpoint = runs["1proc"] / "step-8"  # the full layout (policy.pt + optimizer.pt), as all checkpoints used to be
    assert not ckpt.is_sharded(checkpoint)
    run_dir = launch(runs["tmp"], tmp_path / "run", runs["model"], "fsdp", f"resume_from={checkpoint}",
                     env={"DUMP_RESUMED": str(tmp_path / "resumed.pt")})
    assert_resumed_exactly(tmp_path / "resumed.pt", checkpoint)
    assert metrics(run_dir)[0]["loss/train"] == pytest.approx(metrics(runs["1proc"])[4]["loss/train"], rel=1e-5)


@pytest.mark.slow
def test_fsdp2_resumes_from_its_checkpoint_with_activation_checkpointing(fsdp_run, runs):
    dump = runs["tmp"] / "fsdp-resumed.pt"
    resumed = launch(runs["tmp"], runs["tmp"] / "fsdp-resumed", runs["model"], "fsdp", "save_full_optimizer=true",
                     f"resume_from={fsdp_run / 'step-8'}", "activation_checkpointing=true", env={"DUMP_RESUMED": str(dump)})
    assert_resumed_exactly(dump, fsdp_run / "step-8")  # the sharded resume state, back on 2 processes
    assert [m["examples_seen"] for m in metrics(resumed)] == [12, 12]
    assert metrics(resumed)[0]["loss/train"] == pytest.approx(metrics(fsdp_run)[4]["loss/train"], rel=1e-5)
    assert_same_checkpoint(resumed / "LATEST", fsdp_run / "LATEST")
    # accelerate shards each checkpointed block inside its (parameter-less) checkpoint wrapper
    units = json.loads((resumed / "parallel.json").read_text())["fsdp_units"]
    assert [name for name, cls in units if cls == "FSDPLlamaDecoderLayer"] == \
        ["model.layers.0._checkpoint_wrapped_module", "model.layers.1._checkpoint_wrapped_module"]
    assert [name for name, cls in units if cls == "FSDPCheckpointWrapper"] == ["model.layers.0", "model.layers.1"]


@pytest.mark.slow
def test_tensor_parallel_two_processes_match_one_process(runs):
    run_dir = launch(runs["tmp"], runs["tmp"] / "tp", runs["model"], "tp", "save_full_optimizer=true")
    facts = json.loads((run_dir / "parallel.json").read_text())
    assert facts["mode"] == "tp" and facts["fsdp_units"] == []
    assert "model.layers.0.self_attn.q_proj.weight" in facts["dtensor_params"]  # really sharded
    assert_same_training(run_dir, runs["1proc"])


@pytest.mark.slow
def test_sharded_save_holds_one_full_copy_on_rank_0_and_no_process_waits_for_its_write(runs, tmp_path):
    """A 2.8M-parameter model (11 MB in fp32, AdamW state 22 MB more) under FSDP2 on 2 processes. During the step-4 save the
    main process's resident memory grows by about one full copy of the weights: the gathered policy.pt (before: the full
    model plus the full optimizer state, 3 copies). With a 6 s process-group time-out, data preparation on the main process
    that takes 10 s longer and a LATEST/policy.pt write that takes 10 s, the run finishes: no process waits in a training
    collective for the main process's work. With a barrier after each save (how saving used to end) the same run, without
    the slow data preparation, dies of the time-out: the barrier alone makes it fail. Each slow part outlasts the time-out
    by at least 4 s."""
    model = make_tiny_llama(tmp_path / "model", hidden=256, layers=4)
    model_bytes = sum(t.numel() * t.element_size() for t in transformers.AutoModelForCausalLM.from_pretrained(model).state_dict().values())
    extra = ("n_examples=8", "eval_every=4", "sample_during_eval=false", "dist_timeout_minutes=0.1")
    env = {"MMAP_THRESHOLD": "65536",  # large blocks go back to the system when freed, so RSS follows live memory
           "SLOW_LATEST_WRITE": "10"}
    run_dir = launch(runs["tmp"], tmp_path / "run", model, "fsdp", *extra, env={**env, "MEASURE_SAVE_MEMORY": "1", "SLOW_DATA": "10"})
    peak = json.loads((run_dir / "save_memory.json").read_text())["step-4"]
    print(f"model {model_bytes / 2**20:.1f} MiB; peak extra resident memory of rank 0 during the step-4 save {peak / 2**20:.1f} MiB")
    assert peak < 1.5 * model_bytes
    assert ckpt.is_complete(run_dir / "LATEST") and ckpt.is_sharded(run_dir / "LATEST")
    assert not (run_dir / "LATEST" / "optimizer.pt").exists()  # only with save_full_optimizer

    output = launch(runs["tmp"], tmp_path / "old", model, "fsdp", *extra, env={**env, "BARRIER_AFTER_SAVE": "1"}, ok=False)
    assert "timed out" in output.lower() or "timeout" in output.lower(), output[-3000:]


@pytest.mark.slow
def test_fsdp2_bf16_keeps_positions_exact_up_to_max_length(tmp_path):
    """Forced FSDP2, model.fsdp_policy_mp=bfloat16, Llama and GPT-NeoX (partial rotary): buffers stay float32 on every
    process, the rotary cos at position max_length - 1 is exact to float32, and the logits at all 512 positions are those of
    bf16 compute (weights rounded to bf16, buffers float32), so within bf16 noise of the float32 model late as early."""
    from tests.tiny import tiny_model_dir

    dirs = [tiny_model_dir(tmp_path / "llama", hidden=128), tiny_model_dir(tmp_path / "neox", arch="gpt_neox", hidden=128)]
    out = tmp_path / "positions.json"
    fsdp_env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    result = run_forked([REPO / "tests" / "dist_scripts" / "bf16_positions.py", out, *dirs], tmp_path, **fsdp_env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = json.loads(out.read_text())
    assert set(results) == {"llama", "gpt_neox"}
    for arch, r in results.items():
        prefix = "model" if arch == "llama" else "gpt_neox"
        assert r["buffers"] == [{f"{prefix}.rotary_emb.inv_freq": "torch.float32",
                                 f"{prefix}.rotary_emb.original_inv_freq": "torch.float32"}] * 2, arch
        assert r["logits_dtype"] == "torch.bfloat16", arch  # compute is bf16 as the policy says
        assert r["cos_error"] < 1e-4, arch  # bf16 inv_freq: 0.17 (Llama) and 0.09 (GPT-NeoX) here
        assert r["fsdp_vs_plain"] < 1e-2, arch  # 0.89 and 0.22 with bf16 buffers
        last = slice(3 * len(r["fsdp_error"]) // 4, None)
        fsdp, plain = (sum(r[k][last]) / len(r[k][last]) for k in ("fsdp_error", "plain_bf16_error"))
        assert fsdp <= 1.1 * plain + 1e-6, (arch, fsdp, plain)  # 3.4x (Llama) and 1.7x (GPT-NeoX) with bf16 buffers
