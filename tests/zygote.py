"""A warm process that forks the suite's ``rosa-ds`` runs, so that each skips the imports.

Every run of the command line in a test is its own process (own pid, environment, working
folder, exit code, signals), but a fresh interpreter spends about 10 s of one core importing
torch, DeepSpeed, transformers and peft before it does anything, which is most of a tiny run.
This process imports them once, says its environment then (one JSON line), then, for each request on stdin (one JSON line: argv, env,
cwd, stdout, stderr, status), forks a child that runs ``python -m rosa_ds.cli ARGS`` (or a
probe script) as a new interpreter would from there: the child's output goes to the files named, it exits
through the normal interpreter exit (threads joined, atexit run), and this process writes the
child's exit code (negative for a signal, as ``subprocess`` does) to the status file when it
reaps it. It imports nothing of rosa_ds, so nothing of the project is read before the child's
environment is set; ``tests/helpers.py`` sends only requests whose environment differs from
this process's in variables that are read at run time (rank variables, ``ROSA_DS_*``).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import runpy
import selectors
import signal
import sys
import threading
import warnings

PRELOAD = (
    "torch",
    "deepspeed",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "datasets",
    "safetensors.torch",
    "peft",
)


def _preload() -> None:
    warnings.simplefilter("ignore")  # import-time warnings belong to the children, once each
    stdout, stderr = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # deepspeed logs its accelerator at import: not into the reply channel
    os.dup2(null, 2)
    try:
        for name in PRELOAD:
            __import__(name)
    finally:
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        os.close(null)
    warnings.resetwarnings()
    gc.freeze()  # the children's collections skip what is shared, so do not copy its pages


def _write_status(path: str, code: int) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(code))
    os.replace(tmp, path)


def _child(request: dict) -> None:
    """Become ``python ARGV`` (``-m MODULE ARGS`` or ``SCRIPT ARGS``) run in ``cwd`` with
    ``env``; never returns."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    argv = request["argv"]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = ["-m", *argv[2:]]
            sys.path[0] = request["cwd"]  # what ``python -m`` puts first
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as ``python SCRIPT``
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:  # the interpreter's reading of sys.exit's argument
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _exit(code)


def _exit(code: int) -> None:
    """End as the interpreter ends (threads joined, atexit handlers run, output flushed), but
    without tearing down every module: that would write to, and so copy, each page shared
    with this process, seconds of work that a new interpreter's exit does not have."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main() -> None:
    _preload()
    print(json.dumps({"env": dict(os.environ)}), flush=True)
    status_of: dict[int, str] = {}
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    open_input = True
    while open_input or status_of:
        if selector.select(timeout=0.05):
            line = sys.stdin.readline()
            if not line:  # the test process left: nothing it started may outlive it
                selector.unregister(sys.stdin)
                open_input = False
                for pid in status_of:
                    os.kill(pid, signal.SIGKILL)
            else:
                request = json.loads(line)
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    _child(request)
                status_of[pid] = request["status"]
                print(json.dumps({"pid": pid}), flush=True)
        while status_of:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _write_status(status_of.pop(pid), os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
