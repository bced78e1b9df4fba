"""Run sft_train.main on CPU processes with accelerate's FSDP2 or tensor-parallel state forced on (test use only).

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ... tests/dist_scripts/forced_launch.py fsdp KEY=VALUE...
    ... forced_launch.py tp KEY=VALUE...

accelerate refuses both on CPU, so the Accelerator is built for CPU and its state switched afterwards (see
shared/design/cpu-parallel.md); everything else is the real script. Real runs get these from the launch config on GPUs.
Also writes {run_dir}/parallel.json (see record_wrapping) for the tests to check what was sharded.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.parallelism_config import ParallelismConfig  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

import sft_train  # noqa: E402
import training.loop  # noqa: E402
from training import distributed  # noqa: E402

MODE = sys.argv[1]


def forced_accelerator(config):
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False, kwargs_handlers=[distributed.process_group_kwargs(config)])
    state = accelerator.state
    if MODE == "fsdp":
        state.fsdp_plugin = distributed.fsdp_plugin(config)
        state.distributed_type = DistributedType.FSDP
        # Without this, a later AcceleratorState() copies MULTI_CPU back from the shared state.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    elif MODE == "tp":
        pc = ParallelismConfig(tp_size=accelerator.num_processes)
        state.parallelism_config = pc
        state.device_mesh = pc.get_device_mesh("cpu")
    return accelerator


def record_wrapping(save):
    """Before the first save, write {run_dir}/parallel.json: the mode, FSDP2 units (name, class) and DTensor parameters."""

    def recording_save(config, accelerator, model, *args, **kwargs):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        path = Path(config.run_dir, "parallel.json")
        if accelerator.is_main_process and not path.exists():
            units = [[name, type(m).__name__] for name, m in model.named_modules() if isinstance(m, FSDPModule)]
            dtensors = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
            path.write_text(json.dumps({"mode": distributed.parallel_mode(accelerator), "fsdp_units": units,
                                        "dtensor_params": dtensors}))
        return save(config, accelerator, model, *args, **kwargs)

    return recording_save


sft_train.build_accelerator = forced_accelerator
training.loop.save = record_wrapping(training.loop.save)  # the loop's checkpoint writer
torch.set_num_threads(1)
sft_train.main(sys.argv[2:])
