"""accelerate's FSDP2 and tensor-parallel state forced onto CPU processes, for tests (shared/design/cpu-parallel.md).

    stage.build_accelerator = lambda config: forced_accelerator("fsdp", config)

accelerate refuses both on CPU, so the Accelerator is built for CPU and its state switched afterwards; everything else is
the real code path. Real runs get these from the launch config on GPUs. `gradient_bytes` reads what FSDP2 holds.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator, PartialState
from accelerate.parallelism_config import ParallelismConfig
from accelerate.utils import DistributedType

from training import distributed, state_dicts


def forced_accelerator(mode: str, config) -> Accelerator:
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False, kwargs_handlers=[distributed.process_group_kwargs(config)])
    state = accelerator.state
    if mode == "fsdp":
        state.fsdp_plugin = distributed.fsdp_plugin(config)
        state.distributed_type = DistributedType.FSDP
        # Without this, a later AcceleratorState() copies MULTI_CPU back from the shared state.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    elif mode == "tp":
        pc = ParallelismConfig(tp_size=accelerator.num_processes)
        state.parallelism_config = pc
        state.device_mesh = pc.get_device_mesh("cpu")
    return accelerator


def dumping_resume(resume, dump_path: str):
    """training.loop.resume that also writes the full model and optimizer state right after resuming to `dump_path`."""

    def dump(config, path, model, optimizer, scheduler, accelerator, run_dir):
        state = resume(config, path, model, optimizer, scheduler, accelerator, run_dir)
        policy = state_dicts.full_model_state(accelerator, model)
        optim = state_dicts.full_optimizer_state(accelerator, model, optimizer)
        if accelerator.is_main_process:
            torch.save({"policy": policy, "optimizer": optim}, dump_path)
        return state

    return dump


def gradient_bytes(model: torch.nn.Module) -> dict:
    """What this process holds of the gradients of an FSDP2 model: bytes of sharded gradients (and their dtypes), bytes of
    unsharded ones (FSDP2 keeps these between backwards when gradient sync is off), and the full model's gradient numel."""
    from torch.distributed.fsdp import FSDPModule

    held = {"sharded_bytes": 0, "sharded_dtypes": set(), "unsharded_bytes": 0, "full_numel": 0}
    params = {}
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        params.update({id(p): p for p in (group.fsdp_params if group is not None else [])})  # a state may serve several modules
    for param in params.values():
        held["full_numel"] += param.sharded_param.numel()  # a DTensor's numel is the global size
        if param.sharded_param.grad is not None:
            local = param.sharded_param.grad.to_local()
            held["sharded_bytes"] += local.numel() * local.element_size()
            held["sharded_dtypes"].add(str(local.dtype))
        unsharded = getattr(param, "_unsharded_param", None)
        for grad in (getattr(unsharded, "grad", None), param.unsharded_accumulated_grad):
            if grad is not None:
                held["unsharded_bytes"] += grad.numel() * grad.element_size()
    held["sharded_dtypes"] = sorted(held["sharded_dtypes"])
    return held
