"""`python cli.py ARGS` as a fresh process that skips the imports: a zygote process imports the
command line's heavy modules once (torch, torchvision, the data and training code), then forks a
child per command, which runs the command as `python cli.py ARGS` would and exits with its code.

Why: tests/test_bad_input.py runs some 135 commands, each its own process, and each spent ~3.5 CPU
seconds importing torch and the rest before its first line: most of that file's minutes. A forked
child starts with the imports done (copy-on-write) and is still its own process: its own folder,
environment, exit code (negative when killed by a signal), stdout and stderr, as under
subprocess.run.

What stays as in a fresh process: the environment is the request's, whole, before the command
starts; the preloaded modules read none of the variables a command may set (MLflow and Optuna read
theirs when called, and start no thread when imported), and ablate's tracking module, which sets
variables when imported, is imported by the command itself; the zygote computes nothing, so no
thread pool exists to fork (torch starts its threads on first use, in the child); `__main__` is
cli.py, so multiprocessing's spawned processes start as the real command's would. A zygote is
started with the environment of its commands less ABLATE_* and MLFLOW_TRACKING_URI (what torch,
libgomp and rich read when imported: OMP_NUM_THREADS, COLUMNS, ...); commands that differ in
anything else get a zygote of their own.

    result = run(["train", "smoke", ...], cwd, env, timeout=300)  # a subprocess.CompletedProcess
    worker = start(["worker", "grid", ...], cwd, env, log=path)  # like subprocess.Popen: pid, poll,
    worker.wait(timeout=600)                                      # wait, communicate, send_signal, kill

A started command is as killable, stoppable and signalled as a Popen's: its pid is the command's
own process (the zygote's handler waits for it and reports its exit code, negative when a signal
ended it); `new_session=True` makes it the leader of a process group of its own, as
start_new_session=True does, so os.killpg(pid, ...) ends it with the processes it started.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "cli.py"
# Imported once by the zygote: none reads the environment at import beyond what every command
# shares (see the module docstring), and they are most of a command's start-up.
PRELOAD = ("numpy", "PIL.Image", "torch", "torchvision", "typer", "rich.console", "mlflow", "optuna", "cli",
           "ablate.config", "ablate.experiments", "ablate.builders", "ablate.engine", "ablate.evaluation",
           "ablate.runner")


class Zygote:
    """The zygote process and its socket; `run` sends one command and waits for its result."""

    def __init__(self, env: dict[str, str]):
        self.folder = tempfile.mkdtemp(prefix="ablate-zygote-")
        self.address = os.path.join(self.folder, "socket")
        self.process = subprocess.Popen([sys.executable, __file__, self.address], env=env, cwd=self.folder,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        ready = self.process.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"the CLI zygote did not start (it said {ready!r}, exit code {self.process.poll()})")

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        """`python cli.py *args` in `cwd` with exactly `env`, as subprocess.run(..., capture_output=True,
        text=True, timeout=timeout) would return it."""
        proc = self.start(args, cwd, env, merge_stderr=False)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # the command's process, as subprocess.run kills it
            proc.wait()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def start(self, args: list[str], cwd: Path, env: dict[str, str], *, log: Path | None = None,
              merge_stderr: bool = True, new_session: bool = False) -> Started:
        """`python cli.py *args` in `cwd` with exactly `env`, started: its output appended to `log`
        (stdout and stderr), or kept for communicate() (stderr merged into stdout when
        `merge_stderr`, as stderr=subprocess.STDOUT does)."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.address)
        request = {"args": list(args), "cwd": str(cwd), "env": env, "log": str(log) if log else None,
                   "merge": merge_stderr, "new_session": new_session}
        conn.sendall(json.dumps(request).encode() + b"\n")
        return Started([sys.executable, str(CLI), *args], conn)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.process.stdout.close()
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))
        os.rmdir(self.folder)

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Started:
    """A command Zygote.start started, with the part of subprocess.Popen's interface the tests use:
    pid, returncode, poll, wait, communicate, send_signal, terminate, kill."""

    def __init__(self, args: list[str], conn: socket.socket):
        self.args, self._conn = args, conn
        self._reader: IO[bytes] = conn.makefile("rb")
        self.pid: int = json.loads(self._reader.readline())["pid"]
        self.returncode: int | None = None
        self._output: tuple[str, str | None] = ("", None)
        self._done = threading.Event()
        threading.Thread(target=self._collect, daemon=True, name=f"zygote-{self.pid}").start()

    def _collect(self) -> None:
        """Wait (in a thread) for the handler's report of the command's end."""
        try:
            line = self._reader.readline()
            if not line:
                raise RuntimeError(f"the CLI zygote's handler of {self.args[2:]} ended without a result")
            done = json.loads(line)
            out, err = (_text(base64.b64decode(done[k])) if done[k] is not None else None for k in ("stdout", "stderr"))
            self._output = (out, err)
            self.returncode = done["returncode"]
        finally:
            self._reader.close()
            self._conn.close()
            self._done.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        if self.returncode is None:
            raise RuntimeError(f"the CLI zygote's handler of {self.args[2:]} ended without a result")
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        """(stdout, stderr) once the command ended; stderr None when merged into stdout."""
        self.wait(timeout)
        return self._output

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# Variables the command reads when it runs, never when the preloaded modules are imported:
# commands that differ only in these share a zygote.
RUNTIME_ONLY = ("ABLATE_", "MLFLOW_TRACKING_URI", "PYTEST_CURRENT_TEST")
_SHARED: dict[tuple, Zygote] = {}
_SHARED_LOCK = threading.Lock()


def zygote_for(env: dict[str, str]) -> Zygote:
    """The zygote of this environment (less the RUNTIME_ONLY variables), started by its first
    command; they end with the test session (`close_all`, in conftest.py)."""
    key = tuple(sorted((k, v) for k, v in env.items() if not k.startswith(RUNTIME_ONLY)))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Zygote({k: v for k, v in env.items() if not k.startswith(RUNTIME_ONLY)})
        return _SHARED[key]


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Zygote.run on the zygote of this environment."""
    return zygote_for(env).run(args, cwd, env, timeout)


def start(args: list[str], cwd: Path, env: dict[str, str], **how) -> Started:
    """Zygote.start on the zygote of this environment."""
    return zygote_for(env).start(args, cwd, env, **how)


def close_all() -> None:
    with _SHARED_LOCK:
        while _SHARED:
            _SHARED.popitem()[1].close()


def _text(data: bytes) -> str:
    """Bytes as subprocess.run(text=True) decodes them: UTF-8 here, universal newlines."""
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


# ----------------------------------------------------------------------------- the zygote's side

SET_BY_IMPORTS: dict[str, str] = {}  # variables the preloaded modules set when imported


def _serve(address: str) -> None:
    import importlib

    sys.path[0] = str(REPO)  # as for `python cli.py`: the script's folder first, not tests/
    before = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    global SET_BY_IMPORTS  # MLflow's telemetry session id: set again in each command's environment
    SET_BY_IMPORTS = {k: v for k, v in os.environ.items() if before.get(k) != v}
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(128)
    server.settimeout(1.0)
    parent = os.getppid()
    print("ready", flush=True)
    while os.getppid() == parent:  # a test session killed before closing it: the zygote ends too
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        if os.fork() == 0:  # the handler: runs one command in its own child, reports, exits
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                _handle(conn)
            finally:
                os._exit(0)
        conn.close()


def _handle(conn: socket.socket) -> None:
    request = json.loads(conn.makefile("rb").readline())
    if request.get("log"):  # stdout and stderr appended to the test's log file
        out = err = open(request["log"], "ab")
    else:
        out = tempfile.TemporaryFile()
        err = out if request.get("merge") else tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        conn.close()
        if request.get("new_session"):
            os.setsid()
        _command(request, out.fileno(), err.fileno())  # never returns
    while request.get("new_session") and _group_of(pid) not in (pid, None):
        time.sleep(0.001)  # the pid is told once the child leads its group (killpg reaches it whole)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    result = {"returncode": os.waitstatus_to_exitcode(status), "stdout": None, "stderr": None}
    if not request.get("log"):
        kept = {"stdout": out} if err is out else {"stdout": out, "stderr": err}  # merged: stderr stays None
        for name, f in kept.items():
            f.seek(0)
            result[name] = base64.b64encode(f.read()).decode()
    conn.sendall(json.dumps(result).encode() + b"\n")


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:  # it already ended
        return None


def _command(request: dict, out: int, err: int) -> None:
    """The command's process: `python cli.py ARGS` from here on."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for key, value in SET_BY_IMPORTS.items():  # as the imports would have, had they run here
            os.environ.setdefault(key, value)
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
        import cli

        sys.argv = [str(CLI), *request["args"]]
        sys.modules["__main__"] = cli  # spawned processes (multiprocessing) import cli.py, as they would
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - an uncaught exception: its traceback, exit 1, as Python does
            import traceback

            traceback.print_exc()
    finally:
        try:  # what Python does on its way out: wait for threads, run atexit's functions, flush
            import atexit
            import threading

            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":
    _serve(sys.argv[1])
