"""`compile=true`: torch.compile on each transformer block, in place, and on the supervised-only loss chunk.

    compile_model(config, model)     # sft_train.py, dpo_train.py and benchmarks/throughput.py: after prepare_model, before
                                     # accelerator.prepare; parameter names and policy.pt keys stay the plain ones

Shapes: nothing is bucketed or padded for the compiler. Blocks and the loss chunk are compiled with dynamic shapes
(`dynamic=True`), so the width of a padded batch, the rows and width of a packed one and the number of supervised positions
are symbols of one graph instead of a recompile each. What still makes a new graph is a change the graph depends on
structurally: training versus eval (no autograd), a size of 1 (torch specialises 0 and 1), a padded batch with an attention
mask after one without, the loss's last, shorter chunk. Those come in the first steps and evals; after them the count stays
flat (tests/test_compile.py checks it while every batch has another shape).

Why blocks and not the whole model: the model's forward builds masks with data-dependent checks and the loss swaps the
head's forward per call; compiling those would break the graph or recompile every step. The blocks are where the time goes
and, being alike, share their graphs. Generation for eval samples runs eager (training/loop.py): its per-token shapes and
cache would only fill the compile cache. DPO's frozen reference stays eager: it runs forward only (once before training with
reference_logps=precompute), in model.reference_dtype.

Graph breaks (counted and reported once by training/compilation.py): with model.attn_implementation=sdpa_packed the
attention call of each block runs outside the graph (modeling/packed_attention.py): its per-example spans are Python lists
that dynamo would otherwise bake into the graph, a recompile for every new packing.
"""

from __future__ import annotations

import torch

from training.adapters import unwrap
from training.compilation import reset_counts

COMPILED_LOSS = "_sft_compiled_loss"  # attribute of the transformers model: modeling/loss.py then uses its compiled chunk


def compile_model(config, model: torch.nn.Module) -> int:
    """Compile every `config.model.block_name` module in place (Module.compile: the module, its parameters and their names
    stay) and mark the model so that modeling/loss.py compiles its loss chunk too. Returns the number of blocks compiled;
    does nothing (0) unless config.compile."""
    if not config.compile:
        return 0
    blocks = [m for m in model.modules() if type(m).__name__ == config.model.block_name]
    if not blocks:
        raise ValueError(f"compile=true: no module of class {config.model.block_name!r} (model.block_name) in "
                         f"{type(model).__name__}")
    reset_counts()  # this run's graphs and breaks only (tests run several in one process)
    for block in blocks:
        block.compile(dynamic=True)
    base = unwrap(model)
    for inner in (base, getattr(getattr(base, "base_model", None), "model", None)):  # a peft model: its transformers model
        if inner is not None:
            setattr(inner, COMPILED_LOSS, True)
    return len(blocks)
