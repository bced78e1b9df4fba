"""What the loop knows of `compile=true` (the compiling itself is modeling/compile.py): whether it can work here, graphs and
graph breaks so far, and eager generation.

    check_compile(config, device, mode)   # before any loading: one line when torch.compile cannot work in this setup
    compile_metrics()                     # {"compile/graphs", "compile/graph_breaks"} so far
    compile_report()                      # one line: graphs, breaks and their reasons (logged once, after the first step)
"""

from __future__ import annotations

import contextlib

import torch

from training.config import Config, ConfigError


def check_compile(config: Config, device: torch.device, mode: str) -> None:
    """compile=true needs inductor's toolchain: a C++ compiler for CPU kernels (torch's own search: $CXX, else g++), Triton
    for GPU kernels. Tensor parallelism is refused: its DTensor blocks under compile are untested here."""
    if not config.compile:
        return
    if mode == "tp":
        raise ConfigError("compile=true with tensor parallelism is not supported; use FSDP or DDP, or compile=false")
    if device.type == "cpu":
        from torch._inductor import exc
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            raise ConfigError("compile=true on CPU needs a C++ compiler for inductor's kernels: none found (set CXX or "
                              "install g++), or use compile=false") from None
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("compile=true on GPU needs Triton for inductor's kernels (pip install triton), "
                              "or use compile=false")


def reset_counts() -> None:
    """Forget compiled graphs and the counters, as in a fresh process: the counts then belong to one run."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def compile_metrics() -> dict[str, int]:
    """Graphs compiled and graph breaks met so far (this run's: modeling/compile.py resets the counters)."""
    from torch._dynamo.utils import counters

    return {"compile/graphs": counters["stats"]["unique_graphs"], "compile/graph_breaks": sum(counters["graph_break"].values())}


def compile_report() -> str:
    """One line: graphs compiled and graph breaks with their reasons (the first line of each)."""
    from torch._dynamo.utils import counters

    m = compile_metrics()
    reasons = "; ".join(f"{n} x {reason.splitlines()[0]}" for reason, n in counters["graph_break"].most_common(3))
    return (f"torch.compile: {m['compile/graphs']} graphs compiled, {m['compile/graph_breaks']} graph breaks"
            + (f" ({reasons})" if reasons else ""))


def eager(config: Config):
    """Inside: compiled modules run as plain eager code (generation)."""
    return torch.compiler.set_stance("force_eager") if config.compile else contextlib.nullcontext()
