"""The launcher configs in accelerate_configs/: each parses with accelerate's own loader, says what its header promises, and
turns into the launcher settings we mean (process counts, FSDP2 fields, tensor-parallel size). The slow test really launches
cpu_2proc.yaml and checks that two ranks come up.

    python -m pytest tests/test_accelerate_configs.py            # all
    python -m pytest tests/test_accelerate_configs.py -m "not slow"
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.parallelism_config import ParallelismConfig
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, patch_environment
from accelerate.utils.launch import prepare_multi_gpu_env

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "accelerate_configs"

# file -> (distributed_type, num_processes, num_machines). A new config file must be added here.
EXPECTED = {
    "single_gpu.yaml": (DistributedType.NO, 1, 1),
    "ddp_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1),
    "fsdp_8gpu.yaml": (DistributedType.FSDP, 8, 1),
    "fsdp_2node_16gpu.yaml": (DistributedType.FSDP, 16, 2),
    "tp_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1),
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, 1),
}
FSDP_FILES = ["fsdp_8gpu.yaml", "fsdp_2node_16gpu.yaml"]


def launcher_env(name: str, *cli: str) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file accelerate_configs/NAME *cli x.py` gives torchrun: its args and the env it adds."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIG_DIR / name), *cli, "x.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return args, {k: v for k, v in env.items() if os.environ.get(k) != v}


def test_every_config_file_is_covered():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate_and_has_expected_shape(name):
    config = load_config_from_file(str(CONFIG_DIR / name))
    assert isinstance(config, ClusterConfig)
    distributed_type, num_processes, num_machines = EXPECTED[name]
    assert config.distributed_type == distributed_type
    assert config.num_processes == num_processes
    assert config.num_machines == num_machines
    # Precision is a recipe setting (model.policy_dtype / model.fsdp_policy_mp); a launcher bf16 would override it.
    assert config.mixed_precision == "no"
    header = (CONFIG_DIR / name).read_text().split("\ncompute_environment:")[0]
    assert f"accelerate launch --config_file accelerate_configs/{name}" in header
    assert "sft_train.py recipes/" in header


@pytest.mark.parametrize("name", FSDP_FILES)
def test_fsdp_configs_are_fsdp2_full_shard(name):
    config = load_config_from_file(str(CONFIG_DIR / name))
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_reshard_after_forward"] is True  # FSDP2's FULL_SHARD
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp  # filled from model.block_name by the script
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True
    assert fsdp["fsdp_activation_checkpointing"] is False

    _, env = launcher_env(name, "--main_process_port", "0")  # 0: a free port, so a busy 29500 does not matter here
    assert env["ACCELERATE_USE_FSDP"] == "true"
    with patch_environment(**env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.transformer_cls_names_to_wrap is None
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.activation_checkpointing is False
    assert plugin.mixed_precision_policy is None


def test_two_node_config_uses_static_rendezvous_with_8_processes_per_node():
    config = load_config_from_file(str(CONFIG_DIR / "fsdp_2node_16gpu.yaml"))
    assert config.rdzv_backend == "static"
    assert config.main_process_ip and config.main_process_port == 29500
    assert config.machine_rank == 0

    args, _ = launcher_env("fsdp_2node_16gpu.yaml", "--machine_rank", "1", "--main_process_ip", "192.0.2.7")
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "2", 1)
    assert args.rdzv_backend == "static"
    assert args.rdzv_endpoint == "192.0.2.7:29500"


def test_tp_config_sets_tensor_parallel_size_8():
    config = load_config_from_file(str(CONFIG_DIR / "tp_8gpu.yaml"))
    assert config.parallelism_config["parallelism_config_tp_size"] == 8
    args, env = launcher_env("tp_8gpu.yaml", "--main_process_port", "0")
    assert args.nproc_per_node == "8"
    assert env["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true"
    assert "ACCELERATE_USE_FSDP" not in env
    with patch_environment(**env):
        parallelism = ParallelismConfig()
    assert (parallelism.tp_size, parallelism.dp_replicate_size, parallelism.dp_shard_size, parallelism.total_size) == (8, 1, 1, 8)


def test_ddp_and_cpu_configs_start_plain_data_parallel_processes():
    args, env = launcher_env("ddp_8gpu.yaml", "--main_process_port", "0")
    assert args.nproc_per_node == "8"
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_PARALLELISM_CONFIG" not in env
    args, env = launcher_env("cpu_2proc.yaml")
    assert args.nproc_per_node == "2" and args.use_cpu is True
    # The multi-process launcher does not forward use_cpu; sft_train.py therefore builds its Accelerator in cpu mode when no GPU is visible.
    assert "ACCELERATE_USE_CPU" not in env


PROBE = """\
import json, sys
from pathlib import Path
from accelerate import Accelerator
a = Accelerator()
facts = [a.process_index, a.num_processes, str(a.distributed_type), a.device.type]
Path(sys.argv[1], f"rank{a.process_index}.json").write_text(json.dumps(facts))
"""


@pytest.mark.slow
def test_cpu_2proc_launch_runs_two_ranks(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    config = "accelerate_configs/cpu_2proc.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, str(script), str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    probes = sorted(json.loads(p.read_text()) for p in tmp_path.glob("rank*.json"))
    assert probes == [[0, 2, "DistributedType.MULTI_CPU", "cpu"], [1, 2, "DistributedType.MULTI_CPU", "cpu"]]
