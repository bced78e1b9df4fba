"""CPU thread settings that degrade gracefully when other processes share the cores.

    import training.cpu_threads  # noqa: F401   first import of an entry script: before torch loads OpenMP
    set_cpu_threads(model, accelerator.device)   # after the model is built, as sft_train.py does

PyTorch's CPU kernels run on OpenMP (libgomp in the pip wheels). By default an OpenMP thread that finishes its share of an op
spins for a while before it sleeps, so that the next op starts at once. That wins microseconds on an idle machine; when other
processes want the same cores, the spinning threads burn the time slices that the thread still working needs, and every op
ends at a barrier waiting for a thread the scheduler has parked. On 2 shared cores this made a tiny model's step take 2-3x the
wall time and twice the CPU time of passive waiting (README "Throughput": the measurement). So:

- OMP_WAIT_POLICY=PASSIVE (idle threads sleep at once) unless the user set it. libgomp reads it once, when torch is imported,
  so entry scripts import this module before anything that imports torch.
- On CPU, unless OMP_NUM_THREADS is set, a model under SMALL_MODEL_PARAMETERS uses one thread: its matrices are too small to
  split profitably (the 1.1M-parameter demo runs as fast on one thread), and the other cores stay free for other processes.
  Larger models keep torch's default (one thread per physical core).
"""

from __future__ import annotations

import os

SMALL_MODEL_PARAMETERS = 5_000_000

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cpu_threads_for(n_parameters: int, environ=None) -> int | None:
    """Threads to use for a CPU model of this size, or None to keep torch's choice (OMP_NUM_THREADS set, or a large model).
    `environ`: os.environ as it is at the call (datasets' map with num_proc rebinds os.environ to a copy of itself)."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return None
    return 1 if n_parameters < SMALL_MODEL_PARAMETERS else None


def set_cpu_threads(model, device) -> int | None:
    """Apply cpu_threads_for to `model` on `device` (nothing on accelerators); returns the thread count it set, if any."""
    import torch

    if torch.device(device).type != "cpu":
        return None
    threads = cpu_threads_for(sum(p.numel() for p in model.parameters()))
    if threads is not None:
        torch.set_num_threads(threads)
    return threads
