"""What every command-line entry point shares: one line per user error, `--key value` words, and help from the config tree.

    from training.cli import run_main
    if __name__ == "__main__":
        run_main(main)          # main(argv: list[str] | None) -> anything

A mistake the user can fix (training.errors.UserError: config, data, checkpoint; a missing or unreadable file; a full disk;
a model that is not where the config says) prints `error: <what, where, how to fix>` once, on the main process only, and
exits with status 2. Ctrl-C outside the training loop (which saves first: training/loop.py) prints one line and exits
with status 130. SFT_TRACEBACK=1 shows the traceback as well. Any other exception keeps its traceback.

Under `python -m training.launch` (accelerate launch that ends with the run's own last line) the main process also writes
that line (the error, or the loop's `continue with: ...`) to the file named by SFT_LAST_WORDS; see training/launch.py.
"""

from __future__ import annotations

import ast
import dataclasses
import errno
import inspect
import os
import sys
import textwrap
import time
import typing
from typing import Any, Callable

from training.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by SIGINT
LAST_WORDS = "SFT_LAST_WORDS"  # set by training/launch.py: where the main process leaves its last line
INTERRUPTED = ("interrupted (Ctrl-C): stopped at once, nothing new was saved; run the same command to start again "
               "(a run with a saved checkpoint continues with resume_from=auto)")
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded", errno.EROFS: "the file system is read-only"}


SECONDARY_EXIT_SECONDS = 2.0


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Call `main(argv)`; a user error becomes one line on stderr (main process) and exit status 2."""
    try:
        return main(argv)
    except BrokenPipeError:  # `... --help | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # during setup or data preparation, or a second Ctrl-C in training
        if traceback_wanted():
            raise
        if is_main_process():
            last_line(INTERRUPTED, "interrupted", sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:  # noqa: BLE001 - sorted into user errors and the rest just below
        message = user_error_message(e)
        if message is None or traceback_wanted():
            raise
        if is_main_process():
            last_line(f"error: {message}", "error", sys.stderr)
        else:
            # A launcher stops every process as soon as one exits. Errors found by all processes at once (a failed
            # collective checkpoint write) are printed by the main process: the others leave it the time to do so.
            time.sleep(SECONDARY_EXIT_SECONDS)
        raise SystemExit(EXIT_USER_ERROR) from None


def traceback_wanted() -> bool:
    return os.environ.get("SFT_TRACEBACK", "") not in ("", "0")


def last_line(line: str, kind: str, stream=None) -> None:
    """Print the run's last line (`kind`: error, interrupted or stopped) and leave it for training/launch.py, which prints
    it again after the launcher's own output."""
    print(line, file=stream or sys.stdout, flush=True)
    path = os.environ.get(LAST_WORDS)
    if path:
        try:
            with open(path, "w") as f:
                f.write(f"{kind}\n{line}\n")
        except OSError:
            pass  # only a repeat of what was printed


def user_error_message(e: BaseException) -> str | None:
    """The one-line message of an error a user can fix, or None for an unexpected one."""
    if isinstance(e, UserError):
        return one_line(str(e))
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        where = f" writing {e.filename}" if e.filename else ""
        return f"{DISK_ERRNOS[e.errno]}{where}; free space or point run_dir / local_dirs at another disk"
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        if e.filename is not None:
            return f"{e.strerror}: {e.filename}"
        return one_line(str(e))
    hub = hub_error_message(e)
    if hub is not None:
        return hub
    return None


def hub_error_message(e: BaseException) -> str | None:
    """Hugging Face Hub errors that mean a wrong id, no access or no network (only when the hub client is loaded)."""
    if "huggingface_hub" not in sys.modules:
        return None
    from huggingface_hub import errors

    kinds = tuple(getattr(errors, name) for name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError",
                                                     "LocalEntryNotFoundError", "HFValidationError", "OfflineModeIsEnabled")
                  if hasattr(errors, name))
    if isinstance(e, kinds):
        return one_line(str(e))
    return None


def one_line(text: str) -> str:
    return " ".join(text.split())


def is_main_process() -> bool:
    """Main process of an accelerate launch; before the Accelerator exists, the launcher's global rank."""
    from accelerate.state import PartialState

    if PartialState._shared_state:
        return PartialState().is_main_process
    return os.environ.get("RANK", "0") == "0"


def normalize_args(args: list[str]) -> list[str]:
    """`--key value`, `--key=value` and a bare `--flag` (true) as `key=value`; `-` in keys becomes `_`."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not eq:
                if i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
                    value = args[i + 1]
                    i += 1
                else:
                    value = "true"
            out.append(f"{key}={value}")
        else:
            out.append(arg)
        i += 1
    return out


def help_requested(args: list[str]) -> tuple[bool, str | None]:
    """(`--help`/`-h` given, the section named after it, if any)."""
    for i, arg in enumerate(args):
        if arg in ("--help", "-h") or arg.startswith("--help="):
            if arg.startswith("--help="):
                return True, arg.partition("=")[2]
            following = args[i + 1] if i + 1 < len(args) else None
            return True, following if following and "=" not in following and not following.startswith("-") else None
    return False, None


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal that follows its annotation in the source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def config_help(root: type, section: str | None = None, usage: str = "") -> str:
    """Every key of the config tree with its default and docstring; `section` (e.g. model) limits it to one subtree."""
    lines: list[str] = [usage, ""] if usage else []
    lines.append("Config keys (key=value or --key value; defaults shown):")
    found = section is None

    def walk(cls: type, instance: Any, prefix: str) -> None:
        nonlocal found
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, value = prefix + f.name, getattr(instance, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                if section is None or section == key or section.startswith(key + ".") or key.startswith(section + "."):
                    lines.append(f"\n{key}.*   {docs.get(f.name, '')}")
                walk(hints[f.name], value, key + ".")
                continue
            if section is not None and not (key == section or key.startswith(section + ".")):
                continue
            found = True
            lines.append(f"  {key}={yaml_value(value)}")
            lines.extend(textwrap.wrap(docs.get(f.name, ""), 110, initial_indent="      ", subsequent_indent="      "))

    walk(root, root(), "")
    if not found:
        import difflib

        names = [f.name for f in dataclasses.fields(root)]
        close = difflib.get_close_matches(section, names, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; sections: {', '.join(n for n in names if n in ('model', 'loss', 'wandb'))}"
        raise UserError(f"--help {section}: no such config key or section{hint}")
    return "\n".join(lines)


def yaml_value(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip().removesuffix("...").strip()
