"""Model and optimizer state dicts in every parallel mode: what checkpoints write and what resume loads.

    state = full_model_state(accelerator, model)         # every process calls; the main process gets the full CPU state
    optim = full_optimizer_state(accelerator, model, optimizer)
    save_sharded(model, optimizer, path)                 # FSDP/TP resume state: every process writes its own shards
    load_sharded(model, optimizer, path)                 # resume from it, any number of processes
    load_full_state(accelerator, model, optimizer, policy_path, optimizer_path)   # resume from full files

policy.pt is the same in every mode: the unwrapped model's keys. The resume state is optimizer.pt (torch's own
`optimizer.state_dict()` layout, integer parameter ids) for one process and DDP, and the sharded `save_sharded` state under
FSDP/TP; both load under any mode and number of processes (`load_full_state`, `load_sharded`). The modes are
training/distributed.py's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from training import checkpoint as ckpt
from training.distributed import sharded

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.", "_fsdp_wrapped_module.")


def full_model_state(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's full state dict on CPU on the main process ({} on the others under FSDP/TP).

    Every process must call it: under FSDP and TP the shards are gathered collectively.
    """
    if sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if accelerator.is_main_process else {}
    if not accelerator.is_main_process:
        return {}  # DDP: every process holds the same weights; one CPU copy (the main process's) is enough
    return {k: v.detach().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def save_sharded(model: torch.nn.Module, optimizer, path: Path) -> None:
    """Every process writes its own shards of the model and optimizer state to `path` (torch.distributed.checkpoint).

    Nothing is gathered: each process writes what it holds. The files reload under any number of processes and any mode
    (`load_sharded`), keyed by the unwrapped model's parameter names.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, getattr(optimizer, "optimizer", optimizer))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))


def load_sharded(model: torch.nn.Module, optimizer, path: Path) -> None:
    """Load a `save_sharded` state into this run's (possibly differently sharded, or unsharded) model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch_optimizer = getattr(optimizer, "optimizer", optimizer)
    model_state, optimizer_state = get_state_dict(model, torch_optimizer)  # the layout to load into (state initialised)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # missing or foreign shards, a different model
        raise ckpt.CheckpointError(f"cannot load the sharded resume state {path}: {type(e).__name__}: {e}") from e
    set_state_dict(model, torch_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    restore_tuples(torch_optimizer)


def restore_tuples(optimizer: torch.optim.Optimizer) -> None:
    """Loading through torch.distributed.checkpoint turns tuple hyperparameters (Adam's betas) into lists."""
    for group in optimizer.param_groups:
        group.update({k: tuple(v) for k, v in group.items() if k != "params" and isinstance(v, list)})


def detached(obj, model: torch.nn.Module, optimizer):
    """`obj` (nested dicts/lists of tensors) with every tensor that shares memory with the live model or optimizer cloned,
    so the main process can write it while training goes on. Gathered copies (all of FSDP2's, all on GPUs) are kept as they
    are; on CPU, unsharded parameters come back as the live tensors themselves."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t._local_tensor if isinstance(t, DTensor) else t

    live = {local(t).untyped_storage().data_ptr() for t in model.state_dict().values() if isinstance(t, torch.Tensor)}
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)
    live |= {local(t).untyped_storage().data_ptr() for state in torch_optimizer.state.values() for t in state.values()
             if isinstance(t, torch.Tensor)}

    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.clone() if local(value).untyped_storage().data_ptr() in live else value
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    return copy(obj)


def full_optimizer_state(accelerator: Accelerator, model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's full state in torch's `state_dict()` layout (integer ids), main process only under FSDP/TP."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    if not sharded(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return names_to_ids(state) if accelerator.is_main_process else {}


def names_to_ids(state: dict) -> dict:
    """torch.distributed.checkpoint's name-keyed optimizer state -> `optimizer.state_dict()` ids (params numbered in group order)."""
    ids: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [ids.setdefault(name, len(ids)) for name in group["params"]]})
    return {"state": {ids[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def ids_to_names(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The reverse of names_to_ids, for this optimizer's parameters in this (possibly wrapped) model."""
    names: dict[int, str] = {}
    for name, param in model.named_parameters():
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        names.setdefault(id(param), name)
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved) != len(order):
        raise ValueError(f"optimizer.pt holds {len(saved)} parameters, the optimizer has {len(order)}")
    name_of = dict(zip(saved, order))
    return {
        "state": {name_of[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def load_full_state(accelerator: Accelerator, model: torch.nn.Module, optimizer, policy_path: Path, optimizer_path: Path,
                    partial: bool = False) -> None:
    """Resume: load a full policy.pt (or, `partial`, a LoRA run's adapter.pt: the trainable tensors only, each of which
    must be matched) and optimizer.pt into the (possibly sharded) model and optimizer.

    Under FSDP/TP only the main process reads the files and the others receive their shards from it, so a 7B run does
    not hold one CPU copy per process.
    """
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)
    if not sharded(accelerator):
        weights = ckpt.load_archive(policy_path)["state"]
        result = accelerator.unwrap_model(model).load_state_dict(weights, strict=not partial)
        trainable = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        if partial and (result.unexpected_keys or trainable - weights.keys()):
            raise ckpt.CheckpointError(f"{policy_path} does not match the model's trainable parameters (lora settings "
                                       f"changed?): unexpected {result.unexpected_keys[:3]}, missing {sorted(trainable - weights.keys())[:3]}")
        torch_optimizer.load_state_dict(ckpt.load_archive(optimizer_path)["state"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not partial)
    main = accelerator.is_main_process
    set_model_state_dict(model, ckpt.load_archive(policy_path)["state"] if main else {}, options=options)
    optim_state = ids_to_names(ckpt.load_archive(optimizer_path)["state"], model, torch_optimizer) if main else {}
    set_optimizer_state_dict(model, torch_optimizer, optim_state, options=options)
    restore_tuples(torch_optimizer)  # the broadcast, too, turns tuples into lists
