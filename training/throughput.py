"""Throughput, memory and model FLOPs utilisation of a training step.

    flops = model_flops(model)                                   # from the architecture, once
    peak = device_peak_flops(accelerator.device, compute_dtype(config))
    synchronize(device); start = time.perf_counter(); ...; synchronize(device)   # time finished kernels only
    metrics.update(step_throughput(examples, tensor_positions, elapsed, device, step_flops=flops.step(lengths, head_positions),
                                   n_devices=accelerator.num_processes, peak_flops=peak))

Token rates count real (non-pad) tokens of the global batch per second of the step; `padding_fraction` is the share of
tensor positions that are padding (across every micro-batch of every process); `peak_memory_gb` is the CUDA peak allocation
of this process on GPU and its peak resident set size on CPU.

`mfu` is model FLOPs per second over the peak FLOP/s of every device in the job (all processes: data-parallel, FSDP and
tensor-parallel ranks alike) for the compute dtype. Model FLOPs of a step, forward + backward (backward = 2 x forward):

    6 x (non-embedding parameters) x (real tokens)                          matmuls of the blocks
  + 12 x layers x (query heads x head dim) x sum_i L_i (L_i + 1) / 2        causal attention scores and values, per example
  + 6 x hidden x vocab x (positions where the LM head ran)                  supervised positions with supervised-only logits

Embedding lookups are not matmuls and cost nothing here; recomputation (activation checkpointing, the chunked head's
backward) is not model work and is not counted. Padding and packing filler count nowhere.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch

# Dense (no sparsity) peak FLOP/s per device by compute dtype, matched by a substring of torch.cuda.get_device_name(),
# first match wins (so "H100 PCIe" comes before "H100"). fp16 runs at the bf16 rate; tf32 is float32 on tensor cores.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


@dataclass(frozen=True)
class ModelFlops:
    dense_params: int  # parameters of the blocks (and final norm): everything but embeddings and the LM head
    layers: int
    attention_width: int  # query heads x head dim
    head_params: int  # hidden x vocab of the LM head

    def step(self, lengths: list[int], head_positions: int) -> float:
        """Forward + backward FLOPs of a step over examples of these lengths, the LM head run at head_positions."""
        pairs = sum(n * (n + 1) // 2 for n in lengths)  # causal query-key pairs inside each example
        return 6 * self.dense_params * sum(lengths) + 12 * self.layers * self.attention_width * pairs \
            + 6 * self.head_params * head_positions


def model_flops(model: torch.nn.Module) -> ModelFlops:
    """The FLOP counts of a transformers causal LM, from its modules and config (sharded parameters count in full)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    params = {id(p): p for p in model.parameters()}
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings()
    head_ids = {id(head.weight)} if head is not None else set()
    head_params = head.weight.numel() if head is not None else 0
    dense = sum(full_numel(p) for i, p in params.items() if i not in embedding and i not in head_ids)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelFlops(dense, config.num_hidden_layers, heads * head_dim, head_params)


def full_numel(p: torch.Tensor) -> int:
    """Elements of the full parameter: DTensor.numel() already is; a flat FSDP1 parameter knows its unsharded size."""
    unsharded = getattr(p, "_unpadded_unsharded_size", None)
    return unsharded.numel() if unsharded is not None else p.numel()


def compute_dtype(policy_dtype: str, fsdp_policy_mp: str | None, fsdp: bool, allow_tf32: bool) -> str:
    """The dtype the matmuls run in: bf16 (also for float16), tf32 or fp32."""
    dtype = fsdp_policy_mp if fsdp and fsdp_policy_mp else policy_dtype
    if dtype in ("bfloat16", "float16"):
        return "bf16"
    return "tf32" if allow_tf32 else "fp32"


def device_peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s of one device for `dtype` (compute_dtype), None off CUDA or for devices not in PEAK_FLOPS."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if dtype == "tf32" and torch.get_float32_matmul_precision() == "highest":
        dtype = "fp32"
    return next((peaks[dtype] for key, peaks in PEAK_FLOPS.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (the optimizer's included), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


def step_throughput(examples: list[dict], tensor_positions: int, elapsed: float, device: torch.device, *,
                    step_flops: float | None = None, n_devices: int = 1, peak_flops: float | None = None) -> dict:
    """Rates for one optimizer step over `examples` (the global batch) that took `elapsed` seconds on n_devices devices."""
    n_input = sum(len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples)
    n_supervised = sum(e.get("n_supervised", len(e["response_ids"])) for e in examples)
    metrics = {
        "examples_per_second": len(examples) / elapsed,
        "tokens_per_second": n_input / elapsed,
        "supervised_tokens_per_second": n_supervised / elapsed,
        "padding_fraction": 1.0 - n_input / tensor_positions if tensor_positions else 0.0,
        "peak_memory_gb": peak_memory_gb(device),
    }
    if step_flops is not None and peak_flops is not None:
        metrics["mfu"] = step_flops / elapsed / (peak_flops * n_devices)
    return metrics
