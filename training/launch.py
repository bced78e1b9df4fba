"""`accelerate launch` whose last line is the run's own: the `continue with: ...` of a stopped run, or its `error: ...`.

    python -m training.launch --config_file accelerate_configs/fsdp_8gpu.yaml sft_train.py recipes/llama7b_hh.yaml

Takes exactly `accelerate launch`'s arguments. Under plain `accelerate launch`, Ctrl-C stops the run cleanly (the processes
finish the step, save LATEST and print how to continue), but then torchrun's agent, which got the Ctrl-C too, raises its
own `SignalException` (a 30-line traceback) and exits 1; and a run that stops on a user error is followed by the agent's
40-line failure report. This wrapper runs the same launcher in this process; when the run's main process left its last
line (training/cli.py `last_line`, through the file named by SFT_LAST_WORDS) and the launcher then failed, the launcher's
report is dropped, the line is printed again as the last one, and the exit status is the run's: 0 after a clean stop,
2 after a user error, 130 after an interrupt. Any other failure keeps the launcher's report and status.

SIGUSR1 (SLURM's `--signal=USR1@600`) is ignored here, as `trap '' USR1` does: the training processes act on it.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

from training.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, LAST_WORDS

STATUS = {"stopped": 0, "error": EXIT_USER_ERROR, "interrupted": EXIT_INTERRUPTED}


def read_last_words(path: Path) -> tuple[str, str] | None:
    """(kind, line) left by the run's main process, or None."""
    try:
        kind, _, line = path.read_text().partition("\n")
    except OSError:
        return None
    return (kind, line.strip()) if kind in STATUS and line.strip() else None


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    fd, name = tempfile.mkstemp(prefix="sft-last-words-")
    os.close(fd)
    note = Path(name)
    os.environ[LAST_WORDS] = str(note)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # One process without torchrun (accelerate's simple launcher): the run is a child in this process group and gets
    # Ctrl-C from the terminal itself; this process waits for it instead of dying of KeyboardInterrupt. (torchrun's agent
    # installs its own handlers, which forward the signal to its processes.) A handler, not SIG_IGN, which children inherit.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        launch_command(args)
        failure = None
    except BaseException as e:  # noqa: BLE001 - SignalException, ChildFailedError, CalledProcessError, KeyboardInterrupt
        failure = e
    finally:
        words = read_last_words(note)
        note.unlink(missing_ok=True)
    if failure is None:
        return 0
    if words is None:
        raise failure
    kind, line = words
    print(line, file=sys.stdout if kind == "stopped" else sys.stderr, flush=True)
    return STATUS[kind]


if __name__ == "__main__":
    sys.exit(main())
