"""Run sft_train.main (or, with --script dpo_train, dpo_train.main) on CPU processes with accelerate's FSDP2 or tensor-parallel state forced on (test use only).

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ... tests/dist_scripts/forced_launch.py fsdp KEY=VALUE...
    ... forced_launch.py tp KEY=VALUE...
    ... forced_launch.py fsdp --script dpo_train KEY=VALUE...
    python tests/dist_scripts/forced_launch.py plain KEY=VALUE...      # the script's own accelerator, with the hooks below

Hooks for the tests, by environment variable: DUMP_RESUMED=PATH writes the full model and optimizer state right after a
resume; SLOW_DATA=SECONDS makes the main process prepare the data that much slower (OLD_DATA_WAIT=1: behind accelerate's
main_process_first, a barrier of the training process group); MEASURE_SAVE_MEMORY=1 records the main process's peak extra
resident memory during each step-N save (with its background write) in {run_dir}/save_memory.json;
SLOW_LATEST_WRITE=SECONDS makes writing LATEST/policy.pt that slow; BARRIER_AFTER_SAVE=1 puts back a barrier after each
save (all processes wait for the main process's write); FULL_DISK=MATCH:BYTES[@RANK] makes checkpoint files whose path
contains MATCH fail with ENOSPC after BYTES (tests/full_disk.py), on process RANK only if given; MMAP_THRESHOLD=BYTES is glibc's
MALLOC_MMAP_THRESHOLD_ set from here (a forked process never reads that variable): larger blocks go back to the system
when freed.

accelerate refuses both on CPU, so the Accelerator is built for CPU and its state switched afterwards (tests/forcing.py);
everything else is the real script. Real runs get these from the launch config on GPUs.
Also writes {run_dir}/parallel.json (see record_wrapping) for the tests to check what was sharded.
"""

import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import importlib  # noqa: E402
import stage  # noqa: E402
import training.loop  # noqa: E402
from tests.forcing import dumping_resume, forced_accelerator  # noqa: E402
from training import checkpoint as ckpt  # noqa: E402
from training import distributed  # noqa: E402
from training.cli import run_main  # noqa: E402

MODE = sys.argv[1]
ARGS = sys.argv[2:]
SCRIPT = "sft_train"
if ARGS[:1] == ["--script"]:
    SCRIPT, ARGS = ARGS[1], ARGS[2:]
script = importlib.import_module(SCRIPT)


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


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measuring_save(save):
    """Sample the resident memory every millisecond from the start of a step-N save until its write has finished."""

    def measured(config, accelerator, model, optimizer, scheduler, state, run_dir, name):
        if not (accelerator.is_main_process and name.startswith("step-")):
            return save(config, accelerator, model, optimizer, scheduler, state, run_dir, name)
        gc.collect()
        start, peak, done = resident_bytes(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], resident_bytes())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            save(config, accelerator, model, optimizer, scheduler, state, run_dir, name)
            ckpt.writer.wait()
        finally:
            done.set()
            sampler.join()
        path = Path(run_dir, "save_memory.json")
        record = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**record, name: max(peak[0] - start, 0)}))

    return measured


def slow_latest(save_file, seconds):
    def slow(obj, path):
        if Path(path).name == "policy.pt" and Path(path).parent.name == ".tmp-LATEST":
            time.sleep(seconds)
        return save_file(obj, path)

    return slow


def barrier_after(save):
    def save_and_wait(config, accelerator, *args, **kwargs):
        save(config, accelerator, *args, **kwargs)
        if accelerator.is_main_process:
            ckpt.writer.wait()
        accelerator.wait_for_everyone()

    return save_and_wait


def slow_first_split(build_split, seconds):
    """The main process takes `seconds` longer to prepare the data (RANK is read here, in test code only)."""
    calls = []

    def slow(*args, **kwargs):
        if os.environ.get("RANK") == "0" and not calls:
            time.sleep(seconds)
        calls.append(1)
        return build_split(*args, **kwargs)

    return slow


if os.environ.get("MMAP_THRESHOLD"):
    import ctypes

    M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also turns off the dynamic threshold, as the variable does
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(os.environ["MMAP_THRESHOLD"]))
if MODE != "plain":
    stage.build_accelerator = lambda config: forced_accelerator(MODE, config)
if os.environ.get("SLOW_DATA"):
    script.build_split = slow_first_split(script.build_split, float(os.environ["SLOW_DATA"]))
if os.environ.get("OLD_DATA_WAIT"):
    stage.data_first = lambda accelerator, cache, node_local: accelerator.main_process_first()
if os.environ.get("SLOW_LATEST_WRITE"):
    ckpt.save_file = slow_latest(ckpt.save_file, float(os.environ["SLOW_LATEST_WRITE"]))
if os.environ.get("BARRIER_AFTER_SAVE"):
    training.loop.save = barrier_after(training.loop.save)
if os.environ.get("MEASURE_SAVE_MEMORY"):
    training.loop.save = measuring_save(training.loop.save)
if os.environ.get("FULL_DISK"):
    spec, _, rank = os.environ["FULL_DISK"].partition("@")
    if rank in ("", os.environ.get("RANK")):
        from tests.full_disk import install

        install(spec)
if os.environ.get("DUMP_RESUMED"):
    training.loop.resume = dumping_resume(training.loop.resume, os.environ["DUMP_RESUMED"])
training.loop.save = record_wrapping(training.loop.save)  # the loop's checkpoint writer
torch.set_num_threads(1)
run_main(script.main, ARGS)  # as the script's own __main__: a user error is one line and exit status 2
