"""The Accelerator of a run and what the loop needs to know about data parallelism.

The launch config (`accelerate launch --config_file accelerate_configs/...`) picks the hardware setup; this module only adapts it
to the recipe (e.g. the FSDP layer class from `model.block_name`). The script never reads RANK itself.
"""

from __future__ import annotations

import resource

from accelerate import Accelerator
from accelerate.utils import DistributedType

from training.config import Config


def build_accelerator(config: Config) -> Accelerator:
    return Accelerator(step_scheduler_with_optimizer=False)


def data_parallel(accelerator: Accelerator) -> tuple[int, int]:
    """(rank, size) of the data-parallel group: processes that see different examples."""
    return accelerator.process_index, accelerator.num_processes


def raise_open_file_limit(accelerator: Accelerator) -> str | None:
    """Multi-process runs open many files (shared memory, sockets); lift the soft limit to the hard one instead of asking for ulimit."""
    if accelerator.distributed_type == DistributedType.NO:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return None
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return f"raised the open-file soft limit from {soft} to {hard}"
