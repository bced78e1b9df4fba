"""Run many command lines of the real entry points, each in its own forked process, paying the imports once.

    python tests/cli_runner.py cases.json results.json

cases.json: [{"id", "argv": ["sft_train.py", ...] or ["-m", "data", ...], "cwd", "env": {...}}]. Each case runs in a child
forked from this process after torch, transformers, datasets and the entry modules are imported: the script or module runs
as `__main__` with its sys.argv, stdout and stderr go to files, and the exit status is what `python argv...` would return.
results.json: [{"id", "code", "stdout", "stderr"}].
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def preload() -> None:
    sys.path.insert(0, str(REPO))
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import data.__main__  # noqa: F401
    import modeling.export  # noqa: F401
    import modeling.generate  # noqa: F401
    import sft_train  # noqa: F401
    import training.plots  # noqa: F401


def child(case: dict, out: str, err: str) -> None:
    code = 0
    try:
        os.chdir(case["cwd"])
        os.environ.update(case.get("env", {}))
        for name in case.get("unset", []):
            os.environ.pop(name, None)
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        argv = case["argv"]
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                runpy.run_path(str(REPO / argv[0]), run_name="__main__")
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    preload()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            out, err = f"{tmp}/{i}.out", f"{tmp}/{i}.err"
            pid = os.fork()
            if pid == 0:
                child(case, out, err)
            _, status = os.waitpid(pid, 0)
            results.append({"id": case["id"], "code": os.waitstatus_to_exitcode(status),
                            "stdout": Path(out).read_text(errors="replace") if Path(out).exists() else "",
                            "stderr": Path(err).read_text(errors="replace") if Path(err).exists() else ""})
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
