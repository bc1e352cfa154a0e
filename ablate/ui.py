"""`ablate ui`: the MLflow UI over the project's tracking store, on 127.0.0.1, light, with the URLs
of each ablation's report page and Runs table, and a browser on them when asked. The pages' URLs
come from ablate.tracking (the MLflow module), imported while the server starts.

Light: one server process with one worker, and without the job runner of MLflow's GenAI features
(7 huey consumers, the scorers' and judges' queue), which an ablation never uses: `mlflow ui` as
it comes started 15 processes and answered after ~40 s on 2 loaded cores; see docs/mlflow.md.
`--genai` starts them all the same.
"""

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
from pathlib import Path

from ablate import signals
from ablate.errors import AblateError

# The light server answers in ~5-10 s on 2 cores; a loaded machine may need a few times that.
READY_SECONDS = 120.0
# Off: MLflow's job runner (huey consumers for GenAI scorers, judges, trace rollups). See start().
NO_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


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


def store_uri() -> str:
    """tracking.tracking_uri without importing MLflow (the server starts first, see `run`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def start(uri: str, port: int, genai: bool = False) -> subprocess.Popen:
    """The MLflow UI over `uri` on 127.0.0.1:port, in a process group of its own (`stop` ends it
    whole): one uvicorn worker, and the GenAI job runner only when `genai`."""
    # No access log: a line per request of the browser would bury the URLs printed above it.
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--uvicorn-opts", "--no-access-log"]
    env = {**os.environ, **({} if genai else NO_JOBS)}
    return subprocess.Popen(cmd, start_new_session=True, env=env)


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a worker that ignores SIGTERM must not keep the port
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def serve(uri: str, port: int, on_ready: Callable[[], None] | None = None, *,
          on_start: Callable[[], None] | None = None, genai: bool = False) -> int:
    """Run the UI until it exits or this process gets SIGINT (Ctrl-C) or SIGTERM, and stop its
    whole group either way (a SIGTERM used to leave the server running, holding the port).
    `on_start()` runs while the server boots (an error there stops it and is raised);
    `on_ready()` once it answers. Returns the UI's exit code, 0 when stopped by a signal."""
    proc = start(uri, port, genai)
    try:
        with signals.graceful_stop() as stopped:
            if on_start:
                on_start()
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
        time.sleep(0.2)
    return False


def pages(base: str, name: str | None, uri: str) -> list[tuple[str, str, str]]:
    """(experiment, page, URL) of each ablation's report page (once `ablate report` made one) and
    Runs table; of ablation `name` only when given."""
    from ablate import tracking

    out = []
    for exp in tracking.ui_experiments(name, uri):
        out += [(exp.name, label, url) for label, url in tracking.report_links(base, exp)]
        out.append((exp.name, "runs", tracking.ui_url(base, exp.experiment_id)))
    return out


def browse(name: str | None, port: int, open_page: bool, genai: bool, say: Callable[[str], None],
        warn: Callable[[str], None]) -> int:
    """`ablate ui [NAME]`: check the store, start the server, print the pages' URLs while it
    boots, open the first in a browser once it answers (`open_page`); returns the exit code."""
    from ablate.errors import mask_url

    check_port(port)
    uri = store_uri()
    base = f"http://127.0.0.1:{port}"
    if not _is_ready_store(uri):  # created (migrated) or checked before a server is started over it
        from ablate.tracking import init_store

        init_store(uri)
    found: list[tuple[str, str, str]] = []

    def list_pages() -> None:
        from ablate.tracking import init_store

        init_store(uri)  # a server store that cannot be reached: one line, and the UI stopped
        found.extend(pages(base, name, uri))
        say(f"MLflow UI for {mask_url(uri)} on {base} (Ctrl-C stops it)")
        for exp_name, label, url in found:
            say(f"  {exp_name} {label}: {mask_url(url)}")
        if found and not open_page:
            say(f"open a URL above in a browser, or run `ablate ui {name or found[0][0]} --open`")

    def open_first() -> None:
        if not open_browser(found[0][2] if found and name else base):
            warn("no browser could be opened here: open the URL above where you browse")

    return serve(uri, port, open_first if open_page else None, on_start=list_pages, genai=genai)


def _is_ready_store(uri: str) -> bool:
    """Whether the server may open `uri` while ablate checks it: not a sqlite file yet to be
    created (two migrations at once), nor an MLflow server's URL (checked first: a dead one is one
    line at once, not a UI started and stopped)."""
    prefix = "sqlite:///"
    if uri.startswith(("http://", "https://")):
        return False
    return not uri.startswith(prefix) or Path(uri[len(prefix):]).is_file()


def open_browser(url: str) -> bool:
    """Open `url` in the user's browser; False where none can be started (a headless machine)."""
    return webbrowser.open(url)
