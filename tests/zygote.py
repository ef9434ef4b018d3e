"""A Python process that has imported torch and the other heavy libraries once, and forks a fresh process for
each script run the tests ask for (conftest.run_script): a run then costs its own work, not two seconds of
imports. Tests only; the scripts never know.

    python tests/zygote.py SOCKET      # conftest starts it; one per pytest worker

Each connection to SOCKET sends one JSON request {"script", "args", "cwd", "env", "umask", "stdout",
"stderr"} and gets two lines back: the pid of the process running the script, then its exit code (as
subprocess gives it: -N for a signal). That process is a plain `python SCRIPT ARGS...` in all that a script
can see: its own pid, cwd, umask and environment, argv, sys.path[0] the script's folder, standard input
/dev/null, output to the given files (unbuffered, as PYTHONUNBUFFERED=1), default signal handlers, and a
normal interpreter exit (atexit handlers run; an uncaught exception prints its traceback and exits 1); only
the teardown of every module at the end is skipped (see exit_now).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import io
import json
import os
import runpy
import signal
import socket
import sys
import threading

import ijson  # noqa: F401  (the imports every script pays for, done once here)
import numpy  # noqa: F401
import torch
import yaml  # noqa: F401


def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # the connection handlers are reaped as they end
    print("ready", flush=True)
    while True:
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            handle(connection)
        connection.close()


def handle(connection: socket.socket) -> None:
    """One request: fork the script's process, report its pid and then its exit code."""
    with connection.makefile("rb") as reader:
        request = json.loads(reader.readline())
    pid = os.fork()
    if pid == 0:
        connection.close()
        run(request)
    with contextlib.suppress(OSError):   # (a client gone after its timeout: nothing to tell)
        connection.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def run(request: dict) -> None:
    """Become `python SCRIPT ARGS...` and run it; never returns (SystemExit ends the interpreter)."""
    for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.umask(request["umask"])
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "OMP_NUM_THREADS" in request["env"]:   # read by the OpenMP runtime when torch was loaded: set it now
        torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for descriptor, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), descriptor)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", write_through=True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    sys.argv = [request["script"], *request["args"]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(request["script"])))
    code = 0
    try:
        runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as stop:   # as the interpreter reads it: None is 0, a number itself, else printed, 1
        code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException as error:
        sys.excepthook(type(error), error, error.__traceback__)
        code = -signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1
    exit_now(code)


def exit_now(code: int) -> None:
    """The interpreter's exit without its teardown of every module (0.6 s with torch loaded): threads
    joined and atexit handlers run as at a normal exit, output flushed; a KeyboardInterrupt dies of SIGINT,
    as Python does."""
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if code == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


if __name__ == "__main__":
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG: gone with the pytest worker
    sys.path.pop(0)   # this folder: a script's sys.path[0] is its own folder
    serve(sys.argv[1])
