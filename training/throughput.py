"""Throughput and memory metrics of a training step.

    metrics.update(step_throughput(examples, tensor_positions, elapsed, model, device, world))

Token rates count real (non-pad) tokens of the global batch per second of the step; `padding_fraction` is the share of
tensor positions that are padding (across every micro-batch of every process); `peak_memory_gb` is the CUDA peak allocation
of this process on GPU and its peak resident set size on CPU; `mfu` (GPU only, known devices) is model FLOPs of the step
(6 x parameters per token: forward and backward of the dense layers) over the devices' peak bf16 FLOPs.
"""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the full model, also when FSDP holds only a shard (flat parameters and DTensors know their full size)."""
    total = 0
    for p in model.parameters():
        unsharded = getattr(p, "_unpadded_unsharded_size", None)
        total += unsharded.numel() if unsharded is not None else p.numel()  # DTensor.numel() is already the global size
    return total


def step_throughput(examples: list[dict], tensor_positions: int, elapsed: float, model: torch.nn.Module,
                    device: torch.device, world: int) -> dict:
    """Rates for one optimizer step over `examples` (the global batch) that took `elapsed` seconds."""
    n_input = sum(len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples)
    n_supervised = sum(e.get("n_supervised", len(e["response_ids"])) for e in examples)
    metrics = {
        "examples_per_second": len(examples) / elapsed,
        "tokens_per_second": n_input / elapsed,
        "supervised_tokens_per_second": n_supervised / elapsed,
        "padding_fraction": 1.0 - n_input / tensor_positions if tensor_positions else 0.0,
        "peak_memory_gb": peak_memory_gb(device),
    }
    peak = device_peak_flops(device)
    if peak is not None:
        metrics["mfu"] = 6 * parameter_count(model) * n_input / elapsed / (peak * world)
    return metrics
