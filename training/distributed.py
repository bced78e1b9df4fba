"""The Accelerator of a run and everything that differs between one process, DDP, FSDP2 and tensor parallelism.

The launch config (`accelerate launch --config_file accelerate_configs/...`) picks the hardware setup; this module adapts it
to the recipe and gives sft_train.py one call per concern:

    accelerator = build_accelerator(config)              # FSDP2 plugin from model.block_name / fsdp_policy_mp / activation_checkpointing
    check_setup(config, accelerator)                     # bad combinations fail here, before data or weights are loaded
    model = load_model(config.model, cache_dir, **model_load_kwargs(config, accelerator))   # device_map or TP plan
    prepare_model(config, accelerator, model)            # before accelerator.prepare
    rank, size = data_parallel(accelerator)              # processes that see different examples ((0, 1) under pure TP)

Modes (`parallel_mode`): "single" (one process, optionally model.device_map=balanced over its GPUs), "ddp" (several
processes, whole model each), "fsdp" (the launch config's distributed_type FSDP, version 2), "tp" (the launch config's
parallelism_config tp_size equal to the number of processes; every process sees the same batch).
What a checkpoint holds in each mode (full and sharded state dicts) is training/state_dicts.py. The script never reads RANK
itself.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import resource
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs
from accelerate.utils.environment import str_to_bool

from training.config import Config, ConfigError

# Prefixes that wrappers add to parameter names; torch.distributed.checkpoint strips the same ones.
def fsdp_requested() -> bool:
    """The launcher sets ACCELERATE_USE_FSDP when the launch config's distributed_type is FSDP."""
    return bool(str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")))


def fsdp_plugin(config: Config) -> FullyShardedDataParallelPlugin:
    """The FSDP2 plugin: hardware fields (resharding, offload) from the launch config, model fields from the recipe.

    The transformer-based wrap policy is set explicitly because under accelerate's default (no wrap) the layer class names
    are silently ignored. Master weights and optimizer state stay in model.policy_dtype; model.fsdp_policy_mp is the dtype
    of the gathered parameters (compute) and of the gradient reduction.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise ConfigError(f"the launch config asks for FSDP version {version}; this suite runs FSDP2 only (fsdp_version: 2)")
    if not config.model.block_name:
        raise ConfigError("model.block_name is required with FSDP: the class name of the transformer block to wrap "
                          "(e.g. LlamaDecoderLayer); the error after loading the model config lists the candidates")
    mp = config.model.fsdp_policy_mp
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, mp), reduce_dtype=getattr(torch, mp)) if mp else None
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[config.model.block_name],
        mixed_precision_policy=policy,
        activation_checkpointing=config.activation_checkpointing,  # accelerate's wrapper is non-reentrant
        cpu_ram_efficient_loading=True,  # rank 0 reads the weights, the others start empty and receive their shards
        state_dict_type="FULL_STATE_DICT",
    )


def build_accelerator(config: Config) -> Accelerator:
    plugin = fsdp_plugin(config) if fsdp_requested() else None
    # Without GPUs, cpu mode makes a multi-process launch a real gloo group; otherwise each process would run alone as rank 0.
    return Accelerator(step_scheduler_with_optimizer=False, fsdp_plugin=plugin, cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[process_group_kwargs(config)])


def process_group_kwargs(config: Config) -> InitProcessGroupKwargs:
    """The process group's collective time-out (accelerate's default is NCCL's 10 minutes): see dist_timeout_minutes."""
    return InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=config.dist_timeout_minutes))


# File systems that several nodes mount at once; on anything else each node has its own copy of the cache.
SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "glusterfs", "wekafs", "panfs",
                      "9p", "virtiofs", "fuse")


def on_shared_storage(path: str | Path, mounts: str | None = None) -> bool:
    """Whether `path` lies on a network file system, from the longest matching mount point in /proc/mounts."""
    path = os.path.realpath(path)
    best, fstype = "", ""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return True  # unknown: assume shared, the safe choice (one process prepares the data for everyone)
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, fstype = mount, fields[2]
    return fstype.split(".")[0] in SHARED_FILESYSTEMS


DATA_WAIT = datetime.timedelta(days=1)  # how long processes wait for another one to prepare the data


@contextlib.contextmanager
def data_first(accelerator: Accelerator, cache: str | Path, node_local: bool | None):
    """The context in which data is prepared: one process per cache goes first and fills it, the others then read it.

    A cache on storage that all nodes share is filled by the main process; a node-local cache (/scr-ssd) by each node's
    local main process, so the other nodes do not tokenize concurrently behind the global main process. The others wait in
    a barrier of a separate gloo group with a time-out of DATA_WAIT, not in one of the training collectives, whose time-out
    (dist_timeout_minutes) is meant for a hang, not for hours of HTML cleaning.
    """
    if node_local is None:
        Path(cache).mkdir(parents=True, exist_ok=True)
        node_local = not on_shared_storage(cache)
    first = accelerator.is_local_main_process if node_local else accelerator.is_main_process
    group = None
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        group = dist.new_group(backend="gloo", timeout=DATA_WAIT)
    if group is not None and not first:
        torch.distributed.barrier(group=group)
    yield
    if group is not None:
        if first:
            torch.distributed.barrier(group=group)
        torch.distributed.destroy_process_group(group)


def tp_size(accelerator: Accelerator) -> int:
    """Tensor-parallel degree from the launch config's parallelism_config (1 when tensor parallelism is off)."""
    pc = accelerator.parallelism_config
    return pc.tp_size if pc is not None and pc.tp_enabled else 1


def parallel_mode(accelerator: Accelerator) -> str:
    if tp_size(accelerator) > 1:
        return "tp"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def data_parallel(accelerator: Accelerator) -> tuple[int, int]:
    """(rank, size) of the data-parallel group: processes that see different examples. TP ranks share one batch."""
    tp = tp_size(accelerator)
    return accelerator.process_index // tp, accelerator.num_processes // tp


def gather_dp(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-process tensor over the data-parallel group (under pure TP every process already has it all)."""
    return accelerator.gather(tensor) if data_parallel(accelerator)[1] > 1 else tensor


def synced_generate(accelerator: Accelerator) -> bool:
    """Sharded models need every process in each forward, so all keep stepping until the last sequence is done."""
    return accelerator.num_processes > 1 and parallel_mode(accelerator) in ("fsdp", "tp")


def block_candidates(model: torch.nn.Module) -> list[str]:
    """Class names that look like the model's transformer block: the items of its ModuleLists and `_no_split_modules`."""
    names = {type(item).__name__ for module in model.modules() if isinstance(module, torch.nn.ModuleList) for item in module}
    names.update(getattr(model, "_no_split_modules", None) or [])
    return sorted(names)


def check_block_name(model: torch.nn.Module, block_name: str | None) -> None:
    classes = {type(m).__name__ for m in model.modules()}
    if block_name not in classes:
        raise ConfigError(f"model.block_name={block_name!r} matches no module of {type(model).__name__}; "
                          f"its block classes: {', '.join(block_candidates(model)) or 'none found'}")


def meta_model(config: Config) -> torch.nn.Module:
    """The model's structure without weights (no memory, no download beyond config.json), for early checks. The attention
    kernel does not change the module tree, so transformers' default is used (a custom one may not be registered yet)."""
    import transformers

    m = config.model
    auto_config = transformers.AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(auto_config, dtype=getattr(torch, m.policy_dtype),
                                                             trust_remote_code=m.trust_remote_code)


def check_setup(config: Config, accelerator: Accelerator) -> None:
    """Combinations of recipe and launch config that cannot work, reported before any data or weights are loaded."""
    mode, n = parallel_mode(accelerator), accelerator.num_processes
    m = config.model
    check_precision(config, accelerator)
    if m.device_map is not None:
        if n > 1 or mode != "single":
            raise ConfigError(f"model.device_map={m.device_map} spreads ONE process over all visible GPUs; this launch has "
                              f"{n} processes ({mode}). Run it with plain `python sft_train.py` or "
                              "accelerate_configs/single_gpu.yaml, or drop model.device_map")
        if m.random_init:
            raise ConfigError("model.device_map needs weights loaded with from_pretrained; it does not apply to model.random_init")
    if mode == "tp":
        if tp_size(accelerator) != n:
            raise ConfigError(f"parallelism_config tp_size ({tp_size(accelerator)}) must equal the number of processes ({n}): "
                              "tensor parallelism is not combined with data parallelism or FSDP here")
        if m.random_init or m.archive is not None:
            raise ConfigError("tensor parallelism loads sharded weights with from_pretrained; model.random_init and "
                              "model.archive are not supported with it")
    if config.lora.quantize is not None:
        check_quantize(config, mode)
    if mode == "tp" and config.lora.enabled:
        raise ConfigError("lora.enabled with tensor parallelism is not supported; use FSDP or DDP for LoRA runs")
    if mode in ("fsdp", "tp"):
        model = meta_model(config)
        if mode == "fsdp":
            check_block_name(model, m.block_name)
        elif not model.supports_tp_plan:
            raise ConfigError(f"{type(model).__name__} ({m.name_or_path}) has no tensor-parallel plan in transformers; "
                              "use FSDP (accelerate_configs/fsdp_8gpu.yaml) or DDP for it")


def check_precision(config: Config, accelerator: Accelerator) -> None:
    """Precision comes from the recipe alone: a launcher mixed_precision would add autocast on top of it (and change the
    losses without a word), and float16 has no CPU kernels for much of the model."""
    launcher = getattr(accelerator, "mixed_precision", "no")
    if launcher != "no":
        raise ConfigError(f"the launcher asks for mixed_precision={launcher} (accelerate config file or --mixed_precision); "
                          "precision is set by the recipe here: model.policy_dtype (weights and optimizer state) and "
                          "model.fsdp_policy_mp (FSDP compute and reduction, e.g. bfloat16). Launch with --mixed_precision no")
    device = getattr(accelerator, "device", None)
    if device is not None and device.type == "cpu":
        for key in ("policy_dtype", "fsdp_policy_mp"):
            if getattr(config.model, key) == "float16":
                raise ConfigError(f"model.{key}=float16 on CPU: use float32 or bfloat16 there (float16 needs a GPU)")


def set_matmul_precision(config: Config, device: torch.device, capability: tuple[int, int] | None = None) -> str | None:
    """float32 matmuls on TF32 tensor cores on Ampere or newer (torch's default is full float32) unless allow_tf32=false.
    Returns the line to log; None where TF32 does not exist (CPU, older GPUs)."""
    if device.type != "cuda":
        return None
    capability = capability or torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        return None
    torch.set_float32_matmul_precision("high" if config.allow_tf32 else "highest")
    if config.allow_tf32:
        return "float32 matmuls use TF32 tensor cores (allow_tf32=true; allow_tf32=false keeps full float32)"
    return "float32 matmuls in full float32 (allow_tf32=false)"


def check_quantize(config: Config, mode: str) -> None:
    """QLoRA's 4-bit base needs bitsandbytes kernels on a CUDA GPU and real pretrained weights; refused before loading."""
    import importlib.util

    if not torch.cuda.is_available():
        raise ConfigError("lora.quantize=4bit needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none: "
                          "drop lora.quantize to train LoRA on the unquantized base")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("lora.quantize=4bit needs bitsandbytes: pip install bitsandbytes")
    if mode not in ("single", "ddp"):
        raise ConfigError(f"lora.quantize=4bit runs in one process or DDP, not {mode}: the 4-bit weights are not sharded here")
    if config.model.random_init or config.model.archive is not None or config.model.device_map is not None:
        raise ConfigError("lora.quantize=4bit quantizes pretrained weights as they load: not with model.random_init, "
                          "model.archive or model.device_map")


def model_load_kwargs(config: Config, accelerator: Accelerator) -> dict:
    """Extra from_pretrained arguments: layers over GPUs (device_map), the TP plan on all processes, or QLoRA's 4-bit base
    (quantized on this process's GPU as it loads)."""
    if config.lora.quantize is not None:
        from transformers import BitsAndBytesConfig

        dtype = torch.bfloat16 if config.model.policy_dtype == "float32" else getattr(torch, config.model.policy_dtype)
        return {"device_map": {"": accelerator.device},
                "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                          bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)}
    if config.model.device_map is not None:
        return {"device_map": config.model.device_map}
    if parallel_mode(accelerator) == "tp":
        from transformers.distributed import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_size=tp_size(accelerator))}
    return {}


def prepare_model(config: Config, accelerator: Accelerator, model: torch.nn.Module) -> None:
    """What must happen to the loaded model before accelerator.prepare.

    Buffers are left as loaded, in float32: FSDP2's mixed precision casts only the gathered parameters (and the blocks'
    floating inputs) to model.fsdp_policy_mp. Casting buffers too would round rotary `inv_freq` to bf16, and
    `position * inv_freq` would then drift with position (cos error 0.6 at position 511); transformers computes rotary
    angles (and GPT-J's sin/cos table lookups) in float32 and casts the result to the activations' dtype itself.
    """
    mode = parallel_mode(accelerator)
    if config.activation_checkpointing and mode != "fsdp":  # FSDP applies it per block through the plugin
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def prepare_frozen(config: Config, accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A model that is only run forward (DPO's reference): eval mode, no gradients, placed like the policy. Under FSDP it is
    sharded per model.block_name block as the policy is (without mixed precision: it computes in its own dtype), so no
    process holds all of it; under TP it was loaded sharded; otherwise it moves to this process's device."""
    model.eval().requires_grad_(False)
    mode = parallel_mode(accelerator)
    if mode == "fsdp":
        return shard_frozen(config, accelerator, model)
    if mode == "tp" or config.model.device_map is not None:
        return model
    return model.to(accelerator.device)


def shard_frozen(config: Config, accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 fully_shard of every block_name block and of the root. Under cpu_ram_efficient_loading only local rank 0 read
    the weights: the others hold meta tensors and receive their shards from it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    on_meta = any(p.is_meta for p in model.parameters())
    full = None if on_meta else {k: v for k, v in model.state_dict().items()}
    buffers = {name: b.clone() for name, b in model.named_buffers() if not b.is_meta}
    for module in model.modules():
        if type(module).__name__ == config.model.block_name:
            fully_shard(module)
    fully_shard(model)
    device = accelerator.device
    any_meta = bool(accelerator.reduce(torch.tensor([int(on_meta)], device=device), "sum").item())
    if any_meta:
        model.to_empty(device=device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full if accelerator.is_main_process else {}, options=options)
        restore_buffers(model, buffers, accelerator)
    else:
        model.to(device)
    return model


def restore_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor], accelerator: Accelerator) -> None:
    """Non-persistent buffers (rotary inv_freq, masks) are not in a state dict: the main process's values, broadcast."""
    from accelerate.utils import broadcast_object_list

    names = broadcast_object_list([sorted(buffers) if accelerator.is_main_process else None])[0]
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        value = buffers[name].to(accelerator.device) if accelerator.is_main_process else torch.empty_like(module._buffers[attr], device=accelerator.device)
        if accelerator.num_processes > 1:
            torch.distributed.broadcast(value, src=0)
        module._buffers[attr] = value


def sharded(accelerator: Accelerator) -> bool:
    return parallel_mode(accelerator) in ("fsdp", "tp")


def raise_open_file_limit(accelerator: Accelerator) -> str | None:
    """Multi-process runs open many files (shared memory, sockets); lift the soft limit to the hard one instead of asking for ulimit."""
    if accelerator.num_processes == 1 and accelerator.distributed_type == DistributedType.NO:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY or hard == resource.RLIM_INFINITY:
        return None
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return f"raised the open-file soft limit from {soft} to {hard}"


def describe_setup(config: Config, accelerator: Accelerator, run_dir: Path) -> str:
    """What is about to run, in two lines: device, processes and mode, dtypes, batch split, run directory; plus a note when
    the launcher was asked for several processes but started one."""
    mode, n = parallel_mode(accelerator), accelerator.num_processes
    _, dp = data_parallel(accelerator)
    micro = config.batch_size // (config.gradient_accumulation_steps * dp)
    compute = config.model.fsdp_policy_mp if mode == "fsdp" and config.model.fsdp_policy_mp else config.model.policy_dtype
    split = f"{micro} per device x {config.gradient_accumulation_steps} accumulation" \
        if config.max_tokens_per_micro_batch is None else \
        f"{micro} per device in micro-batches of <= {config.max_tokens_per_micro_batch} positions"
    lines = [
        f"running {mode} on {n} process{'es' if n > 1 else ''} ({accelerator.device.type}); weights and optimizer state "
        f"{config.model.policy_dtype}, compute {compute}; batch_size {config.batch_size} = {split} x {dp} data-parallel",
        f"run dir: {run_dir}",
    ]
    if n == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        # accelerate's simple launcher (MULTI_CPU without mpirun) sets MASTER_ADDR for num_processes > 1 but starts one
        lines.append("note: the launch config asked for several processes, but this is the only one (accelerate starts "
                     "MULTI_CPU processes only through mpirun); use accelerate_configs/cpu_2proc.yaml for several CPU processes")
    return "\n".join(lines)
