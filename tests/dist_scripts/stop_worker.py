"""A launched process that stops the way the training loop does: on SIGINT/SIGTERM/SIGUSR1 (training.loop.StopRequested)
it prints the loop's `continue with: ...` line through training.cli.last_line, and exits 0; `fail` raises a user error
through training.cli.run_main instead. Writes {OUT}.ready.{RANK} once its handlers are in place.

    python -m training.launch --config_file accelerate_configs/cpu_2proc.yaml tests/dist_scripts/stop_worker.py stop OUT
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.cli import last_line, run_main  # noqa: E402
from training.errors import UserError  # noqa: E402
from training.loop import StopRequested, continue_command  # noqa: E402


def main(argv):
    mode, out = argv
    if mode == "fail":
        if os.environ["RANK"] != "0":
            time.sleep(30)  # the launcher stops this one when the main process fails
        raise UserError("lr: must be a finite number > 0, got inf")
    stop = StopRequested()
    Path(f"{out}.ready.{os.environ['RANK']}").write_text("")
    deadline = time.monotonic() + 60
    while stop.signal is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # the step in flight and the save
    if os.environ["RANK"] == "0":
        last_line(f"stopped at 8 examples; continue with: {continue_command('sft_train.py', Path('runs/x'))}", "stopped")


run_main(main, sys.argv[1:])
