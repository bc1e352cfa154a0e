"""`ablate ui`: the MLflow UI over the project's tracking store, on 127.0.0.1, and a browser on the
ablation's Runs table when asked. The pages' URLs come from ablate.tracking (the MLflow module)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Callable

from ablate import signals
from ablate.errors import AblateError

# `mlflow ui` takes ~20 s to answer on 2 cores; a loaded machine may need a few times that.
READY_SECONDS = 120.0


def check_port(port: int) -> None:
    """One AblateError unless `port` is a TCP port of 127.0.0.1 that nothing listens on: the UI
    printed its URL and exited 0 on a port in use, 0 (any free port) printed a URL of port 0,
    and one out of range gave an OverflowError."""
    if not 1 <= port <= 65535:
        hint = " (0 would let the system pick one, which the URLs printed could not name)" if port == 0 else ""
        raise AblateError(f"--port: must be in 1..65535, got {port}{hint}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            raise AblateError(f"--port: 127.0.0.1:{port} is not free ({e.strerror}); pick another port") from None


def start(uri: str, port: int) -> subprocess.Popen:
    """The MLflow UI over `uri` on 127.0.0.1:port, in a process group of its own (it runs several
    worker processes, which `stop` ends together)."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port)]
    return subprocess.Popen(cmd, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()


def serve(uri: str, port: int, on_ready: Callable[[], None] | None = None) -> int:
    """Run the UI until it exits or this process gets SIGINT or SIGTERM, and stop its whole group
    either way (a SIGTERM used to leave the server running, holding the port). `on_ready()` runs
    once it answers. Returns the UI's exit code, 0 when stopped by a signal."""
    proc = start(uri, port)
    try:
        with signals.graceful_stop() as stopped:
            if on_ready and wait_ready(f"http://127.0.0.1:{port}", proc, stopped):
                on_ready()
            while proc.poll() is None and not stopped():
                time.sleep(0.5)
    finally:
        if proc.poll() is None:
            stop(proc)
    return 0 if proc.returncode < 0 or stopped() else proc.returncode


def wait_ready(base: str, proc: subprocess.Popen, stopped: Callable[[], bool] = lambda: False,
               seconds: float = READY_SECONDS) -> bool:
    """Whether the UI at `base` answers its health check before `seconds` pass (False at once when
    its process ended, e.g. the port was taken, or a signal came)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None and not stopped():
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def open_browser(url: str) -> bool:
    """Open `url` in the user's browser; False where none can be started (a headless machine)."""
    return webbrowser.open(url)
