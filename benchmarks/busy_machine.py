"""The demo's wall time on a quiet machine and with one competing busy process, with the suite's thread settings and with
OpenMP's defaults (what training/cpu_threads.py replaced).

    python benchmarks/busy_machine.py                      # the whole demo, 4 conditions, one after the other
    python benchmarks/busy_machine.py --updates 200        # a shorter demo (n_examples = 32 x updates)

Conditions (each a fresh `python sft_train.py recipes/demo.yaml` into a temporary run directory, caches warm):
  suite, quiet          no OMP variables: OMP_WAIT_POLICY=PASSIVE and one thread for this 1.1M-parameter model
  suite, busy           the same while another process keeps one core busy
  OpenMP default, quiet OMP_NUM_THREADS=2 (one per core, torch's own choice) and libgomp's default waiting (spin, then sleep)
  OpenMP default, busy  the same while the other process runs
The competing process is `--busy python` (one pure-Python thread spinning: a second job's data loader or tokenizer) or
`--busy torch` (a process doing 2-thread matrix products with OpenMP's defaults: a second training job). Conditions slower
than --timeout seconds are stopped and reported as such. Ratios are to the suite's quiet time, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BUSY = {
    "python": "while True: pass",
    "torch": "import torch\na = torch.randn(512, 512)\nwhile True: a = torch.tanh(a @ a / 512)",
}


def demo_env(suite: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_NUM"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    if not suite:
        # an empty OMP_WAIT_POLICY stops training/cpu_threads.py from setting PASSIVE; libgomp then keeps its default
        env.update(OMP_NUM_THREADS="2", OMP_WAIT_POLICY="")
    return env


def run_demo(updates: int | None, suite: bool, timeout: float, work: Path, tag: str) -> float | None:
    """Wall seconds of one demo run, or None when it ran past `timeout`."""
    extra = [f"n_examples={32 * updates}", f"eval_every={32 * updates}"] if updates else []
    cmd = [sys.executable, "sft_train.py", "recipes/demo.yaml", f"run_dir={work / tag}", *extra]
    start = time.perf_counter()
    try:
        subprocess.run(cmd, cwd=REPO, env=demo_env(suite), check=True, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as error:
        sys.exit(f"the demo failed ({tag}): {error.stderr.decode()[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=None, help="optimizer steps of the demo (default: the recipe's 1,200)")
    parser.add_argument("--busy", choices=sorted(BUSY), default="python")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds after which a condition is stopped")
    parser.add_argument("--conditions", default="suite-quiet,suite-busy,default-quiet,default-busy")
    args = parser.parse_args()
    conditions = args.conditions.split(",")
    print(f"load average {os.getloadavg()[0]:.1f} at the start; {os.cpu_count()} CPUs; competing process: {args.busy}",
          flush=True)
    times: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_demo(1, True, args.timeout, work, "warm-caches")  # tokenization and model files cached for every condition
        for condition in conditions:
            settings, load = condition.split("-")
            busy = None
            if load == "busy":
                quiet_env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}  # OpenMP's defaults
                busy = subprocess.Popen([sys.executable, "-c", BUSY[args.busy]], env=quiet_env)
            try:
                times[condition] = run_demo(args.updates, settings == "suite", args.timeout, work, condition)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            shown = f"{times[condition]:.1f} s" if times[condition] is not None else f"> {args.timeout:.0f} s (stopped)"
            print(f"  {condition}: {shown}", flush=True)
    base = times.get("suite-quiet")
    print(f"\ndemo ({args.updates or 1200} updates), wall seconds; ratio to suite-quiet; competing process: {args.busy}")
    for condition, seconds in times.items():
        ratio = f"{seconds / base:.2f}x" if seconds and base else "-"
        print(f"{condition:<16}{(f'{seconds:.1f}' if seconds else f'>{args.timeout:.0f}'):>10}{ratio:>9}")


if __name__ == "__main__":
    main()
